//! The SGLP decision on a model and calibration tokens: capture → CKA → segmentation → allocation →
//! gradient norms → selection; and the runtime passes around it (mean gradient norms, perplexity).

use super::allocate::{allocate, Allocation};
use super::select::{best_subsets, lowest_gradnorm, Selection, SubsetSearch};
use crate::error::{Error, Result};
use crate::io::{Batch, DType, LayerMeta};
use crate::runtime::{GradNorms, Model, Tokens};
use crate::segmentation::{segment_cka, Features, KChoice, SegmentResult};
use crate::similarity::{Backend, CkaAccumulator, CkaResult, CkaSpec};
use std::time::{Duration, Instant};

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
    /// Sequences per runtime pass (forward capture and forward + backward).
    pub forward_batch: usize,
    /// Calibration batches used for gradient norms (`None`: all).
    pub gradnorm_batches: Option<usize>,
}

/// Wall time of the decision's stages.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecisionTimes {
    pub capture: Duration,
    pub cka: Duration,
    pub segmentation: Duration,
    pub gradnorm: Duration,
}

/// Mean per-layer gradient norms over calibration batches.
#[derive(Clone, Debug, PartialEq)]
pub struct GradnormStats {
    pub per_layer: Vec<f64>,
    /// Mean over batches of the whole network's gradient norm √(Σ over all parameters).
    pub global: f64,
    pub loss: f64,
    pub batches: usize,
}

/// The SGLP decision and what it was made from.
#[derive(Clone, Debug)]
pub struct SglpDecision {
    pub cka: CkaResult,
    pub segmentation: SegmentResult,
    /// Segments as inclusive `[start, end]` layer indices.
    pub segments: Vec<(usize, usize)>,
    pub removed_per_segment: Vec<usize>,
    pub gradnorm: GradnormStats,
    pub subset_search: Vec<SubsetSearch>,
    pub removed: Vec<usize>,
    pub times: DecisionTimes,
    pub notes: Vec<String>,
}

/// Running sums of per-batch gradient norms; [`GradnormSum::mean`] gives the statistics.
struct GradnormSum {
    per_layer: Vec<f64>,
    global: f64,
    loss: f64,
    batches: usize,
}

impl GradnormSum {
    fn new(layers: usize) -> Self {
        GradnormSum {
            per_layer: vec![0.0; layers],
            global: 0.0,
            loss: 0.0,
            batches: 0,
        }
    }

    fn add(&mut self, g: &GradNorms) {
        let mut sq: f64 = g.per_layer.iter().map(|v| v * v).sum();
        sq += g.embed_tokens.powi(2) + g.norm.powi(2) + g.lm_head.unwrap_or(0.0).powi(2);
        for (a, v) in self.per_layer.iter_mut().zip(&g.per_layer) {
            *a += v;
        }
        self.global += sq.sqrt();
        self.loss += g.loss;
        self.batches += 1;
    }

    fn mean(&self) -> GradnormStats {
        let nb = self.batches.max(1) as f64;
        GradnormStats {
            per_layer: self.per_layer.iter().map(|v| v / nb).collect(),
            global: self.global / nb,
            loss: self.loss / nb,
            batches: self.batches,
        }
    }
}

/// How many calibration batches of `batch_seqs` sequences the gradient norms use.
fn gradnorm_batch_count(tokens: &Tokens, batch_seqs: usize, max_batches: Option<usize>) -> usize {
    let n = tokens.sequences.div_ceil(batch_seqs.max(1));
    max_batches.map_or(n, |m| n.min(m.max(1)))
}

/// Mean gradient norms over the first `max_batches` batches of `batch_seqs` sequences, with `skip`
/// bypassed. The per-batch loss is the mean next-token cross-entropy of that batch.
pub fn mean_grad_norms(
    model: &Model,
    tokens: &Tokens,
    batch_seqs: usize,
    max_batches: Option<usize>,
    skip: &[usize],
    show_progress: bool,
) -> Result<GradnormStats> {
    let batch_seqs = batch_seqs.max(1);
    let n_batches = gradnorm_batch_count(tokens, batch_seqs, max_batches);
    let mut sum = GradnormSum::new(model.num_layers());
    let pb = crate::progress::bar(n_batches as u64, "gradnorm batches");
    if !show_progress {
        pb.finish_and_clear();
    }
    for b in 0..n_batches {
        sum.add(&model.grad_norms(&tokens.batch(b * batch_seqs, batch_seqs), skip)?);
        if show_progress {
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(sum.mean())
}

/// Perplexity of the model with `skip` bypassed.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Perplexity {
    /// Mean next-token cross-entropy over every predicted position.
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted positions: sequences × (tokens − 1).
    pub predicted_tokens: usize,
}

/// exp(mean next-token cross-entropy) over all sequences, in batches of `batch_seqs`. Every sequence has
/// the same length, so weighting each batch's mean by its sequence count gives the exact token mean.
pub fn perplexity(
    model: &Model,
    tokens: &Tokens,
    batch_seqs: usize,
    skip: &[usize],
) -> Result<Perplexity> {
    let batch_seqs = batch_seqs.max(1);
    let n_batches = tokens.sequences.div_ceil(batch_seqs);
    let pb = crate::progress::bar(n_batches as u64, "eval batches");
    let mut sum = 0.0;
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        let loss = model.forward(&batch, skip, &mut |_, _| {})?;
        sum += loss * batch.sequences as f64;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let loss = sum / tokens.sequences as f64;
    Ok(Perplexity {
        loss,
        perplexity: loss.exp(),
        predicted_tokens: tokens.sequences * tokens.len.saturating_sub(1),
    })
}

/// The SGLP decision: which `budget` decoder layers to remove.
pub fn sglp_decide(
    model: &Model,
    tokens: &Tokens,
    budget: usize,
    opts: &SglpOptions,
    backend: &mut dyn Backend,
) -> Result<SglpDecision> {
    let l = model.num_layers();
    let mut times = DecisionTimes::default();
    let mut notes = Vec::new();

    // 1. One pass over the calibration batches: each batch's decoder outputs go into the CKA
    //    accumulator (tokens are the samples); the gradient-norm batches run forward + backward and
    //    their forward supplies the hidden states, the rest run forward only.
    let (cka, gradnorm) = capture_cka_and_gradnorms(model, tokens, opts, backend, &mut times)?;

    // 2. Segmentation. With --k auto, k stays ≤ L − budget so that no segment has to be emptied.
    let start = Instant::now();
    let k = match opts.k {
        KChoice::Auto { k_max, threshold } if k_max > l - budget => {
            notes.push(format!(
                "--k auto: k-max lowered from {k_max} to {} so that {budget} layers can go without \
                 emptying a segment",
                l - budget
            ));
            KChoice::Auto {
                k_max: l - budget,
                threshold,
            }
        }
        KChoice::Fixed(k) if k > l => {
            return Err(Error::invalid(format!(
                "--k {k} is larger than the model's {l} layers"
            )))
        }
        k => k,
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
    let removed_per_segment = allocate(&lens, budget, opts.allocation)
        .map_err(|e| Error::invalid(format!("{e} — choose a smaller --k or a smaller budget")))?;
    times.segmentation = start.elapsed();

    // 3. Gradient norms, and the selection inside each segment.
    let start = Instant::now();
    let (removed, subset_search) = match opts.selection {
        Selection::Gradnorm => (
            lowest_gradnorm(&segments, &removed_per_segment, &gradnorm.per_layer),
            Vec::new(),
        ),
        Selection::Subset => {
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
            best_subsets(
                &segments,
                &removed_per_segment,
                opts.max_candidates,
                &mut score,
            )?
        }
    };
    times.gradnorm += start.elapsed();
    Ok(SglpDecision {
        cka,
        segmentation,
        segments,
        removed_per_segment,
        gradnorm,
        subset_search,
        removed,
        times,
        notes,
    })
}

/// The fused calibration pass of [`sglp_decide`]: the all-pairs CKA of the decoder layers' outputs and
/// the mean gradient norms, from one forward (+ backward) per batch. Time spent in forward-only batches
/// counts as capture, in forward + backward batches as gradnorm, in the CKA accumulator as cka.
fn capture_cka_and_gradnorms(
    model: &Model,
    tokens: &Tokens,
    opts: &SglpOptions,
    backend: &mut dyn Backend,
    times: &mut DecisionTimes,
) -> Result<(CkaResult, GradnormStats)> {
    let (l, h) = (model.num_layers(), model.hidden_size());
    let batch_seqs = opts.forward_batch.max(1);
    let n_batches = tokens.sequences.div_ceil(batch_seqs);
    let n_gradnorm = gradnorm_batch_count(tokens, batch_seqs, opts.gradnorm_batches);
    let metas: Vec<LayerMeta> = model
        .layer_names()
        .into_iter()
        .map(|name| LayerMeta {
            name,
            cols: h,
            dtype: DType::F32,
            shape: vec![tokens.sequences, tokens.len, h],
        })
        .collect();
    let mut acc = CkaAccumulator::new(&metas, opts.cka, Some(tokens.sequences * tokens.len))?;
    let mut grads = GradnormSum::new(l);
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); l];
    let pb = crate::progress::bar(n_batches as u64, "calibration batches");
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        let mut keep = |i: usize, hs: &[f32]| {
            if i >= 1 {
                outs[i - 1].clear();
                outs[i - 1].extend_from_slice(hs);
            }
        };
        let t = Instant::now();
        if b < n_gradnorm {
            grads.add(&model.grad_norms_observed(&batch, &[], &mut keep)?);
            times.gradnorm += t.elapsed();
        } else {
            model.forward(&batch, &[], &mut keep)?;
            times.capture += t.elapsed();
        }
        let t = Instant::now();
        let layers: Vec<(usize, &[f32])> = outs.iter().map(|o| (h, &o[..])).collect();
        let rows = batch.sequences * batch.len;
        acc.push(&Batch::from_f32(rows, &layers).as_ref(), backend)?;
        times.cka += t.elapsed();
        pb.inc(1);
    }
    pb.finish_and_clear();
    let t = Instant::now();
    let cka = acc.finish(backend)?;
    times.cka += t.elapsed();
    Ok((cka, grads.mean()))
}
