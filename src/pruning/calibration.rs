//! The runtime passes over calibration and held-out tokens that every decision is made from:
//!
//! * [`calibration_pass`]: one pass over the calibration batches gathers, as asked, the all-pairs CKA of
//!   the decoder outputs, the per-layer gradient norms (forward + backward) and the hidden-state
//!   statistics of ShortGPT / Gromov et al. ([`HiddenStats`]) — one forward per batch serves all three.
//! * [`LossScorer`]: the calibration loss of the model with a set of layers skipped, cached by set (the
//!   importance score of loss-guided selection and of the SLEB reference).
//! * [`perplexity`], [`mean_grad_norms`]: held-out perplexity and gradient norms with layers skipped.

use super::criteria::HiddenStats;
use crate::error::{Error, Result};
use crate::io::{Batch, DType, LayerMeta};
use crate::runtime::{CalibrationData, Model, OnHidden, PrunableModel, Tokens, UnitGrads};
use crate::similarity::{Backend, CkaAccumulator, CkaResult, CkaSpec};
use std::collections::HashMap;
use std::sync::Arc;
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

    fn add(&mut self, g: &UnitGrads) {
        let mut sq: f64 = g.per_unit.iter().map(|v| v * v).sum();
        sq += g.rest.powi(2);
        for (a, v) in self.per_layer.iter_mut().zip(&g.per_unit) {
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

/// How many calibration batches of `batch_seqs` items the gradient norms use.
fn gradnorm_batch_count(
    data: &impl CalibrationData,
    batch_seqs: usize,
    max_batches: Option<usize>,
) -> usize {
    let n = data.items().div_ceil(batch_seqs.max(1));
    max_batches.map_or(n, |m| n.min(m.max(1)))
}

/// Mean gradient norms over the first `max_batches` batches of `batch_seqs` items (sequences, images),
/// with `skip` bypassed. The per-batch loss is the batch's mean loss (next-token or class
/// cross-entropy).
pub fn mean_grad_norms<M: PrunableModel>(
    model: &M,
    tokens: &M::Data,
    batch_seqs: usize,
    max_batches: Option<usize>,
    skip: &[usize],
    show_progress: bool,
) -> Result<GradnormStats> {
    let batch_seqs = batch_seqs.max(1);
    let n_batches = gradnorm_batch_count(tokens, batch_seqs, max_batches);
    let mut sum = GradnormSum::new(model.num_units());
    let pb = crate::progress::bar(n_batches as u64, "gradnorm batches");
    if !show_progress {
        pb.finish_and_clear();
    }
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        sum.add(&model.unit_grads(&batch, skip, None)?);
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

impl Perplexity {
    /// The perplexity of a token-mean `loss` over all of `tokens`.
    pub fn from_loss(loss: f64, tokens: &Tokens) -> Perplexity {
        Perplexity {
            loss,
            perplexity: loss.exp(),
            predicted_tokens: tokens.sequences * tokens.len.saturating_sub(1),
        }
    }
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
        let loss = model.forward(&batch, skip, None)?;
        sum += loss * batch.sequences as f64;
        if show_progress {
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(Perplexity::from_loss(sum / tokens.sequences as f64, tokens))
}

/// Which statistics a [`calibration_pass`] gathers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub cka: bool,
    pub gradnorm: bool,
    pub hidden: bool,
    /// Every decoder layer's input per batch and the unpruned loss: the [`LossScorer`]'s starting base,
    /// so that it need not run the unpruned network again.
    pub states: bool,
}

impl std::ops::BitOr for Needs {
    type Output = Needs;
    fn bitor(self, o: Needs) -> Needs {
        Needs {
            cka: self.cka || o.cka,
            gradnorm: self.gradnorm || o.gradnorm,
            hidden: self.hidden || o.hidden,
            states: self.states || o.states,
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
    /// Bytes of resumable hidden states the loss scorers may keep (`None`:
    /// [`default_prefix_cache_bytes`]); the pass keeps the unpruned network's when they take at most
    /// half of it.
    pub prefix_cache: Option<usize>,
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
    /// Per batch of `forward_batch` sequences, the input of every decoder layer of the unpruned network,
    /// and the batch's mean calibration loss (when asked and within half of [`PassOptions::prefix_cache`]).
    pub states: Option<BaseStates>,
    pub times: PassTimes,
}

/// Per batch, the input of every decoder layer (index l: the input of layer l).
pub type LayerInputs = Vec<Vec<Arc<Vec<f32>>>>;

/// The unpruned network's layer inputs over the calibration batches, and each batch's mean loss.
#[derive(Clone)]
pub struct BaseStates {
    pub batch_seqs: usize,
    pub inputs: LayerInputs,
    pub batch_losses: Vec<f64>,
}

/// One pass over the calibration batches. Each batch runs forward + backward when it is one of the
/// gradient-norm batches, else forward only (and not at all when neither CKA nor hidden statistics are
/// needed past the gradient-norm batches); its decoder outputs go into the CKA accumulator (tokens are the
/// samples) and its hidden states into the [`HiddenStats`].
pub fn calibration_pass<M: PrunableModel>(
    model: &M,
    tokens: &M::Data,
    needs: Needs,
    opts: &PassOptions,
    backend: &mut dyn Backend,
) -> Result<CalibrationStats> {
    let l = model.num_units();
    let widths = model.hidden_widths(tokens)?;
    let (items, rows_per_item) = (tokens.items(), tokens.rows_per_item());
    if needs.hidden && widths.iter().any(|&w| w != widths[0]) {
        return Err(Error::invalid(
            "the block influence (ShortGPT) compares a unit's input and output, which needs units that              keep the width: not this model (--shortlist-by loss instead)",
        ));
    }
    let h = widths[0];
    let batch_seqs = opts.forward_batch.max(1);
    let n_batches = items.div_ceil(batch_seqs);
    let n_gradnorm = if needs.gradnorm {
        gradnorm_batch_count(tokens, batch_seqs, opts.gradnorm_batches)
    } else {
        0
    };
    let n_run = if needs.cka || needs.hidden || needs.states {
        n_batches
    } else {
        n_gradnorm
    };
    let mut acc = if needs.cka {
        let metas: Vec<LayerMeta> = model
            .unit_names()
            .into_iter()
            .zip(&widths[1..])
            .map(|(name, &cols)| LayerMeta {
                name,
                cols,
                dtype: DType::F32,
                shape: if rows_per_item > 1 {
                    vec![items, rows_per_item, cols]
                } else {
                    vec![items, cols]
                },
            })
            .collect();
        Some(CkaAccumulator::new(
            &metas,
            opts.cka,
            Some(items * rows_per_item),
        )?)
    } else {
        None
    };
    let mut hidden = needs.hidden.then(|| HiddenStats::new(l));
    let mut grads = GradnormSum::new(l);
    let mut times = PassTimes::default();
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); if needs.cka { l } else { 0 }];
    let keep_states = needs.states
        && model.can_resume()
        && input_bytes(items * rows_per_item, &widths[..l])
            <= opts.prefix_cache.unwrap_or_else(default_prefix_cache_bytes) / 2;
    let mut inputs: LayerInputs = Vec::new();
    let mut batch_losses = Vec::new();
    // When the CKA is the only reader of the hidden states and runs on a GPU, the units' outputs go
    // from the model's GPU memory straight into it (if the model runs on that GPU; else `None` below
    // and the host path).
    let in_place = acc
        .as_ref()
        .is_some_and(CkaAccumulator::reads_device_in_place);
    let mut device_cka = (in_place && !needs.hidden && !keep_states)
        .then(|| backend.as_cuda().map(|g| g.ordinal()))
        .flatten();
    let pb = crate::progress::bar(n_run as u64, "calibration batches");
    for b in 0..n_run {
        let batch = tokens.batch(b * batch_seqs, batch_seqs);
        if let (Some(ordinal), Some(acc)) = (device_cka, acc.as_mut()) {
            let t = Instant::now();
            let mut cka_time = Duration::ZERO;
            let mut sink = |db: &crate::similarity::cuda::DeviceBatch| -> Result<()> {
                let t = Instant::now();
                // SAFETY: the model hands over its outputs on GPU `ordinal` (the backend's), written
                // and synchronised, valid for this call: push_device's contract.
                let r = unsafe { acc.push_device(db, backend) };
                cka_time += t.elapsed();
                r
            };
            match model.pass_to_device(&batch, b < n_gradnorm, ordinal, &mut sink)? {
                Some((loss, g)) => {
                    batch_losses.push(loss);
                    let spent = t.elapsed().saturating_sub(cka_time);
                    match g {
                        Some(g) => {
                            grads.add(&g);
                            times.gradnorm += spent;
                        }
                        None => times.forward += spent,
                    }
                    times.cka += cka_time;
                    pb.inc(1);
                    continue;
                }
                None => device_cka = None,
            }
        }
        if let Some(st) = hidden.as_mut() {
            st.begin_batch(batch.items(), rows_per_item, h);
        }
        let mut err = None;
        let mut hidden_time = Duration::ZERO;
        let mut layer_inputs: Vec<Arc<Vec<f32>>> = Vec::new();
        let mut keep = |i: usize, hs: &[f32]| {
            if keep_states && i < l {
                layer_inputs.push(Arc::new(hs.to_vec()));
            }
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
        // Nobody reads the hidden states: no callback, so that a GPU does not copy them out.
        let wants_hidden = keep_states || needs.cka || needs.hidden;
        let on_hidden: OnHidden<'_> = if wants_hidden { Some(&mut keep) } else { None };
        let t = Instant::now();
        if b < n_gradnorm {
            let g = model.unit_grads(&batch, &[], on_hidden)?;
            batch_losses.push(g.loss);
            grads.add(&g);
            times.gradnorm += t.elapsed().saturating_sub(hidden_time);
        } else {
            batch_losses.push(model.loss(&batch, &[], on_hidden)?);
            times.forward += t.elapsed().saturating_sub(hidden_time);
        }
        if keep_states {
            inputs.push(layer_inputs);
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
            let layers: Vec<(usize, &[f32])> = outs
                .iter()
                .zip(&widths[1..])
                .map(|(o, &w)| (w, &o[..]))
                .collect();
            let rows = batch.items() * rows_per_item;
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
    let states = (keep_states && n_run == n_batches).then_some(BaseStates {
        batch_seqs,
        inputs,
        batch_losses,
    });
    Ok(CalibrationStats {
        cka,
        gradnorm: needs.gradnorm.then(|| grads.mean()),
        hidden,
        states,
        times,
    })
}

/// Bytes of f32 layer inputs of `rows` rows, one layer per width.
fn input_bytes(rows: usize, widths: &[usize]) -> usize {
    rows.saturating_mul(widths.iter().sum::<usize>())
        .saturating_mul(4)
}

/// The least default budget of the loss scorers' resumable hidden states ([`default_prefix_cache_bytes`]).
pub const PREFIX_CACHE_MIN_BYTES: usize = 2 << 30;

/// The default budget of resumable hidden states ([`LossScorer`]: the base's, up to half, and the
/// evaluated sets' of the current step): 40 % of the memory available when first asked (Linux
/// `MemAvailable`), at least [`PREFIX_CACHE_MIN_BYTES`]. Beyond the budget every evaluation runs the
/// whole network, which for a model of 16 or 32 layers costs about twice the layer passes (a 1B model
/// on 64 × 512 calibration tokens keeps 4.3 GB; an 8B one 17 GB). Measured once per process, before the
/// caches fill it; `prune` / `compare --prefix-cache-gib` set it instead.
pub fn default_prefix_cache_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let available = crate::similarity::available_memory().unwrap_or(0);
        usize::try_from(available / 5 * 2)
            .unwrap_or(usize::MAX)
            .max(PREFIX_CACHE_MIN_BYTES)
    })
}

/// The mean next-token loss on (the first `sequences` of) the calibration tokens with a set of decoder
/// layers skipped; results are cached by set, so a sweep over budgets pays for each set once.
///
/// Evaluations resume from a shared prefix: the scorer keeps the input of every decoder layer for the
/// network with a *base* set skipped (the layers removed so far, see [`LossScorer::rebase`]), and a set
/// that differs from the base first at layer s runs only layers s.. and the head — exact, since both
/// networks agree before s. Memory: L × tokens × hidden floats (half the budget at most, else whole
/// forwards: [`LossScorer::with_budget`], [`default_prefix_cache_bytes`]).
pub struct LossScorer<'a, M: PrunableModel> {
    model: &'a M,
    tokens: M::Data,
    /// Values per row of hidden states `0..=U`.
    widths: Vec<usize>,
    batch_seqs: usize,
    cache: HashMap<Vec<usize>, f64>,
    /// The base set and, per batch, the input of every decoder layer of the network without it.
    base: Vec<usize>,
    states: Option<LayerInputs>,
    prefix: bool,
    /// Sets evaluated since the last rebase, with the layer inputs their runs produced (from their first
    /// difference from the base on), while they fit in the budget: rebasing onto one of them is free.
    pending: HashMap<Vec<usize>, (usize, LayerInputs)>,
    pending_bytes: usize,
    /// Bytes of layer inputs this scorer may keep (the base's: half; the pending sets': the other half).
    budget: usize,
    /// Whether evaluated sets keep their layer inputs for a later [`LossScorer::rebase`] onto them.
    keep_pending: bool,
    /// Evaluations run so far (cache misses).
    pub evaluations: usize,
    /// Decoder layers run by them, over all batches, in units of one whole network (L layers): the
    /// forward-pass equivalents the prefix cache left to pay.
    pub layer_passes: f64,
}

impl<'a, M: PrunableModel> LossScorer<'a, M> {
    /// Scores on the first `sequences` calibration items (`None`: all of them).
    pub fn new(
        model: &'a M,
        tokens: &M::Data,
        sequences: Option<usize>,
        batch_seqs: usize,
    ) -> Result<Self> {
        let n = sequences.map_or(tokens.items(), |s| s.clamp(1, tokens.items()));
        let tokens = tokens.batch(0, n);
        let widths = model.hidden_widths(&tokens)?;
        let scorer = LossScorer {
            model,
            tokens,
            widths,
            batch_seqs: batch_seqs.max(1),
            cache: HashMap::new(),
            base: Vec::new(),
            states: None,
            prefix: false,
            pending: HashMap::new(),
            pending_bytes: 0,
            budget: 0,
            // Keeping a set's inputs costs a host copy of every hidden state it computes: cheap where
            // they are on the host already, a device-to-host copy per layer on a GPU — dearer there than
            // the one partial forward a rebase onto an unkept set costs.
            keep_pending: model.hidden_on_host(),
            evaluations: 0,
            layer_passes: 0.0,
        };
        Ok(scorer.with_budget(default_prefix_cache_bytes()))
    }

    /// Keep at most `bytes` of layer inputs (the default: [`default_prefix_cache_bytes`]); the prefix
    /// cache is on when the base's take at most half. Call before the first evaluation.
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self.prefix = self.model.can_resume() && self.state_bytes() <= bytes / 2;
        self
    }

    /// Bytes of the layer inputs of one network on the scoring sequences (what the base keeps).
    pub fn state_bytes(&self) -> usize {
        self.inputs_bytes(0)
    }

    /// The budget of kept layer inputs ([`LossScorer::with_budget`]).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Whether evaluations resume from kept layer inputs (the model can resume and the base's inputs fit
    /// half the budget).
    pub fn resumes(&self) -> bool {
        self.prefix
    }

    /// Whether evaluated sets keep their layer inputs so that a later [`LossScorer::rebase`] onto one of
    /// them is free (default: where the model's hidden states are on the host). Off for a scorer that
    /// never rebases (single removals from the unpruned base).
    pub fn keep_pending(mut self, on: bool) -> Self {
        self.keep_pending = on && self.model.hidden_on_host();
        self
    }

    /// Items (sequences, images) scored per evaluation.
    pub fn sequences(&self) -> usize {
        self.tokens.items()
    }

    /// Start from the unpruned network's layer inputs of a calibration pass (no forward of its own),
    /// when this scorer's batches are the pass's first ones (same batch size; the scorer's sequences are
    /// the first of the calibration set); else a no-op.
    pub fn seed(&mut self, base: &BaseStates) {
        let n = self.batches();
        let items = self.tokens.items();
        let seqs = |b: usize| self.batch_seqs.min(items - b * self.batch_seqs);
        let rows = self.tokens.rows_per_item();
        let fits = self.prefix
            && self.states.is_none()
            && base.batch_seqs == self.batch_seqs
            && base.inputs.len() >= n
            && base.batch_losses.len() >= n
            && base.inputs[..n].iter().enumerate().all(|(b, layers)| {
                layers.len() == self.model.num_units()
                    && layers
                        .iter()
                        .zip(&self.widths)
                        .all(|(h, &w)| h.len() == seqs(b) * rows * w)
            });
        if fits {
            // The item mean of the batch means, summed as `run` sums them.
            let sum: f64 = (0..n).map(|b| base.batch_losses[b] * seqs(b) as f64).sum();
            let loss = sum / items as f64;
            self.states = Some(base.inputs[..n].to_vec());
            self.base = Vec::new();
            self.cache.insert(Vec::new(), loss);
        }
    }

    fn batches(&self) -> usize {
        self.tokens.items().div_ceil(self.batch_seqs)
    }

    /// Run every batch with `skip`, from layer `start` (the base's states) or from the embedding. With
    /// `keep`, also returns the inputs of layers `start+1..L` (all of them from 0 when `start` is 0 and no
    /// states exist yet) per batch, indexed by layer (empty below). Returns the token-mean loss.
    fn run(&mut self, skip: &[usize], start: usize, keep: bool) -> Result<(f64, LayerInputs)> {
        let l = self.model.num_units();
        let mut sum = 0.0;
        let mut out = Vec::new();
        for b in 0..self.batches() {
            let batch = self.tokens.batch(b * self.batch_seqs, self.batch_seqs);
            let mut kept: Vec<Arc<Vec<f32>>> = (0..l).map(|_| Arc::new(Vec::new())).collect();
            let from_embedding = self.states.is_none() || start == 0;
            let mut keep_input = |i: usize, h: &[f32]| {
                if i < l && (i > start || from_embedding) {
                    kept[i] = Arc::new(h.to_vec());
                }
            };
            // Not kept: no callback, so that a GPU does not copy the hidden states out.
            let on_hidden: OnHidden<'_> = if keep { Some(&mut keep_input) } else { None };
            let loss = match &self.states {
                Some(states) if start > 0 => {
                    let h = states[b][start].clone();
                    self.model.loss_from(&batch, start, h, skip, on_hidden)?
                }
                _ => self.model.loss(&batch, skip, on_hidden)?,
            };
            sum += loss * batch.items() as f64;
            if keep {
                out.push(kept);
            }
        }
        self.layer_passes += (l - start.min(l)) as f64 / l.max(1) as f64;
        Ok((sum / self.tokens.items() as f64, out))
    }

    /// Bytes of the inputs of layers `first..L` on the scoring sequences (a run from `start` keeps those
    /// from `start + 1`).
    fn inputs_bytes(&self, first: usize) -> usize {
        let rows = self.tokens.items() * self.tokens.rows_per_item();
        let l = self.model.num_units();
        input_bytes(rows, self.widths.get(first..l).unwrap_or(&[]))
    }

    /// Put a run's kept inputs (layers above `start`) over the base's.
    fn install(&mut self, start: usize, kept: LayerInputs) {
        match &mut self.states {
            None => self.states = Some(kept),
            Some(states) => {
                for (b, layers) in kept.into_iter().enumerate() {
                    for (i, h) in layers.into_iter().enumerate() {
                        if i > start {
                            states[b][i] = h;
                        }
                    }
                }
            }
        }
    }

    /// Make `base` (any order) the set whose layer inputs are kept: later sets that contain it resume
    /// after its first difference from them. Free when `base` was evaluated since the last rebase (its
    /// run's inputs were kept), else one partial forward from the first layer where the old and new base
    /// differ. A no-op without the prefix cache or when `base` is already the base.
    pub fn rebase(&mut self, base: &[usize]) -> Result<()> {
        if !self.prefix {
            return Ok(());
        }
        let key = sorted_set(base);
        if self.states.is_some() && key == self.base {
            return Ok(());
        }
        if let Some((start, kept)) = self.pending.remove(&key) {
            self.install(start, kept);
        } else {
            let start = if self.states.is_some() {
                first_difference(&key, &self.base).unwrap_or(0)
            } else {
                0
            };
            let (loss, kept) = self.run(&key, start, true)?;
            self.evaluations += 1;
            self.cache.insert(key.clone(), loss);
            self.install(start, kept);
        }
        self.pending.clear();
        self.pending_bytes = 0;
        self.base = key;
        Ok(())
    }

    /// The loss with `skip` (any order) bypassed.
    pub fn loss(&mut self, skip: &[usize]) -> Result<f64> {
        let key = sorted_set(skip);
        if let Some(&v) = self.cache.get(&key) {
            return Ok(v);
        }
        if self.prefix && self.states.is_none() {
            self.rebase(&[])?;
            if let Some(&v) = self.cache.get(&key) {
                return Ok(v);
            }
        }
        let start = if self.prefix {
            first_difference(&key, &self.base).unwrap_or(0)
        } else {
            0
        };
        // Keep this run's layer inputs while they fit: the step's winner becomes the next base for free.
        let keep = self.prefix
            && self.keep_pending
            && self.pending_bytes + self.inputs_bytes(start + 1) <= self.budget / 2;
        let (loss, kept) = self.run(&key, start, keep)?;
        self.evaluations += 1;
        if keep {
            self.pending_bytes += self.inputs_bytes(start + 1);
            self.pending.insert(key.clone(), (start, kept));
        }
        self.cache.insert(key, loss);
        Ok(loss)
    }

    /// One step of a greedy removal: the loss of `set` = the layers removed so far plus `candidate`,
    /// with the layers removed so far as the base, so that each candidate resumes at its own layer.
    pub fn score_step(&mut self, set: &[usize], candidate: usize) -> Result<f64> {
        let removed: Vec<usize> = set.iter().copied().filter(|&x| x != candidate).collect();
        self.rebase(&removed)?;
        self.loss(set)
    }
}

fn sorted_set(s: &[usize]) -> Vec<usize> {
    let mut k = s.to_vec();
    k.sort_unstable();
    k.dedup();
    k
}

/// The smallest layer in one sorted set and not the other (`None` when equal).
fn first_difference(a: &[usize], b: &[usize]) -> Option<usize> {
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(&x), Some(&y)) => return Some(x.min(y)),
            (Some(&x), None) => return Some(x),
            (None, Some(&y)) => return Some(y),
            (None, None) => return None,
        }
    }
}
