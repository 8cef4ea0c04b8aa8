//! The SGLP decision on a model and calibration tokens: one calibration pass (CKA, and gradient norms or
//! hidden-state statistics as the selection needs) → segmentation → per-segment caps → selection.
//!
//! Two presets ([`Method`]): `sglp`, the engine's default, and `sglp-paper`, the chain as published.

use super::allocate::{caps, Allocation};
use super::calibration::{
    calibration_pass, default_prefix_cache_bytes, mean_grad_norms, CalibrationStats, GradnormStats,
    LossScorer, Needs, PassOptions,
};
use super::select::{
    best_subsets, greedy_removal, lowest_under_caps, GreedyStep, Selection, SubsetSearch,
};
use crate::error::{Error, Result};
use crate::runtime::{CalibrationData, PrunableModel};
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
    /// `--selection loss`: bytes of resumable hidden states the loss scorers may keep (`None`:
    /// [`default_prefix_cache_bytes`]).
    pub prefix_cache: Option<usize>,
    /// Per-layer gradient norms measured elsewhere (`--gradnorm FILE`): `--selection gradnorm` uses them
    /// instead of running backward passes.
    pub gradnorm: Option<Vec<f64>>,
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
            prefix_cache: None,
            gradnorm: None,
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
            gradnorm: match self.selection {
                Selection::Gradnorm => self.gradnorm.is_none(),
                Selection::Subset => true,
                Selection::Loss => false,
            },
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
            prefix_cache: self.prefix_cache,
        }
    }

    /// The loss scorers' budget of resumable hidden states.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefix_cache.unwrap_or_else(default_prefix_cache_bytes)
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
pub struct Scoring<'a, M: PrunableModel> {
    pub loss: LossScorer<'a, M>,
    pub rank: LossScorer<'a, M>,
}

impl<'a, M: PrunableModel> Scoring<'a, M> {
    pub fn new(model: &'a M, tokens: &M::Data, opts: &SglpOptions) -> Result<Self> {
        let scored = opts
            .score_sequences
            .map_or(tokens.items(), |s| s.clamp(1, tokens.items()));
        let ranked = opts.rank_sequences.unwrap_or(scored.div_ceil(4)).max(1);
        let budget = opts.prefix_cache_bytes();
        Ok(Scoring {
            loss: LossScorer::new(model, tokens, Some(scored), opts.forward_batch)?
                .with_budget(budget),
            // The ranking scores single removals from the unpruned network: it never rebases.
            rank: LossScorer::new(model, tokens, Some(ranked), opts.forward_batch)?
                .with_budget(budget)
                .keep_pending(false),
        })
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
pub fn sglp_decide<M: PrunableModel>(
    model: &M,
    tokens: &M::Data,
    budget: usize,
    opts: &SglpOptions,
    backend: &mut dyn Backend,
) -> Result<SglpDecision> {
    let stats = calibration_pass(model, tokens, opts.needs(), &opts.pass_options(), backend)?;
    let mut scoring = Scoring::new(model, tokens, opts)?;
    if let Some(base) = &stats.states {
        scoring.loss.seed(base);
        scoring.rank.seed(base);
    }
    decide_from_stats(&stats, model, tokens, budget, opts, &mut scoring)
}

/// The decision from the statistics of a [`calibration_pass`] that gathered at least `opts.needs()`;
/// `scoring` measures calibration losses for `--selection loss` (shared across budgets in a sweep).
///
/// Units that may not be removed ([`PrunableModel::removable`]: a CNN's downsampling blocks) are no
/// candidates: the segmentation and the selection run over the removable units (the CKA restricted to
/// them), and the result is mapped back to unit indices.
pub fn decide_from_stats<M: PrunableModel>(
    stats: &CalibrationStats,
    model: &M,
    tokens: &M::Data,
    budget: usize,
    opts: &SglpOptions,
    scoring: &mut Scoring<M>,
) -> Result<SglpDecision> {
    let l = model.num_units();
    // Candidate index → unit index.
    let cand: Vec<usize> = (0..l).filter(|&u| model.removable()[u]).collect();
    let to_units = |set: &[usize]| -> Vec<usize> { set.iter().map(|&i| cand[i]).collect() };
    let need = opts.needs();
    let missing =
        |what: &str| Error::invalid(format!("the calibration pass did not gather {what}"));
    let cka = stats.cka.clone().ok_or_else(|| missing("the CKA"))?;
    let gradnorm = if let Some(g) = &opts.gradnorm {
        if g.len() != l {
            return Err(Error::invalid(format!(
                "{} precomputed gradient norms for a model of {l} layers",
                g.len()
            )));
        }
        // Measured elsewhere: no loss or global norm of this run.
        Some(GradnormStats {
            per_layer: g.clone(),
            global: f64::NAN,
            loss: f64::NAN,
            batches: 0,
        })
    } else if need.gradnorm {
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
    let mut notes = Vec::new();

    let start = Instant::now();
    let full = cka.cka_matrix();
    let sub: Vec<Vec<f64>> = cand
        .iter()
        .map(|&i| cand.iter().map(|&j| full[i][j]).collect())
        .collect();
    let names: Vec<String> = cand.iter().map(|&i| cka.layers[i].clone()).collect();
    if cand.len() < l {
        let fixed: Vec<&str> = (0..l)
            .filter(|u| !cand.contains(u))
            .map(|u| cka.layers[u].as_str())
            .collect();
        notes.push(format!(
            "{} of {l} units change the shape of their input and cannot be removed ({}); the \
             segmentation and the selection run over the {} others",
            fixed.len(),
            fixed.join(", "),
            cand.len()
        ));
    }
    let SegmentedBudget {
        mut segmentation,
        segments,
        caps,
    } = segment_for_budget(&names, &sub, budget, opts, &mut notes)?;
    times.segmentation = start.elapsed();
    // Unit-space views for the scorers.
    let on_units = |v: &[f64]| -> Vec<f64> { cand.iter().map(|&u| v[u]).collect() };

    // Selection inside the segments.
    let (mut subset_search, mut greedy_steps, mut score_baseline) = (Vec::new(), Vec::new(), None);
    let mut single_removal_loss = None;
    let removed = match opts.selection {
        Selection::Gradnorm => {
            let g = gradnorm.as_ref().expect("checked above");
            lowest_under_caps(&segments, &caps, budget, &on_units(&g.per_layer))?
        }
        Selection::Loss => {
            let start = Instant::now();
            let (evaluations, passes) = (scoring.evaluations(), scoring.layer_passes());
            let scorer = &mut scoring.loss;
            score_baseline = Some(scorer.loss(&[])?);
            // Only segments longer than the shortlist need a ranking.
            let ranked: Vec<(usize, usize)> = match (opts.shortlist, opts.shortlist_by) {
                (s, Shortlist::Loss) if s > 0 => segments
                    .iter()
                    .copied()
                    .filter(|&(a, b)| b - a + 1 > opts.shortlist)
                    .collect(),
                _ => Vec::new(),
            };
            // One unit per ranked layer, then one per removal step: each is one or more forward passes.
            let n_ranked: usize = ranked.iter().map(|&(a, b)| b - a + 1).sum();
            let pb =
                crate::progress::bar((n_ranked + budget) as u64, "loss-guided selection steps");
            let proxy = match (opts.shortlist, opts.shortlist_by) {
                (0, _) => None,
                (_, Shortlist::Influence) => block_influence.as_deref().map(on_units),
                (_, Shortlist::Loss) => {
                    let mut single = vec![f64::NAN; l];
                    for &(a, b) in &ranked {
                        for i in a..=b {
                            single[cand[i]] = scoring.rank.loss(&[cand[i]])?;
                            pb.inc(1);
                        }
                    }
                    let proxy = on_units(&single);
                    single_removal_loss = Some(single);
                    Some(proxy)
                }
            };
            let (removed, steps) = greedy_removal(
                &segments,
                &caps,
                budget,
                proxy.as_deref(),
                opts.shortlist,
                &mut |set, candidate| {
                    // `set`: the layers removed so far and this candidate.
                    pb.set_position((n_ranked + set.len().saturating_sub(1)) as u64);
                    scorer.score_step(&to_units(set), cand[candidate])
                },
            )?;
            pb.finish_and_clear();
            greedy_steps = steps
                .into_iter()
                .map(|s| GreedyStep {
                    removed: cand[s.removed],
                    score: s.score,
                    candidates: s.candidates.iter().map(|&(i, v)| (cand[i], v)).collect(),
                })
                .collect();
            times.selection = start.elapsed();
            let prefixes = if scoring.loss.resumes() {
                "with the shared prefixes".to_string()
            } else {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                format!(
                    "without the prefix cache: its hidden states take {:.1} GiB, more than half of \
                     its {:.1} GiB budget; a larger --prefix-cache-gib or fewer --score-sequences \
                     would resume each candidate at its first removed layer",
                    gib(scoring.loss.state_bytes()),
                    gib(scoring.loss.budget())
                )
            };
            notes.push(format!(
                "loss-guided selection: {} evaluations over {} calibration sequences, ranking on {} \
                 ({:.1} whole-network passes of {} sequences {prefixes})",
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
                    &to_units(skip),
                    false,
                )?
                .global)
            };
            let (removed, search) =
                best_subsets(&segments, &caps, opts.max_candidates, &mut score)?;
            subset_search = search
                .into_iter()
                .map(|s| SubsetSearch {
                    candidates: s
                        .candidates
                        .iter()
                        .map(|(set, v)| (to_units(set), *v))
                        .collect(),
                    ..s
                })
                .collect();
            times.gradnorm += start.elapsed();
            removed
        }
    };
    let removed_per_segment = per_segment(&segments, &removed);
    let removed = to_units(&removed);
    let segments: Vec<(usize, usize)> = segments.iter().map(|&(a, b)| (cand[a], cand[b])).collect();
    for (seg, &(a, b)) in segmentation.segments.iter_mut().zip(&segments) {
        *seg = [a, b];
    }
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

/// The segmentation of a decision and each segment's cap.
struct SegmentedBudget {
    segmentation: SegmentResult,
    /// Inclusive `[start, end]` layer indices.
    segments: Vec<(usize, usize)>,
    /// The most layers each segment may lose ([`caps`]).
    caps: Vec<usize>,
}

/// Segment `layers` by their similarity matrix `cka` for removing `budget` of them: with `--k auto|elbow`,
/// k-max is lowered to L − budget (noted) so that no segment has to be emptied; then the per-segment caps
/// of `opts.allocation`.
fn segment_for_budget(
    layers: &[String],
    cka: &[Vec<f64>],
    budget: usize,
    opts: &SglpOptions,
    notes: &mut Vec<String>,
) -> Result<SegmentedBudget> {
    let l = layers.len();
    if budget == 0 || budget >= l {
        return Err(Error::invalid(format!(
            "--remove must be between 1 and {} for {l} layers (got {budget})",
            l.saturating_sub(1)
        )));
    }
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
    let segmentation = segment_cka(layers, cka, opts.features, k, opts.min_len)?;
    let segments: Vec<(usize, usize)> =
        segmentation.segments.iter().map(|s| (s[0], s[1])).collect();
    let lens: Vec<usize> = segments.iter().map(|&(a, b)| b - a + 1).collect();
    let caps = caps(&lens, budget, opts.allocation)
        .map_err(|e| Error::invalid(format!("{e} — choose a smaller --k or a smaller budget")))?;
    Ok(SegmentedBudget {
        segmentation,
        segments,
        caps,
    })
}

/// The SGLP decision from a similarity matrix and per-layer importance measured elsewhere (no model):
/// segments, per-segment caps, and in each segment the layers of lowest `importance` — what `prune
/// --gradnorm FILE` decides, for `segment --gradnorm FILE --remove N`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportancePlan {
    pub budget: usize,
    pub allocation: Allocation,
    /// Inclusive `[start, end]` layer indices.
    pub segments: Vec<(usize, usize)>,
    pub removed_per_segment: Vec<usize>,
    pub removed: Vec<usize>,
    pub removed_layers: Vec<String>,
    pub kept: Vec<usize>,
    pub importance: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(skip)]
    pub segmentation: SegmentResult,
}

/// See [`ImportancePlan`]. `opts` supplies the features, k rule, minimum length and allocation.
pub fn plan_from_importance(
    layers: &[String],
    cka: &[Vec<f64>],
    importance: &[f64],
    budget: usize,
    opts: &SglpOptions,
) -> Result<ImportancePlan> {
    if importance.len() != layers.len() {
        return Err(Error::invalid(format!(
            "{} importance values for {} layers",
            importance.len(),
            layers.len()
        )));
    }
    let mut notes = Vec::new();
    let SegmentedBudget {
        segmentation,
        segments,
        caps,
    } = segment_for_budget(layers, cka, budget, opts, &mut notes)?;
    let removed = lowest_under_caps(&segments, &caps, budget, importance)?;
    Ok(ImportancePlan {
        budget,
        allocation: opts.allocation,
        removed_per_segment: per_segment(&segments, &removed),
        removed_layers: removed.iter().map(|&i| layers[i].clone()).collect(),
        kept: (0..layers.len()).filter(|i| !removed.contains(i)).collect(),
        removed,
        segments,
        importance: importance.to_vec(),
        notes,
        segmentation,
    })
}

/// How many of `removed` fall in each segment.
fn per_segment(segments: &[(usize, usize)], removed: &[usize]) -> Vec<usize> {
    segments
        .iter()
        .map(|&(a, b)| removed.iter().filter(|&&r| (a..=b).contains(&r)).count())
        .collect()
}
