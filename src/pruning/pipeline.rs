//! The SGLP decision on a model and calibration tokens: one calibration pass (CKA, and gradient norms or
//! hidden-state statistics as the selection needs) → segmentation → per-segment caps → selection.
//!
//! Two presets ([`Method`]): `sglp`, the engine's default, and `sglp-paper`, the chain as published.

use super::allocate::{caps, Allocation};
use super::calibration::{
    calibration_pass, mean_grad_norms, CalibrationStats, GradnormStats, LossScorer, Needs,
    PassOptions,
};
use super::select::{
    best_subsets, greedy_removal, lowest_under_caps, GreedyStep, Selection, SubsetSearch,
};
use crate::error::{Error, Result};
use crate::runtime::{Model, Tokens};
use crate::segmentation::{segment_cka, Features, KChoice, SegmentResult};
use crate::similarity::{Backend, CkaResult, CkaSpec};
use std::time::{Duration, Instant};

/// Sequences per runtime pass (forward, forward + backward, evaluation) unless told otherwise: every
/// command uses this one default, so that the same model gives the same gradient norms everywhere.
pub const DEFAULT_FORWARD_BATCH: usize = 4;

/// How many layers go: `--remove N` or `--target-layers M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Remove(usize),
    TargetLayers(usize),
}

impl Budget {
    /// The number of layers to remove from `num_layers`; at least one, and at least one layer kept.
    pub fn layers_to_remove(self, num_layers: usize) -> Result<usize> {
        let n = match self {
            Budget::Remove(n) => n,
            Budget::TargetLayers(m) => {
                if m == 0 || m >= num_layers {
                    return Err(Error::invalid(format!(
                        "--target-layers must be between 1 and {} for a model of {num_layers} layers \
                         (got {m})",
                        num_layers.saturating_sub(1)
                    )));
                }
                num_layers - m
            }
        };
        if n == 0 || n >= num_layers {
            return Err(Error::invalid(format!(
                "--remove must be between 1 and {} for a model of {num_layers} layers (got {n})",
                num_layers.saturating_sub(1)
            )));
        }
        Ok(n)
    }
}

/// The two SGLP presets.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The engine's default: CKA-row segments, then inside them, one layer at a time, the removal that
    /// raises the calibration loss least (candidates shortlisted per segment by block influence).
    #[default]
    Sglp,
    /// SGLP as published: column-sum features, the 5% rule (k ≤ 6), proportional allocation, subsets
    /// scored by the pruned network's gradient norm.
    #[value(name = "sglp-paper")]
    SglpPaper,
}

/// Everything the SGLP decision needs besides the model and the tokens.
#[derive(Clone, Debug)]
pub struct SglpOptions {
    pub cka: CkaSpec,
    pub features: Features,
    pub k: KChoice,
    pub min_len: usize,
    pub allocation: Allocation,
    pub selection: Selection,
    /// Candidate subsets per segment above which `--selection subset` goes greedy.
    pub max_candidates: usize,
    /// `--selection loss`: candidates per segment and step, those of lowest `shortlist_by` (0: all).
    pub shortlist: usize,
    /// `--selection loss`: what ranks a segment's layers for the shortlist.
    pub shortlist_by: Shortlist,
    /// `--selection loss`: calibration sequences the loss is measured on (`None`: all).
    pub score_sequences: Option<usize>,
    /// `--shortlist-by loss`: sequences the single-removal ranking is measured on (`None`: a quarter of
    /// the scoring sequences, at least one) — a ranking needs less precision than the choice itself.
    pub rank_sequences: Option<usize>,
    /// Sequences per runtime pass (forward capture and forward + backward).
    pub forward_batch: usize,
    /// Calibration batches used for gradient norms (`None`: all).
    pub gradnorm_batches: Option<usize>,
}

impl SglpOptions {
    /// The options of a preset, with the engine's default estimator and batch.
    pub fn preset(method: Method) -> SglpOptions {
        let base = SglpOptions {
            cka: CkaSpec::default(),
            features: Features::Rows,
            k: KChoice::Elbow { k_max: 8 },
            min_len: 1,
            allocation: Allocation::Open,
            selection: Selection::Loss,
            max_candidates: 64,
            shortlist: 2,
            shortlist_by: Shortlist::Loss,
            score_sequences: None,
            rank_sequences: None,
            forward_batch: DEFAULT_FORWARD_BATCH,
            gradnorm_batches: None,
        };
        match method {
            Method::Sglp => base,
            Method::SglpPaper => SglpOptions {
                features: Features::ColSum,
                k: KChoice::Auto {
                    k_max: 6,
                    threshold: 0.05,
                },
                allocation: Allocation::Proportional,
                selection: Selection::Subset,
                ..base
            },
        }
    }

    /// The statistics the calibration pass must gather for these options.
    pub fn needs(&self) -> Needs {
        Needs {
            cka: true,
            gradnorm: matches!(self.selection, Selection::Gradnorm | Selection::Subset),
            hidden: self.selection == Selection::Loss
                && self.shortlist > 0
                && self.shortlist_by == Shortlist::Influence,
            states: self.selection == Selection::Loss,
        }
    }

    pub fn pass_options(&self) -> PassOptions {
        PassOptions {
            cka: self.cka,
            forward_batch: self.forward_batch,
            gradnorm_batches: self.gradnorm_batches,
        }
    }
}

/// What ranks a segment's layers for the loss-guided shortlist.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Shortlist {
    /// The calibration loss with the layer removed alone (one forward per layer, once).
    #[default]
    Loss,
    /// ShortGPT's block influence 1 − mean cos(h_in, h_out) (free: from the calibration pass).
    Influence,
}

/// Wall time of the decision's stages.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecisionTimes {
    /// Forward-only calibration batches (hidden states for the CKA and the block influence).
    pub capture: Duration,
    pub cka: Duration,
    pub segmentation: Duration,
    /// Forward + backward passes (gradient norms; subset scoring).
    pub gradnorm: Duration,
    /// Loss-guided selection: one forward per candidate set.
    pub selection: Duration,
}

/// The SGLP decision and what it was made from.
#[derive(Clone, Debug)]
pub struct SglpDecision {
    pub cka: CkaResult,
    pub segmentation: SegmentResult,
    /// Segments as inclusive `[start, end]` layer indices.
    pub segments: Vec<(usize, usize)>,
    /// Layers removed from each segment.
    pub removed_per_segment: Vec<usize>,
    pub gradnorm: Option<GradnormStats>,
    /// ShortGPT's block influence 1 − mean cos(h_in, h_out) of each layer (when gathered).
    pub block_influence: Option<Vec<f64>>,
    /// Calibration loss with each layer removed alone (`--shortlist-by loss`).
    pub single_removal_loss: Option<Vec<f64>>,
    pub subset_search: Vec<SubsetSearch>,
    /// `--selection loss`: each step's candidates and their calibration losses.
    pub greedy_steps: Vec<GreedyStep>,
    /// Calibration loss of the unpruned model on the scoring sequences (`--selection loss`).
    pub score_baseline: Option<f64>,
    pub removed: Vec<usize>,
    pub times: DecisionTimes,
    pub notes: Vec<String>,
}

/// The calibration-loss scorers of the loss-guided selection: `loss` on the scoring sequences, `rank` on
/// the ranking sequences (the shortlist's single-removal losses). Shared across budgets in a sweep.
pub struct Scoring<'a> {
    pub loss: LossScorer<'a>,
    pub rank: LossScorer<'a>,
}

impl<'a> Scoring<'a> {
    pub fn new(model: &'a Model, tokens: &Tokens, opts: &SglpOptions) -> Self {
        let scored = opts
            .score_sequences
            .map_or(tokens.sequences, |s| s.clamp(1, tokens.sequences));
        let ranked = opts.rank_sequences.unwrap_or(scored.div_ceil(4)).max(1);
        Scoring {
            loss: LossScorer::new(model, tokens, Some(scored), opts.forward_batch),
            rank: LossScorer::new(model, tokens, Some(ranked), opts.forward_batch),
        }
    }

    /// Forward-pass equivalents run by both scorers, in passes over the scoring sequences.
    pub fn layer_passes(&self) -> f64 {
        self.loss.layer_passes
            + self.rank.layer_passes * self.rank.sequences() as f64 / self.loss.sequences() as f64
    }

    pub fn evaluations(&self) -> usize {
        self.loss.evaluations + self.rank.evaluations
    }
}

/// The SGLP decision: which `budget` decoder layers to remove.
pub fn sglp_decide(
    model: &Model,
    tokens: &Tokens,
    budget: usize,
    opts: &SglpOptions,
    backend: &mut dyn Backend,
) -> Result<SglpDecision> {
    let stats = calibration_pass(model, tokens, opts.needs(), &opts.pass_options(), backend)?;
    let mut scoring = Scoring::new(model, tokens, opts);
    if let Some(base) = &stats.states {
        scoring.loss.seed(base);
        scoring.rank.seed(base);
    }
    decide_from_stats(&stats, model, tokens, budget, opts, &mut scoring)
}

/// The decision from the statistics of a [`calibration_pass`] that gathered at least `opts.needs()`;
/// `scoring` measures calibration losses for `--selection loss` (shared across budgets in a sweep).
pub fn decide_from_stats(
    stats: &CalibrationStats,
    model: &Model,
    tokens: &Tokens,
    budget: usize,
    opts: &SglpOptions,
    scoring: &mut Scoring,
) -> Result<SglpDecision> {
    let l = model.num_layers();
    let need = opts.needs();
    let missing =
        |what: &str| Error::invalid(format!("the calibration pass did not gather {what}"));
    let cka = stats.cka.clone().ok_or_else(|| missing("the CKA"))?;
    let gradnorm = if need.gradnorm {
        Some(
            stats
                .gradnorm
                .clone()
                .ok_or_else(|| missing("gradient norms"))?,
        )
    } else {
        stats.gradnorm.clone()
    };
    let block_influence = match &stats.hidden {
        Some(h) => Some(h.block_influence()),
        None if need.hidden => return Err(missing("hidden-state statistics")),
        None => None,
    };
    let mut times = DecisionTimes {
        capture: stats.times.forward + stats.times.hidden,
        cka: stats.times.cka,
        gradnorm: stats.times.gradnorm,
        ..DecisionTimes::default()
    };
    // Segmentation and the per-segment caps.
    let start = Instant::now();
    let SegmentedBudget {
        segmentation,
        segments,
        caps,
        mut notes,
    } = segment_for_budget(&cka, budget, opts)?;
    times.segmentation = start.elapsed();

    // Selection inside the segments.
    let (mut subset_search, mut greedy_steps, mut score_baseline) = (Vec::new(), Vec::new(), None);
    let mut single_removal_loss = None;
    let removed = match opts.selection {
        Selection::Gradnorm => {
            let g = gradnorm.as_ref().expect("checked above");
            lowest_under_caps(&segments, &caps, budget, &g.per_layer)?
        }
        Selection::Loss => {
            let start = Instant::now();
            let (evaluations, passes) = (scoring.evaluations(), scoring.layer_passes());
            let scorer = &mut scoring.loss;
            score_baseline = Some(scorer.loss(&[])?);
            let proxy = match (opts.shortlist, opts.shortlist_by) {
                (0, _) => None,
                (_, Shortlist::Influence) => block_influence.clone(),
                (_, Shortlist::Loss) => {
                    // Only segments longer than the shortlist need a ranking.
                    let mut single = vec![f64::NAN; l];
                    for &(a, b) in segments
                        .iter()
                        .filter(|&&(a, b)| b - a + 1 > opts.shortlist)
                    {
                        for i in a..=b {
                            single[i] = scoring.rank.loss(&[i])?;
                        }
                    }
                    single_removal_loss = Some(single.clone());
                    Some(single)
                }
            };
            let (removed, steps) = greedy_removal(
                &segments,
                &caps,
                budget,
                proxy.as_deref(),
                opts.shortlist,
                &mut |set, candidate| scorer.score_step(set, candidate),
            )?;
            greedy_steps = steps;
            times.selection = start.elapsed();
            notes.push(format!(
                "loss-guided selection: {} evaluations over {} calibration sequences, ranking on {} \
                 ({:.1} whole-network passes of {} sequences with the shared prefixes)",
                scoring.evaluations() - evaluations,
                scoring.loss.sequences(),
                scoring.rank.sequences(),
                scoring.layer_passes() - passes,
                scoring.loss.sequences()
            ));
            removed
        }
        Selection::Subset => {
            if matches!(opts.allocation, Allocation::Adaptive | Allocation::Open) {
                return Err(Error::invalid(
                    "--selection subset needs a fixed per-segment count: use --allocation \
                     proportional or removable",
                ));
            }
            let start = Instant::now();
            let mut score = |skip: &[usize]| -> Result<f64> {
                Ok(mean_grad_norms(
                    model,
                    tokens,
                    opts.forward_batch,
                    opts.gradnorm_batches,
                    skip,
                    false,
                )?
                .global)
            };
            let (removed, search) =
                best_subsets(&segments, &caps, opts.max_candidates, &mut score)?;
            subset_search = search;
            times.gradnorm += start.elapsed();
            removed
        }
    };
    let removed_per_segment = segments
        .iter()
        .map(|&(a, b)| removed.iter().filter(|&&r| (a..=b).contains(&r)).count())
        .collect();
    Ok(SglpDecision {
        cka,
        segmentation,
        segments,
        removed_per_segment,
        gradnorm,
        block_influence,
        single_removal_loss,
        subset_search,
        greedy_steps,
        score_baseline,
        removed,
        times,
        notes,
    })
}

/// The segments of a decision and how many layers each may lose.
#[derive(Clone, Debug)]
pub struct SegmentedBudget {
    pub segmentation: SegmentResult,
    /// Segments as inclusive `[start, end]` layer indices.
    pub segments: Vec<(usize, usize)>,
    /// The most layers each segment may lose ([`caps`]).
    pub caps: Vec<usize>,
    pub notes: Vec<String>,
}

/// The first half of the decision, from the CKA alone: the segmentation (with `--k auto|elbow`, k stays
/// ≤ L − budget so that no segment has to be emptied) and the per-segment caps of `opts.allocation`.
pub fn segment_for_budget(
    cka: &CkaResult,
    budget: usize,
    opts: &SglpOptions,
) -> Result<SegmentedBudget> {
    let l = cka.layers.len();
    let mut notes = Vec::new();
    let k = match opts.k {
        KChoice::Fixed(k) if k > l => {
            return Err(Error::invalid(format!(
                "--k {k} is larger than the model's {l} layers"
            )))
        }
        k => match k.k_max() {
            Some(k_max) if k_max > l - budget => {
                notes.push(format!(
                    "--k {}: k-max lowered from {k_max} to {} so that {budget} layers can go without \
                     emptying a segment",
                    if matches!(k, KChoice::Elbow { .. }) {
                        "elbow"
                    } else {
                        "auto"
                    },
                    l - budget
                ));
                k.capped(l - budget)
            }
            _ => k,
        },
    };
    let segmentation = segment_cka(
        &cka.layers,
        &cka.cka_matrix(),
        opts.features,
        k,
        opts.min_len,
    )?;
    let segments: Vec<(usize, usize)> =
        segmentation.segments.iter().map(|s| (s[0], s[1])).collect();
    let lens: Vec<usize> = segments.iter().map(|&(a, b)| b - a + 1).collect();
    let caps = caps(&lens, budget, opts.allocation)
        .map_err(|e| Error::invalid(format!("{e} — choose a smaller --k or a smaller budget")))?;
    Ok(SegmentedBudget {
        segmentation,
        segments,
        caps,
        notes,
    })
}
