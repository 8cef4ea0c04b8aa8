//! The runtime passes over calibration and held-out tokens that every decision is made from:
//!
//! * [`calibration_pass`]: one pass over the calibration batches gathers, as asked, the all-pairs CKA of
//!   the decoder outputs, the per-layer gradient norms (forward + backward) and the hidden-state
//!   statistics of ShortGPT / Gromov et al. ([`HiddenStats`]) — one forward per batch serves all three.
//! * [`LossScorer`]: the calibration loss of the model with a set of layers skipped, cached by set (the
//!   importance score of loss-guided selection and of the SLEB reference).
//! * [`perplexity`], [`mean_grad_norms`]: held-out perplexity and gradient norms with layers skipped.

use super::criteria::HiddenStats;
use crate::error::Result;
use crate::io::{Batch, DType, LayerMeta};
use crate::runtime::{GradNorms, Model, Tokens};
use crate::similarity::{Backend, CkaAccumulator, CkaResult, CkaSpec};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Mean per-layer gradient norms over calibration batches.
#[derive(Clone, Debug, PartialEq)]
pub struct GradnormStats {
    pub per_layer: Vec<f64>,
    /// Mean over batches of the whole network's gradient norm √(Σ over all parameters).
    pub global: f64,
    pub loss: f64,
    pub batches: usize,
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
    perplexity_with_progress(model, tokens, batch_seqs, skip, true)
}

fn perplexity_with_progress(
    model: &Model,
    tokens: &Tokens,
    batch_seqs: usize,
    skip: &[usize],
    show_progress: bool,
) -> Result<Perplexity> {
    let batch_seqs = batch_seqs.max(1);
    let n_batches = tokens.sequences.div_ceil(batch_seqs);
    let pb = crate::progress::bar(n_batches as u64, "eval batches");
    if !show_progress {
        pb.finish_and_clear();
    }
    let mut sum = 0.0;
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        let loss = model.forward(&batch, skip, &mut |_, _| {})?;
        sum += loss * batch.sequences as f64;
        if show_progress {
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let loss = sum / tokens.sequences as f64;
    Ok(Perplexity {
        loss,
        perplexity: loss.exp(),
        predicted_tokens: tokens.sequences * tokens.len.saturating_sub(1),
    })
}

/// Which statistics a [`calibration_pass`] gathers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub cka: bool,
    pub gradnorm: bool,
    pub hidden: bool,
}

impl std::ops::BitOr for Needs {
    type Output = Needs;
    fn bitor(self, o: Needs) -> Needs {
        Needs {
            cka: self.cka || o.cka,
            gradnorm: self.gradnorm || o.gradnorm,
            hidden: self.hidden || o.hidden,
        }
    }
}

/// How the calibration pass runs.
#[derive(Clone, Copy, Debug)]
pub struct PassOptions {
    pub cka: CkaSpec,
    /// Sequences per runtime pass.
    pub forward_batch: usize,
    /// Calibration batches used for gradient norms (`None`: all).
    pub gradnorm_batches: Option<usize>,
}

/// Wall time of the calibration pass's parts.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassTimes {
    /// Forward-only batches.
    pub forward: Duration,
    /// Forward + backward batches (their forward also gives the hidden states).
    pub gradnorm: Duration,
    /// CKA accumulation, without the forward passes.
    pub cka: Duration,
    /// Hidden-state statistics (cosines, angular distances).
    pub hidden: Duration,
}

/// What a [`calibration_pass`] gathered; a statistic not asked for is `None`.
pub struct CalibrationStats {
    pub cka: Option<CkaResult>,
    pub gradnorm: Option<GradnormStats>,
    pub hidden: Option<HiddenStats>,
    pub times: PassTimes,
}

/// One pass over the calibration batches. Each batch runs forward + backward when it is one of the
/// gradient-norm batches, else forward only (and not at all when neither CKA nor hidden statistics are
/// needed past the gradient-norm batches); its decoder outputs go into the CKA accumulator (tokens are the
/// samples) and its hidden states into the [`HiddenStats`].
pub fn calibration_pass(
    model: &Model,
    tokens: &Tokens,
    needs: Needs,
    opts: &PassOptions,
    backend: &mut dyn Backend,
) -> Result<CalibrationStats> {
    let (l, h) = (model.num_layers(), model.hidden_size());
    let batch_seqs = opts.forward_batch.max(1);
    let n_batches = tokens.sequences.div_ceil(batch_seqs);
    let n_gradnorm = if needs.gradnorm {
        gradnorm_batch_count(tokens, batch_seqs, opts.gradnorm_batches)
    } else {
        0
    };
    let n_run = if needs.cka || needs.hidden {
        n_batches
    } else {
        n_gradnorm
    };
    let mut acc = if needs.cka {
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
        Some(CkaAccumulator::new(
            &metas,
            opts.cka,
            Some(tokens.sequences * tokens.len),
        )?)
    } else {
        None
    };
    let mut hidden = needs.hidden.then(|| HiddenStats::new(l));
    let mut grads = GradnormSum::new(l);
    let mut times = PassTimes::default();
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); if needs.cka { l } else { 0 }];
    let pb = crate::progress::bar(n_run as u64, "calibration batches");
    for b in 0..n_run {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        if let Some(st) = hidden.as_mut() {
            st.begin_batch(batch.sequences, batch.len, h);
        }
        let mut err = None;
        let mut hidden_time = Duration::ZERO;
        let mut keep = |i: usize, hs: &[f32]| {
            if i >= 1 && needs.cka {
                outs[i - 1].clear();
                outs[i - 1].extend_from_slice(hs);
            }
            if let Some(st) = hidden.as_mut() {
                let t = Instant::now();
                if err.is_none() {
                    err = st.observe(i, hs).err();
                }
                hidden_time += t.elapsed();
            }
        };
        let t = Instant::now();
        if b < n_gradnorm {
            grads.add(&model.grad_norms_observed(&batch, &[], &mut keep)?);
            times.gradnorm += t.elapsed().saturating_sub(hidden_time);
        } else {
            model.forward(&batch, &[], &mut keep)?;
            times.forward += t.elapsed().saturating_sub(hidden_time);
        }
        times.hidden += hidden_time;
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(st) = hidden.as_mut() {
            let t = Instant::now();
            st.end_batch()?;
            times.hidden += t.elapsed();
        }
        if let Some(acc) = acc.as_mut() {
            let t = Instant::now();
            let layers: Vec<(usize, &[f32])> = outs.iter().map(|o| (h, &o[..])).collect();
            let rows = batch.sequences * batch.len;
            acc.push(&Batch::from_f32(rows, &layers).as_ref(), backend)?;
            times.cka += t.elapsed();
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let cka = match acc {
        Some(acc) => {
            let t = Instant::now();
            let r = acc.finish(backend)?;
            times.cka += t.elapsed();
            Some(r)
        }
        None => None,
    };
    Ok(CalibrationStats {
        cka,
        gradnorm: needs.gradnorm.then(|| grads.mean()),
        hidden,
        times,
    })
}

/// The mean next-token loss on (the first `sequences` of) the calibration tokens with a set of decoder
/// layers skipped, one forward per distinct set; results are cached by set, so a sweep over budgets pays
/// for each set once.
pub struct LossScorer<'a> {
    model: &'a Model,
    tokens: Tokens,
    batch_seqs: usize,
    cache: HashMap<Vec<usize>, f64>,
    /// Forward passes over the scoring tokens run so far (cache misses).
    pub evaluations: usize,
    /// Time spent in them.
    pub time: Duration,
}

impl<'a> LossScorer<'a> {
    /// Scores on the first `sequences` calibration sequences (`None`: all of them).
    pub fn new(
        model: &'a Model,
        tokens: &Tokens,
        sequences: Option<usize>,
        batch_seqs: usize,
    ) -> Self {
        let n = sequences.map_or(tokens.sequences, |s| s.clamp(1, tokens.sequences));
        LossScorer {
            model,
            tokens: tokens.batch(0, n),
            batch_seqs: batch_seqs.max(1),
            cache: HashMap::new(),
            evaluations: 0,
            time: Duration::ZERO,
        }
    }

    /// Sequences scored per evaluation.
    pub fn sequences(&self) -> usize {
        self.tokens.sequences
    }

    /// The loss with `skip` (any order) bypassed.
    pub fn loss(&mut self, skip: &[usize]) -> Result<f64> {
        let mut key = skip.to_vec();
        key.sort_unstable();
        key.dedup();
        if let Some(&v) = self.cache.get(&key) {
            return Ok(v);
        }
        let t = Instant::now();
        let p = perplexity_with_progress(self.model, &self.tokens, self.batch_seqs, &key, false)?;
        self.time += t.elapsed();
        self.evaluations += 1;
        self.cache.insert(key, p.loss);
        Ok(p.loss)
    }
}
