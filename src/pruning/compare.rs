//! The pruning-quality suite: every criterion on the same calibration data, over a sweep of budgets,
//! each pruned model's held-out quality measured with the removed units bypassed (no checkpoints): the
//! perplexity of a decoder ([`TokenHeldOut`]), the top-1 error of a CNN ([`ImageHeldOut`]).
//!
//! One calibration pass gathers what the criteria need (CKA, gradient norms, hidden-state statistics);
//! calibration losses of skip sets are cached, so SLEB's greedy order and the loss-guided SGLP pay for
//! each set once across the sweep; held-out perplexities are cached by removed set.

use super::calibration::{calibration_pass, CalibrationStats, LossScorer, Needs, PassOptions};
use super::criteria;
use super::pipeline::{decide_from_stats, Method, Scoring, SglpOptions};
use super::select::greedy_removal;
use crate::error::{Error, Result};
use crate::io::{Batch, DType, LayerMeta};
use crate::runtime::cnn::{CnnModel, Images};
use crate::runtime::{CalibrationData, Model, PrunableModel, Tokens};
use crate::similarity::{Backend, CkaAccumulator};
use std::collections::HashMap;
use std::time::Instant;

/// `/3`: the held-out quality is `value` in the report's `metric` (perplexity or top-1 error).
pub const COMPARE_FORMAT: &str = "sglp-compare/3";

/// The held-out quality a sweep reports; lower is better for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// exp(mean next-token cross-entropy) of a decoder.
    Perplexity,
    /// 100 · (1 − top-1 accuracy) of a classifier, in percent.
    Top1Error,
}

impl Metric {
    pub fn label(self) -> &'static str {
        match self {
            Metric::Perplexity => "held-out perplexity",
            Metric::Top1Error => "held-out top-1 error (%)",
        }
    }
}

/// Held-out loss and the metric's value.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quality {
    pub loss: f64,
    pub value: f64,
}

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
    /// Pons et al.'s CKA removal: score each layer by 1 − CKA(last layer's output with and without it)
    /// on the calibration data (one forward per layer); remove the lowest.
    #[value(name = "cka-removal")]
    CkaRemoval,
    /// SLEB-style reference: greedily remove the layer whose removal raises the calibration loss least
    /// (≈ L²/2 forward passes over all calibration tokens).
    Sleb,
}

impl Criterion {
    pub const ALL: [Criterion; 8] = [
        Criterion::Sglp,
        Criterion::SglpPaper,
        Criterion::Shortgpt,
        Criterion::Angular,
        Criterion::Mpruner,
        Criterion::Random,
        Criterion::CkaRemoval,
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
            Criterion::CkaRemoval => "cka-removal",
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
            Criterion::Random | Criterion::CkaRemoval => none,
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
    /// Held-out loss and the metric's value (for `random`: of the median seed, and the range below).
    pub loss: f64,
    pub value: f64,
    pub params: usize,
    /// `random` only: every seed's removed layers and held-out value, and their range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random: Option<RandomBand>,
    /// Criterion-specific numbers (segments, scores, threshold used…).
    pub details: serde_json::Value,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RandomBand {
    pub seeds: Vec<u64>,
    pub removed: Vec<Vec<usize>>,
    pub values: Vec<f64>,
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
    pub metric: Metric,
    pub baseline: Quality,
    pub params: usize,
    /// The shared calibration pass: seconds, and which statistics it gathered.
    pub calibration_pass_s: f64,
    pub calibration_pass: String,
    pub curves: Vec<Curve>,
    /// Seconds spent evaluating the held-out quality.
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

/// The held-out quality of the network with a set of units bypassed, cached by set.
pub trait HeldOutEval {
    fn metric(&self) -> Metric;
    fn eval(&mut self, removed: &[usize]) -> Result<Quality>;
    /// Items (sequences, images) evaluated.
    fn items(&self) -> usize;
    /// Seconds spent in `eval` so far.
    fn seconds(&self) -> f64;
}

/// Held-out perplexity of a decoder: a [`LossScorer`] over the held-out tokens (cached by removed set,
/// resumed from the unpruned network's kept layer inputs).
pub struct TokenHeldOut<'a> {
    scorer: LossScorer<'a, Model>,
    sequences: usize,
    seconds: f64,
}

impl<'a> TokenHeldOut<'a> {
    pub fn new(model: &'a Model, held: &Tokens, batch: usize) -> Result<Self> {
        Ok(TokenHeldOut {
            scorer: LossScorer::new(model, held, None, batch)?,
            sequences: held.sequences,
            seconds: 0.0,
        })
    }
}

impl HeldOutEval for TokenHeldOut<'_> {
    fn metric(&self) -> Metric {
        Metric::Perplexity
    }
    fn eval(&mut self, removed: &[usize]) -> Result<Quality> {
        let t = Instant::now();
        let loss = self.scorer.loss(removed)?;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(Quality {
            loss,
            value: loss.exp(),
        })
    }
    fn items(&self) -> usize {
        self.sequences
    }
    fn seconds(&self) -> f64 {
        self.seconds
    }
}

/// Held-out top-1 error of a CNN, cached by removed set.
pub struct ImageHeldOut<'a> {
    model: &'a CnnModel,
    images: &'a Images,
    batch: usize,
    cache: HashMap<Vec<usize>, Quality>,
    seconds: f64,
}

impl<'a> ImageHeldOut<'a> {
    pub fn new(model: &'a CnnModel, images: &'a Images, batch: usize) -> Self {
        ImageHeldOut {
            model,
            images,
            batch,
            cache: HashMap::new(),
            seconds: 0.0,
        }
    }
}

impl HeldOutEval for ImageHeldOut<'_> {
    fn metric(&self) -> Metric {
        Metric::Top1Error
    }
    fn eval(&mut self, removed: &[usize]) -> Result<Quality> {
        let mut key = removed.to_vec();
        key.sort_unstable();
        if let Some(&q) = self.cache.get(&key) {
            return Ok(q);
        }
        let t = Instant::now();
        let (acc, loss) = super::cnn::accuracy(self.model, self.images, self.batch, &key)?;
        self.seconds += t.elapsed().as_secs_f64();
        let q = Quality {
            loss,
            value: 100.0 * (1.0 - acc),
        };
        self.cache.insert(key, q);
        Ok(q)
    }
    fn items(&self) -> usize {
        self.images.n
    }
    fn seconds(&self) -> f64 {
        self.seconds
    }
}

fn median_index(v: &[f64]) -> usize {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx[(idx.len() - 1) / 2]
}

/// Run the suite. `names` are (model, calibration data, held-out data) as the report should show them.
/// Units that may not be removed (a CNN's downsampling blocks) are never candidates of any criterion.
pub fn compare<M: PrunableModel>(
    model: &M,
    tokens: &M::Data,
    held_out: &mut dyn HeldOutEval,
    params: &ParamCounts,
    spec: &CompareSpec,
    backend: &mut dyn Backend,
    names: (&str, &str, &str),
) -> Result<CompareReport> {
    let l = model.num_units();
    let removable = model.removable().iter().filter(|&&r| r).count();
    if spec.criteria.is_empty() {
        return Err(Error::invalid("--criteria lists no criterion"));
    }
    if spec.budgets.is_empty() {
        return Err(Error::invalid("no budget to compare at"));
    }
    for &b in &spec.budgets {
        super::pipeline::Budget::Remove(b).layers_to_remove(l)?;
        if b >= removable {
            return Err(Error::invalid(format!(
                "--remove {b}: only {removable} of the {l} units can be removed"
            )));
        }
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
        prefix_cache: spec.sglp.prefix_cache,
    };
    let t = Instant::now();
    let stats = calibration_pass(model, tokens, needs, &pass_opts, backend)?;
    let calibration_pass_s = t.elapsed().as_secs_f64();
    let baseline = held_out.eval(&[])?;
    let mut notes = Vec::new();
    let mut curves = Vec::new();
    let pb = crate::progress::bar(spec.criteria.len() as u64, "criteria");
    for &c in &spec.criteria {
        pb.set_message(c.name());
        let curve = run_criterion(
            c, model, tokens, &stats, spec, &paper, params, held_out, &mut notes,
        )?;
        curves.push(curve);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(CompareReport {
        format: COMPARE_FORMAT.into(),
        model: names.0.into(),
        tokens: names.1.into(),
        eval_tokens: names.2.into(),
        num_layers: l,
        calibration_sequences: tokens.items(),
        eval_sequences: held_out.items(),
        tokens_per_sequence: tokens.rows_per_item(),
        budgets: spec.budgets.clone(),
        metric: held_out.metric(),
        baseline,
        params: params.total(),
        calibration_pass_s,
        calibration_pass: format!(
            "forward over {} calibration items{}{}{}",
            tokens.items(),
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
        eval_s: held_out.seconds(),
        notes,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_criterion<M: PrunableModel>(
    c: Criterion,
    model: &M,
    tokens: &M::Data,
    stats: &CalibrationStats,
    spec: &CompareSpec,
    paper: &SglpOptions,
    params: &ParamCounts,
    held_out: &mut dyn HeldOutEval,
    notes: &mut Vec<String>,
) -> Result<Curve> {
    let start = Instant::now();
    let eval_before = held_out.seconds();
    let mut points = Vec::new();
    let mut curve_details = serde_json::Value::Null;
    // Candidate index → unit index: the units that may be removed.
    let cand: Vec<usize> = (0..model.num_units())
        .filter(|&u| model.removable()[u])
        .collect();
    let to_units = |set: &[usize]| -> Vec<usize> { set.iter().map(|&i| cand[i]).collect() };
    let point = |removed: Vec<usize>,
                 remove: usize,
                 details: serde_json::Value,
                 held_out: &mut dyn HeldOutEval|
     -> Result<Point> {
        let p = held_out.eval(&removed)?;
        Ok(Point {
            remove,
            params: params.without(&removed),
            removed,
            loss: p.loss,
            value: p.value,
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
            let full = stats.cka.as_ref().expect("gathered").cka_matrix();
            let cka: Vec<Vec<f64>> = cand
                .iter()
                .map(|&i| cand.iter().map(|&j| full[i][j]).collect())
                .collect();
            let g_all = &stats.gradnorm.as_ref().expect("gathered").per_layer;
            let g: Vec<f64> = cand.iter().map(|&u| g_all[u]).collect();
            for &n in &spec.budgets {
                let mut m = criteria::mpruner(&cka, &g, spec.mpruner_threshold, n)?;
                m.removed = to_units(&m.removed);
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
                    let r = to_units(&criteria::random(cand.len(), n, s));
                    let p = held_out.eval(&r)?;
                    removed.push(r);
                    ppl.push(p.value);
                    losses.push(p.loss);
                }
                let m = median_index(&ppl);
                let band = RandomBand {
                    seeds: seeds.clone(),
                    median: ppl[m],
                    min: ppl.iter().copied().fold(f64::INFINITY, f64::min),
                    max: ppl.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    removed: removed.clone(),
                    values: ppl.clone(),
                };
                points.push(Point {
                    remove: n,
                    params: params.without(&removed[m]),
                    removed: removed[m].clone(),
                    loss: losses[m],
                    value: ppl[m],
                    random: Some(band),
                    details: serde_json::Value::Null,
                });
            }
        }
        Criterion::CkaRemoval => {
            let scores = cka_removal_scores(model, tokens, &cand, spec)?;
            let mut order = cand.clone();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)));
            for &n in &spec.budgets {
                let mut removed = order[..n].to_vec();
                removed.sort_unstable();
                points.push(point(removed, n, serde_json::Value::Null, held_out)?);
            }
            curve_details = serde_json::json!({ "one_minus_cka": scores });
        }
        Criterion::Sleb => {
            // Greedy over all layers, no segments: the order is the same for every budget, so the
            // largest budget's run gives every prefix.
            let max = *spec.budgets.iter().max().expect("non-empty");
            let l = cand.len();
            let mut scorer = LossScorer::new(model, tokens, None, spec.sglp.forward_batch)?
                .with_budget(spec.sglp.prefix_cache_bytes());
            if let Some(base) = &stats.states {
                scorer.seed(base);
            }
            let (_, steps) =
                greedy_removal(&[(0, l - 1)], &[l - 1], max, None, 0, &mut |set, c| {
                    scorer.score_step(&to_units(set), cand[c])
                })?;
            let order: Vec<usize> = steps.iter().map(|s| cand[s.removed]).collect();
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
    let eval_s = held_out.seconds() - eval_before;
    let decide_s = (start.elapsed().as_secs_f64() - eval_s).max(0.0);
    Ok(Curve {
        criterion: c,
        points,
        decide_s,
        details: curve_details,
    })
}

/// Pons et al.'s score of each candidate unit: 1 − CKA(the last unit's output of the whole network, the
/// same with the unit bypassed), on the calibration data (NaN for units that are no candidates).
fn cka_removal_scores<M: PrunableModel>(
    model: &M,
    data: &M::Data,
    cand: &[usize],
    spec: &CompareSpec,
) -> Result<Vec<f64>> {
    let u = model.num_units();
    let width = *model.hidden_widths(data)?.last().expect("U + 1 widths");
    let rows_per_item = data.rows_per_item();
    let features = |skip: &[usize]| -> Result<Vec<f32>> {
        let mut all = Vec::new();
        let fb = spec.sglp.forward_batch.max(1);
        for first in (0..data.items()).step_by(fb) {
            let batch = data.batch(first, fb);
            model.loss(
                &batch,
                skip,
                Some(&mut |i, h| {
                    if i == u {
                        all.extend_from_slice(h);
                    }
                }),
            )?;
        }
        Ok(all)
    };
    let full = features(&[])?;
    let rows = data.items() * rows_per_item;
    let metas: Vec<LayerMeta> = ["full", "without"]
        .iter()
        .map(|n| LayerMeta {
            name: n.to_string(),
            cols: width,
            dtype: DType::F32,
            shape: vec![rows, width],
        })
        .collect();
    let mut cpu = crate::similarity::cpu::CpuBackend::new(0);
    let mut scores = vec![f64::NAN; u];
    for &c in cand {
        let without = features(&[c])?;
        // The accumulator re-batches the rows itself (the estimator's minibatches).
        let mut acc = CkaAccumulator::new(&metas, spec.sglp.cka, Some(rows))?;
        let both = Batch::from_f32(rows, &[(width, &full[..]), (width, &without[..])]);
        acc.push(&both.as_ref(), &mut cpu)?;
        scores[c] = 1.0 - acc.finish(&mut cpu)?.cka_matrix()[0][1];
    }
    Ok(scores)
}
