//! `sglp-engine compare`: SGLP beside other layer-removal criteria, same calibration data and budget, each
//! evaluated on held-out tokens with the removed layers bypassed (no checkpoints written).

use super::common::emit;
use super::prune::{params_before_after, SglpArgs};
use crate::error::{Error, Result};
use crate::pruning::criteria::{self, HiddenStats};
use crate::pruning::pipeline::{perplexity, sglp_decide, Budget};
use crate::runtime::{Model, Tokens};
use crate::similarity::device::open_backend;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration tokens (`.npy` [sequences, tokens]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Held-out tokens for the perplexity of each pruned model.
    #[arg(long)]
    pub eval_tokens: PathBuf,
    /// Number of decoder layers every criterion removes.
    #[arg(long)]
    pub remove: usize,
    /// Seed of the `random` criterion.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// MPruner: grow a cluster while CKA(first, next)·100 ≥ this. When the clusters hold fewer removable
    /// (non-first) layers than --remove, the threshold is lowered one point at a time until they do (the
    /// threshold used is in the JSON).
    #[arg(long, default_value_t = 98.0)]
    pub mpruner_threshold: f64,
    /// Criteria to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sglp,shortgpt,angular,mpruner,random"
    )]
    pub criteria: Vec<Criterion>,
    /// JSON output file.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub sglp: SglpArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Criterion {
    /// This pipeline: CKA segments, budget split, lowest gradient norm (or subset search) inside.
    Sglp,
    /// Men et al.: lowest block influence 1 − mean cos(h_in, h_out).
    Shortgpt,
    /// Gromov et al.: the n consecutive layers with the smallest last-token angular distance.
    Angular,
    /// MPruner: CKA clusters, non-first members by lowest gradient norm.
    Mpruner,
    /// Uniformly random layers (seeded).
    Random,
}

#[derive(serde::Serialize)]
struct Row {
    criterion: String,
    removed: Vec<usize>,
    loss: f64,
    perplexity: f64,
    params: usize,
    /// Seconds the criterion itself took to decide (shared passes counted once, where first needed).
    decide_s: f64,
    details: serde_json::Value,
}

#[derive(serde::Serialize)]
struct CompareJson {
    format: &'static str,
    model: String,
    tokens: String,
    eval_tokens: String,
    remove: usize,
    seed: u64,
    baseline: Row,
    criteria: Vec<Row>,
}

/// Block influence and last-token angular distances of the unpruned model on the calibration tokens.
fn hidden_statistics(
    model: &Model,
    tokens: &Tokens,
    batch_seqs: usize,
    span: usize,
) -> Result<HiddenStats> {
    let mut st = HiddenStats::new(model.num_layers(), span)?;
    let n_batches = tokens.sequences.div_ceil(batch_seqs);
    let pb = crate::progress::bar(n_batches as u64, "hidden-state batches");
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        st.begin_batch(batch.sequences, batch.len, model.hidden_size());
        let mut err = None;
        model.forward(&batch, &[], &mut |i, h| {
            if err.is_none() {
                err = st.observe(i, h).err();
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        st.end_batch()?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(st)
}

pub fn run(a: CompareArgs) -> Result<()> {
    let opts = a.sglp.options()?;
    if a.criteria.is_empty() {
        return Err(Error::invalid("--criteria lists no criterion"));
    }
    let model = Model::load(&a.model)?;
    let l = model.num_layers();
    let budget = Budget::Remove(a.remove).layers_to_remove(l)?;
    let tokens = model.load_tokens(&a.tokens)?;
    let held = model.load_tokens(&a.eval_tokens)?;
    let fb = opts.forward_batch;

    let (base_params, _) = params_before_after(&a.model, l, &[])?;
    let base = perplexity(&model, &held, fb, &[])?;
    let mut rows = Vec::new();

    // SGLP's decision also yields the CKA matrix and gradient norms MPruner needs.
    let needs_sglp = a
        .criteria
        .iter()
        .any(|c| matches!(c, Criterion::Sglp | Criterion::Mpruner));
    let (mut sglp, mut sglp_s) = (None, 0.0);
    if needs_sglp {
        let t = Instant::now();
        let (mut backend, note) = open_backend(a.sglp.est.device, a.sglp.est.threads)?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        sglp = Some(sglp_decide(
            &model,
            &tokens,
            budget,
            &opts,
            backend.as_mut(),
        )?);
        sglp_s = t.elapsed().as_secs_f64();
    }
    let needs_hidden = a
        .criteria
        .iter()
        .any(|c| matches!(c, Criterion::Shortgpt | Criterion::Angular));
    let (mut hidden, mut hidden_s) = (None, 0.0);
    if needs_hidden {
        let t = Instant::now();
        hidden = Some(hidden_statistics(&model, &tokens, fb, budget)?);
        hidden_s = t.elapsed().as_secs_f64();
    }

    for &c in &a.criteria {
        let t = Instant::now();
        let (removed, details, shared_s) = match c {
            Criterion::Sglp => {
                let d = sglp.as_ref().expect("computed above");
                (
                    d.removed.clone(),
                    serde_json::json!({
                        "segments": d.segments,
                        "removed_per_segment": d.removed_per_segment,
                        "selection": opts.selection,
                        "gradnorm": d.gradnorm.per_layer,
                    }),
                    sglp_s,
                )
            }
            Criterion::Shortgpt => {
                let bi = hidden.as_ref().expect("computed above").block_influence();
                (
                    criteria::shortgpt(&bi, budget),
                    serde_json::json!({ "block_influence": bi }),
                    hidden_s,
                )
            }
            Criterion::Angular => {
                let ad = hidden.as_ref().expect("computed above").angular_distances();
                (
                    criteria::angular(&ad, budget),
                    serde_json::json!({ "angular_distance": ad }),
                    hidden_s,
                )
            }
            Criterion::Mpruner => {
                let d = sglp.as_ref().expect("computed above");
                let m = criteria::mpruner(
                    &d.cka.cka_matrix(),
                    &d.gradnorm.per_layer,
                    a.mpruner_threshold,
                    budget,
                )?;
                if m.threshold != a.mpruner_threshold {
                    eprintln!(
                        "note: mpruner: clusters at threshold {} hold fewer than {budget} removable \
                         layers; lowered to {}",
                        a.mpruner_threshold, m.threshold
                    );
                }
                (
                    m.removed.clone(),
                    serde_json::to_value(&m).expect("serialises"),
                    sglp_s,
                )
            }
            Criterion::Random => (
                criteria::random(l, budget, a.seed),
                serde_json::json!({ "seed": a.seed }),
                0.0,
            ),
        };
        let decide_s = t.elapsed().as_secs_f64() + shared_s;
        let p = perplexity(&model, &held, fb, &removed)?;
        let (_, params) = params_before_after(&a.model, l, &removed)?;
        rows.push(Row {
            criterion: format!("{c:?}").to_lowercase(),
            removed,
            loss: p.loss,
            perplexity: p.perplexity,
            params,
            decide_s,
            details,
        });
    }

    println!(
        "{:<10} {:<28} {:>12} {:>14}",
        "criterion", "removed layers", "perplexity", "parameters"
    );
    println!(
        "{:<10} {:<28} {:>12.4} {:>14}",
        "none", "-", base.perplexity, base_params
    );
    for r in &rows {
        let removed = r
            .removed
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<10} {:<28} {:>12.4} {:>14}",
            r.criterion, removed, r.perplexity, r.params
        );
    }
    if let Some(out) = &a.out {
        let j = CompareJson {
            format: "sglp-compare/1",
            model: a.model.display().to_string(),
            tokens: a.tokens.display().to_string(),
            eval_tokens: a.eval_tokens.display().to_string(),
            remove: budget,
            seed: a.seed,
            baseline: Row {
                criterion: "none".into(),
                removed: Vec::new(),
                loss: base.loss,
                perplexity: base.perplexity,
                params: base_params,
                decide_s: 0.0,
                details: serde_json::Value::Null,
            },
            criteria: rows,
        };
        emit(
            Some(out),
            &(serde_json::to_string_pretty(&j).expect("serialises") + "\n"),
        )?;
    }
    Ok(())
}
