//! The pruning-quality suite: every criterion on the same calibration data, over a sweep of budgets,
//! each pruned model's held-out perplexity measured with the removed layers bypassed (no checkpoints).
//!
//! One calibration pass gathers what the criteria need (CKA, gradient norms, hidden-state statistics);
//! calibration losses of skip sets are cached, so SLEB's greedy order and the loss-guided SGLP pay for
//! each set once across the sweep; held-out perplexities are cached by removed set.

use super::calibration::{
    calibration_pass, CalibrationStats, LossScorer, Needs, PassOptions, Perplexity,
};
use super::criteria;
use super::pipeline::{decide_from_stats, Method, Scoring, SglpOptions};
use super::select::greedy_removal;
use crate::error::{Error, Result};
use crate::runtime::{Model, Tokens};
use crate::similarity::Backend;
use std::time::Instant;

pub const COMPARE_FORMAT: &str = "sglp-compare/2";

/// A layer-removal criterion.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// The engine's default SGLP decision (`--method sglp`, with the SGLP options given).
    Sglp,
    /// SGLP as published (`--method sglp-paper`).
    #[value(name = "sglp-paper")]
    SglpPaper,
    /// Men et al. (ShortGPT): lowest block influence 1 − mean cos(h_in, h_out).
    Shortgpt,
    /// Gromov et al.: the n consecutive layers with the smallest last-token angular distance.
    Angular,
    /// MPruner: CKA clusters, non-first members by lowest gradient norm.
    Mpruner,
    /// Uniformly random layers, over several seeds (median and range).
    Random,
    /// SLEB-style reference: greedily remove the layer whose removal raises the calibration loss least
    /// (≈ L²/2 forward passes over all calibration tokens).
    Sleb,
}

impl Criterion {
    pub const ALL: [Criterion; 7] = [
        Criterion::Sglp,
        Criterion::SglpPaper,
        Criterion::Shortgpt,
        Criterion::Angular,
        Criterion::Mpruner,
        Criterion::Random,
        Criterion::Sleb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Criterion::Sglp => "sglp",
            Criterion::SglpPaper => "sglp-paper",
            Criterion::Shortgpt => "shortgpt",
            Criterion::Angular => "angular",
            Criterion::Mpruner => "mpruner",
            Criterion::Random => "random",
            Criterion::Sleb => "sleb",
        }
    }

    /// Statistics of the calibration pass this criterion reads (`sglp` is the engine's options').
    fn needs(self, sglp: &SglpOptions, paper: &SglpOptions) -> Needs {
        let none = Needs::default();
        match self {
            Criterion::Sglp => sglp.needs(),
            Criterion::SglpPaper => paper.needs(),
            Criterion::Shortgpt | Criterion::Angular => Needs {
                hidden: true,
                ..none
            },
            Criterion::Mpruner => Needs {
                cka: true,
                gradnorm: true,
                ..none
            },
            Criterion::Random => none,
            Criterion::Sleb => Needs {
                states: true,
                ..none
            },
        }
    }
}

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareSpec {
    /// Budgets (layers removed), ascending, each in 1..L.
    pub budgets: Vec<usize>,
    pub criteria: Vec<Criterion>,
    /// Options of the `sglp` criterion; `sglp-paper` uses the published preset with the same estimator
    /// and batch settings.
    pub sglp: SglpOptions,
    /// Seeds of the `random` criterion: `seed`, `seed + 1`, …
    pub seed: u64,
    pub random_seeds: usize,
    /// MPruner's starting threshold (CKA·100).
    pub mpruner_threshold: f64,
}

/// One criterion at one budget.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub remove: usize,
    pub removed: Vec<usize>,
    /// Held-out loss and perplexity (for `random`: of the median seed, and the range below).
    pub loss: f64,
    pub perplexity: f64,
    pub params: usize,
    /// `random` only: every seed's removed layers and held-out perplexity, and their range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random: Option<RandomBand>,
    /// Criterion-specific numbers (segments, scores, threshold used…).
    pub details: serde_json::Value,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RandomBand {
    pub seeds: Vec<u64>,
    pub removed: Vec<Vec<usize>>,
    pub perplexity: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// One criterion over the sweep.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Curve {
    pub criterion: Criterion,
    pub points: Vec<Point>,
    /// Seconds this criterion's own decisions took over the whole sweep (its extra forward passes
    /// included), not counting the shared calibration pass.
    pub decide_s: f64,
    /// Criterion-wide numbers (statistics shared by every budget).
    pub details: serde_json::Value,
}

/// `sglp-compare.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CompareReport {
    pub format: String,
    pub model: String,
    pub tokens: String,
    pub eval_tokens: String,
    pub num_layers: usize,
    pub calibration_sequences: usize,
    pub eval_sequences: usize,
    pub tokens_per_sequence: usize,
    pub budgets: Vec<usize>,
    pub baseline: Perplexity,
    pub params: usize,
    /// The shared calibration pass: seconds, and which statistics it gathered.
    pub calibration_pass_s: f64,
    pub calibration_pass: String,
    pub curves: Vec<Curve>,
    /// Seconds spent evaluating held-out perplexities.
    pub eval_s: f64,
    pub notes: Vec<String>,
}

impl CompareReport {
    /// The curve of a criterion, if it ran.
    pub fn curve(&self, c: Criterion) -> Option<&Curve> {
        self.curves.iter().find(|k| k.criterion == c)
    }
}

/// Parse a budget list: `N`, `A..B` (inclusive), or a comma-separated mix (`1,2,4..6`). Sorted, unique.
pub fn parse_budgets(s: &str) -> Result<Vec<usize>> {
    let bad = || {
        Error::invalid(format!(
            "--remove: expected N, A..B or a comma-separated list of them (got '{s}')"
        ))
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once("..") {
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b
                .trim()
                .trim_start_matches('=')
                .parse()
                .map_err(|_| bad())?;
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Per-layer parameter counts and the rest (embedding, final norm, head): what `params` is computed from.
#[derive(Clone, Debug)]
pub struct ParamCounts {
    pub other: usize,
    pub per_layer: Vec<usize>,
}

impl ParamCounts {
    pub fn total(&self) -> usize {
        self.other + self.per_layer.iter().sum::<usize>()
    }

    pub fn without(&self, removed: &[usize]) -> usize {
        self.total() - removed.iter().map(|&l| self.per_layer[l]).sum::<usize>()
    }
}

/// Held-out perplexities cached by removed set.
/// Held-out perplexities: a [`LossScorer`] over the held-out tokens (cached by removed set, resumed
/// from the unpruned network's kept layer inputs), and the time spent in it.
struct HeldOut<'a> {
    scorer: LossScorer<'a, Model>,
    tokens: &'a Tokens,
    seconds: f64,
}

impl HeldOut<'_> {
    fn eval(&mut self, removed: &[usize]) -> Result<Perplexity> {
        let t = Instant::now();
        let loss = self.scorer.loss(removed)?;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(Perplexity::from_loss(loss, self.tokens))
    }
}

fn median_index(v: &[f64]) -> usize {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx[(idx.len() - 1) / 2]
}

/// Run the suite. `names` are (model, tokens, eval tokens) as the report should show them.
pub fn compare(
    model: &Model,
    tokens: &Tokens,
    held: &Tokens,
    params: &ParamCounts,
    spec: &CompareSpec,
    backend: &mut dyn Backend,
    names: (&str, &str, &str),
) -> Result<CompareReport> {
    let l = model.num_layers();
    if spec.criteria.is_empty() {
        return Err(Error::invalid("--criteria lists no criterion"));
    }
    if spec.budgets.is_empty() {
        return Err(Error::invalid("no budget to compare at"));
    }
    for &b in &spec.budgets {
        super::pipeline::Budget::Remove(b).layers_to_remove(l)?;
    }
    if spec.criteria.contains(&Criterion::Random) && spec.random_seeds == 0 {
        return Err(Error::invalid("--seeds must be at least 1"));
    }
    let fb = spec.sglp.forward_batch;
    let paper = SglpOptions {
        cka: spec.sglp.cka,
        forward_batch: fb,
        gradnorm_batches: spec.sglp.gradnorm_batches,
        max_candidates: spec.sglp.max_candidates,
        ..SglpOptions::preset(Method::SglpPaper)
    };
    let needs = spec
        .criteria
        .iter()
        .fold(Needs::default(), |n, c| n | c.needs(&spec.sglp, &paper));
    let pass_opts = PassOptions {
        cka: spec.sglp.cka,
        forward_batch: fb,
        gradnorm_batches: spec.sglp.gradnorm_batches,
    };
    let t = Instant::now();
    let stats = calibration_pass(model, tokens, needs, &pass_opts, backend)?;
    let calibration_pass_s = t.elapsed().as_secs_f64();
    let mut held_out = HeldOut {
        scorer: LossScorer::new(model, held, None, fb)?,
        tokens: held,
        seconds: 0.0,
    };
    let baseline = held_out.eval(&[])?;
    let mut notes = Vec::new();
    let mut curves = Vec::new();
    for &c in &spec.criteria {
        let curve = run_criterion(
            c,
            model,
            tokens,
            &stats,
            spec,
            &paper,
            params,
            &mut held_out,
            &mut notes,
        )?;
        curves.push(curve);
    }
    Ok(CompareReport {
        format: COMPARE_FORMAT.into(),
        model: names.0.into(),
        tokens: names.1.into(),
        eval_tokens: names.2.into(),
        num_layers: l,
        calibration_sequences: tokens.sequences,
        eval_sequences: held.sequences,
        tokens_per_sequence: tokens.len,
        budgets: spec.budgets.clone(),
        baseline,
        params: params.total(),
        calibration_pass_s,
        calibration_pass: format!(
            "forward over {} calibration sequences{}{}{}",
            tokens.sequences,
            if needs.gradnorm {
                " + backward (gradient norms)"
            } else {
                ""
            },
            if needs.cka { ", CKA" } else { "" },
            if needs.hidden {
                ", hidden-state cosines"
            } else {
                ""
            },
        ),
        curves,
        eval_s: held_out.seconds,
        notes,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_criterion(
    c: Criterion,
    model: &Model,
    tokens: &Tokens,
    stats: &CalibrationStats,
    spec: &CompareSpec,
    paper: &SglpOptions,
    params: &ParamCounts,
    held_out: &mut HeldOut,
    notes: &mut Vec<String>,
) -> Result<Curve> {
    let start = Instant::now();
    let eval_before = held_out.seconds;
    let mut points = Vec::new();
    let mut curve_details = serde_json::Value::Null;
    let point = |removed: Vec<usize>,
                 remove: usize,
                 details: serde_json::Value,
                 held_out: &mut HeldOut|
     -> Result<Point> {
        let p = held_out.eval(&removed)?;
        Ok(Point {
            remove,
            params: params.without(&removed),
            removed,
            loss: p.loss,
            perplexity: p.perplexity,
            random: None,
            details,
        })
    };
    match c {
        Criterion::Sglp | Criterion::SglpPaper => {
            let opts = if c == Criterion::SglpPaper {
                paper
            } else {
                &spec.sglp
            };
            // Scorers per criterion, so that each one's time counts its own forward passes.
            let mut scoring = Scoring::new(model, tokens, opts)?;
            if let Some(base) = &stats.states {
                scoring.loss.seed(base);
                scoring.rank.seed(base);
            }
            for &n in &spec.budgets {
                let d = decide_from_stats(stats, model, tokens, n, opts, &mut scoring)?;
                let details = serde_json::json!({
                    "segments": d.segments,
                    "removed_per_segment": d.removed_per_segment,
                    "selection": opts.selection,
                    "allocation": opts.allocation,
                    "features": opts.features,
                    "k": d.segmentation.k,
                    "greedy_steps": d.greedy_steps,
                    "subset_search": d.subset_search,
                });
                points.push(point(d.removed.clone(), n, details, held_out)?);
            }
            if let Some(g) = &stats.gradnorm {
                curve_details = serde_json::json!({ "gradnorm": g.per_layer });
            }
        }
        Criterion::Shortgpt | Criterion::Angular => {
            let h = stats.hidden.as_ref().expect("gathered for this criterion");
            if c == Criterion::Shortgpt {
                let bi = h.block_influence();
                for &n in &spec.budgets {
                    points.push(point(
                        criteria::shortgpt(&bi, n),
                        n,
                        serde_json::Value::Null,
                        held_out,
                    )?);
                }
                curve_details = serde_json::json!({ "block_influence": bi });
            } else {
                for &n in &spec.budgets {
                    let ad = h.angular_distances(n)?;
                    let removed = criteria::angular(&ad, n);
                    points.push(point(
                        removed,
                        n,
                        serde_json::json!({ "angular_distance": ad }),
                        held_out,
                    )?);
                }
            }
        }
        Criterion::Mpruner => {
            let cka = stats.cka.as_ref().expect("gathered").cka_matrix();
            let g = &stats.gradnorm.as_ref().expect("gathered").per_layer;
            for &n in &spec.budgets {
                let m = criteria::mpruner(&cka, g, spec.mpruner_threshold, n)?;
                if m.threshold != spec.mpruner_threshold {
                    notes.push(format!(
                        "mpruner at {n}: clusters at threshold {} hold fewer than {n} removable \
                         layers; lowered to {}",
                        spec.mpruner_threshold, m.threshold
                    ));
                }
                let details = serde_json::to_value(&m).expect("serialises");
                points.push(point(m.removed, n, details, held_out)?);
            }
        }
        Criterion::Random => {
            let seeds: Vec<u64> = (0..spec.random_seeds as u64)
                .map(|i| spec.seed + i)
                .collect();
            for &n in &spec.budgets {
                let mut removed = Vec::new();
                let mut ppl = Vec::new();
                let mut losses = Vec::new();
                for &s in &seeds {
                    let r = criteria::random(model.num_layers(), n, s);
                    let p = held_out.eval(&r)?;
                    removed.push(r);
                    ppl.push(p.perplexity);
                    losses.push(p.loss);
                }
                let m = median_index(&ppl);
                let band = RandomBand {
                    seeds: seeds.clone(),
                    median: ppl[m],
                    min: ppl.iter().copied().fold(f64::INFINITY, f64::min),
                    max: ppl.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    removed: removed.clone(),
                    perplexity: ppl.clone(),
                };
                points.push(Point {
                    remove: n,
                    params: params.without(&removed[m]),
                    removed: removed[m].clone(),
                    loss: losses[m],
                    perplexity: ppl[m],
                    random: Some(band),
                    details: serde_json::Value::Null,
                });
            }
        }
        Criterion::Sleb => {
            // Greedy over all layers, no segments: the order is the same for every budget, so the
            // largest budget's run gives every prefix.
            let max = *spec.budgets.iter().max().expect("non-empty");
            let l = model.num_layers();
            let mut scorer = LossScorer::new(model, tokens, None, spec.sglp.forward_batch)?;
            if let Some(base) = &stats.states {
                scorer.seed(base);
            }
            let (_, steps) =
                greedy_removal(&[(0, l - 1)], &[l - 1], max, None, 0, &mut |set, c| {
                    scorer.score_step(set, c)
                })?;
            let order: Vec<usize> = steps.iter().map(|s| s.removed).collect();
            for &n in &spec.budgets {
                let mut removed = order[..n].to_vec();
                removed.sort_unstable();
                points.push(point(
                    removed,
                    n,
                    serde_json::json!({ "calibration_loss": steps[n - 1].score }),
                    held_out,
                )?);
            }
            curve_details = serde_json::json!({
                "order": order,
                "evaluations": scorer.evaluations,
                "whole_network_passes": scorer.layer_passes,
            });
        }
    }
    let eval_s = held_out.seconds - eval_before;
    let decide_s = (start.elapsed().as_secs_f64() - eval_s).max(0.0);
    Ok(Curve {
        criterion: c,
        points,
        decide_s,
        details: curve_details,
    })
}
