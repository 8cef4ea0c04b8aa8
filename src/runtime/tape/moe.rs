//! The sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5, MiniMax-M2,
//! ERNIE 4.5, DeepSeek-V2 and V3, Granite MoE; GPT-OSS's with biases and an activation on the up
//! projection too) as one tape op,
//! [`SparseMoe`], written once for every [`Device`] from the device's ops: the rows routed to an expert
//! are gathered (the embedding lookup, with the input as the table), run through the expert's gated MLP
//! (linear, activation, multiply, linear), weighted by their routing weights ([`Device::row_scale_forward`])
//! and scattered back into the output (the embedding's backward, which adds). Llama 4 weights the
//! gathered rows instead, before the expert ([`SparseMoe::input_scaled`]).
//!
//! Which rows go where is data: it is known only once the router's logits are, so the routing is done on
//! the host ([`Routing`]: softmax or σ, a correction bias on the choice, top-k, renormalisation, in f64,
//! and their backward), from the logits
//! the router's `Linear` op wrote (a download on a GPU: `[rows, experts]` values, small beside an
//! expert's matrices). Each expert's buffers are sized to its rows and taken from the tape's pool. The
//! backward keeps nothing but the op's input and the logits: it routes again and recomputes each
//! expert's intermediate values (what activation checkpointing does), so the tape's memory does not
//! depend on how the tokens were routed.

use super::{BufId, Device, OpIo, ParamGrads, ParamId, ParamStore, Pool, Tape, TapeOp};
use crate::error::Result;
use crate::runtime::ops::Activation;

/// How a router scores the experts from its logits and picks among them.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// The softmax over all the experts; the `top_k` most probable (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// ERNIE 4.5's: the softmax, the choice by probability + `bias` (its `e_score_correction_bias`, no
    /// gradient), the weights the probabilities.
    SoftmaxBiased { bias: std::sync::Arc<[f32]> },
    /// DeepSeek-V2's and Mistral 4's: the softmax; the choice among the experts of the `topk_group` of
    /// `groups` equal groups whose `best` highest probabilities sum highest (DeepSeek-V2's
    /// `group_limited_greedy` 1; one group: every expert), the weights the probabilities (renormalised
    /// with `normalise`) × `scale` (`routed_scaling_factor`).
    SoftmaxGroups {
        groups: usize,
        topk_group: usize,
        best: usize,
        scale: f64,
    },
    /// DeepSeek-V3's (GLM-4.5's) σ of each logit. The choice reads σ + `bias` (the router's
    /// `e_score_correction_bias`, a buffer: no gradient), among the experts of the `topk_group` of
    /// `groups` equal groups whose two best biased scores sum highest; the weights are the unbiased σ
    /// (renormalised with `normalise`, over their sum + 1e-20), × `scale` (`routed_scaling_factor`).
    Sigmoid {
        bias: std::sync::Arc<[f32]>,
        groups: usize,
        topk_group: usize,
        scale: f64,
    },
}

/// The routing of one batch: for every row (token), the `top_k` experts the [`Router`] picks from its
/// logits, with the weights their outputs are summed with: the scores (softmax probabilities or σ), or
/// with `normalise` the scores divided by their sum over the chosen experts. Ties go to the lower
/// expert index (random weights never tie).
#[derive(Clone, Debug)]
pub struct Routing {
    experts: usize,
    top_k: usize,
    normalise: bool,
    /// σ's scores, else the softmax's.
    sigmoid: bool,
    /// The weights' factor (`routed_scaling_factor`; 1 for the others).
    scale: f64,
    /// `[rows, experts]`: the scores.
    probs: Vec<f64>,
    /// `[rows, top_k]`: the chosen experts, most probable first.
    chosen: Vec<usize>,
    /// Per expert: the rows routed to it (ascending) and their weights.
    pub rows: Vec<Vec<i64>>,
    pub weights: Vec<Vec<f32>>,
}

impl Routing {
    /// Route the rows of `logits` (`[rows, experts]`, row-major) by the softmax (see [`Routing::with`]).
    pub fn new(logits: &[f32], experts: usize, top_k: usize, normalise: bool) -> Routing {
        Self::with(logits, experts, top_k, normalise, &Router::Softmax)
    }

    /// Route the rows of `logits` (`[rows, experts]`, row-major) by `router`.
    pub fn with(
        logits: &[f32],
        experts: usize,
        top_k: usize,
        normalise: bool,
        router: &Router,
    ) -> Routing {
        assert!(
            experts > 0 && (1..=experts).contains(&top_k) && logits.len().is_multiple_of(experts),
            "routing {} logits to the top {top_k} of {experts} experts",
            logits.len()
        );
        let n = logits.len() / experts;
        let mut probs = vec![0f64; n * experts];
        let mut chosen = Vec::with_capacity(n * top_k);
        let mut rows = vec![Vec::new(); experts];
        let mut weights = vec![Vec::new(); experts];
        let mut order: Vec<usize> = Vec::with_capacity(experts);
        let mut key = vec![0f64; experts];
        for r in 0..n {
            let z = &logits[r * experts..(r + 1) * experts];
            let p = &mut probs[r * experts..(r + 1) * experts];
            let (eps, factor) = match router {
                Router::Softmax | Router::SoftmaxBiased { .. } | Router::SoftmaxGroups { .. } => {
                    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let mut sum = 0.0;
                    for (p, &v) in p.iter_mut().zip(z) {
                        *p = (v as f64 - max).exp();
                        sum += *p;
                    }
                    p.iter_mut().for_each(|p| *p /= sum);
                    key.copy_from_slice(p);
                    match router {
                        Router::SoftmaxBiased { bias } => {
                            key.iter_mut()
                                .zip(&**bias)
                                .for_each(|(k, &b)| *k += b as f64);
                            (0.0, 1.0)
                        }
                        &Router::SoftmaxGroups {
                            groups,
                            topk_group,
                            best,
                            scale,
                        } => {
                            mask_groups(&mut key, groups, topk_group, best);
                            (0.0, scale)
                        }
                        _ => (0.0, 1.0),
                    }
                }
                Router::Sigmoid {
                    bias,
                    groups,
                    topk_group,
                    scale,
                } => {
                    for ((p, k), (&v, &b)) in p.iter_mut().zip(&mut key).zip(z.iter().zip(&**bias))
                    {
                        *p = 1.0 / (1.0 + (-(v as f64)).exp());
                        *k = *p + b as f64;
                    }
                    mask_groups(&mut key, *groups, *topk_group, 2);
                    (1e-20, *scale)
                }
            };
            order.clear();
            order.extend(0..experts);
            // Descending key, ascending index among equals (a stable sort by key).
            order.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
            let top = &order[..top_k];
            let total: f64 = top.iter().map(|&e| p[e]).sum::<f64>() + eps;
            let scale = factor * if normalise { 1.0 / total } else { 1.0 };
            for &e in top {
                chosen.push(e);
                rows[e].push(r as i64);
                weights[e].push((p[e] * scale) as f32);
            }
        }
        Routing {
            experts,
            top_k,
            normalise,
            sigmoid: matches!(router, Router::Sigmoid { .. }),
            scale: match router {
                Router::Softmax | Router::SoftmaxBiased { .. } => 1.0,
                Router::SoftmaxGroups { scale, .. } | Router::Sigmoid { scale, .. } => *scale,
            },
            probs,
            chosen,
            rows,
            weights,
        }
    }

    /// The gradient of the logits (`[rows, experts]`, f32) from `dweights`, the gradient of each
    /// expert's weights (as [`Routing::weights`]; entries past those, a padding's, are not read).
    /// Through the scale c and the renormalisation (w = c p / P, P the chosen scores' sum:
    /// dp_j = c (dw_j − Σ_s dw_s w_s / c) / P for the chosen j, 0 for the others), then the softmax
    /// (dz_i = p_i (dp_i − Σ_j p_j dp_j)) or σ (dz_i = p_i (1 − p_i) dp_i); the choice itself has no
    /// gradient.
    pub fn backward(&self, dweights: &[Vec<f32>]) -> Vec<f32> {
        let (e_n, k) = (self.experts, self.top_k);
        let n = self.probs.len() / e_n;
        let (eps, c) = match self.sigmoid {
            true => (1e-20, self.scale),
            false => (0.0, self.scale),
        };
        // Each row's slot in its experts' lists: the rows are pushed in order, so a cursor per expert.
        let mut cursor = vec![0usize; e_n];
        let mut dz = vec![0f32; n * e_n];
        let mut dp = vec![0f64; e_n];
        for r in 0..n {
            let p = &self.probs[r * e_n..(r + 1) * e_n];
            let top = &self.chosen[r * k..(r + 1) * k];
            let total: f64 = top.iter().map(|&e| p[e]).sum::<f64>() + eps;
            dp.iter_mut().for_each(|v| *v = 0.0);
            let mut dot_w = 0.0;
            for &e in top {
                let dw = dweights[e][cursor[e]] as f64;
                let w = if self.normalise { p[e] / total } else { p[e] };
                dp[e] = c * dw;
                dot_w += c * dw * w;
                cursor[e] += 1;
            }
            if self.normalise {
                for &e in top {
                    dp[e] = (dp[e] - dot_w) / total;
                }
            }
            let d = &mut dz[r * e_n..(r + 1) * e_n];
            match self.sigmoid {
                true => {
                    for ((d, &p), &dp) in d.iter_mut().zip(p).zip(&dp) {
                        *d = (p * (1.0 - p) * dp) as f32;
                    }
                }
                false => {
                    let dot_p: f64 = top.iter().map(|&e| p[e] * dp[e]).sum();
                    for ((d, &p), &dp) in d.iter_mut().zip(p).zip(&dp) {
                        *d = (p * (dp - dot_p)) as f32;
                    }
                }
            }
        }
        dz
    }
}

/// Keep the experts of the `keep` of `groups` equal groups whose `best` highest keys sum highest (all of
/// a smaller group's), setting the others' keys to −∞ (the group-limited choice: DeepSeek-V3's by the
/// two best, DeepSeek-V2's by the best; ties to the lower group).
fn mask_groups(key: &mut [f64], groups: usize, keep: usize, best: usize) {
    assert!(
        (1..=MAX_GROUP_BEST).contains(&best),
        "a group scored by its {best} best keys"
    );
    if keep >= groups {
        return;
    }
    let size = key.len() / groups;
    // The group's `best` highest keys, kept in descending order as they are met (no allocation: this
    // runs per token and group).
    let score = |g: &[f64]| {
        let mut top = [f64::NEG_INFINITY; MAX_GROUP_BEST];
        for &v in g {
            if let Some(i) = top[..best].iter().position(|t| v.total_cmp(t).is_gt()) {
                top.copy_within(i..best - 1, i + 1);
                top[i] = v;
            }
        }
        top[..best.min(g.len())].iter().sum::<f64>()
    };
    let scores: Vec<f64> = key.chunks(size).map(score).collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    for &g in &order[keep..] {
        key[g * size..(g + 1) * size].fill(f64::NEG_INFINITY);
    }
}

/// The most keys a group's score sums ([`mask_groups`]: DeepSeek-V3's and Mistral 4's two).
const MAX_GROUP_BEST: usize = 2;

/// An expert's rows are padded to a multiple of this many with copies of its first row weighted 0 (they
/// add exactly 0 to the output, and take exactly 0 gradient): its buffers then come in few sizes, which
/// the tape's pool reuses (a fresh buffer costs page faults on the CPU, an allocation on a GPU), for at
/// most `ROW_PAD - 1` rows of extra work per expert.
const ROW_PAD: usize = 32;

/// Expert `e`'s rows and weights, padded (see [`ROW_PAD`]); empty when no row goes to it.
fn padded_rows(routing: &Routing, e: usize) -> (Vec<i64>, Vec<f32>) {
    let (mut rows, mut weights) = (routing.rows[e].clone(), routing.weights[e].clone());
    if let Some(&first) = rows.first() {
        let len = rows.len().next_multiple_of(ROW_PAD);
        rows.resize(len, first);
        weights.resize(len, 0.0);
    }
    (rows, weights)
}

/// One expert's gated MLP: `down(act(gate x) ⊙ up x)`, with `bias` the three projections' biases
/// (GPT-OSS).
#[derive(Clone, Copy, Debug)]
pub struct Expert {
    pub gate: ParamId,
    pub up: ParamId,
    pub down: ParamId,
    pub bias: Option<[ParamId; 3]>,
}

/// out = Σ over each row's chosen experts of weight · expert(x), or with `input_scaled` of
/// expert(weight · x) (see the module doc). `x` is the MLP's input `[rows, hidden]`, `logits` the
/// router's output `[rows, experts]`; `inter` is an expert's intermediate size, `act` its gate
/// activation, `up_act` one on its up projection (GPT-OSS's `clamp(up) + 1`).
#[derive(Clone, Debug)]
pub struct SparseMoe {
    pub x: BufId,
    pub logits: BufId,
    pub experts: Vec<Expert>,
    pub top_k: usize,
    pub normalise: bool,
    pub router: Router,
    pub act: Activation,
    pub up_act: Option<Activation>,
    pub inter: usize,
    /// Llama 4's: each routed row × its weight goes into the expert, whose output is summed unweighted.
    /// The padding rows (weight 0) then run the expert on zeros, which gives exactly 0 only without
    /// biases: the two are not combined.
    pub input_scaled: bool,
    pub out: BufId,
}

/// An expert's forward on its rows (the forward adds its output and drops it; the backward recomputes
/// it and reads every buffer): the row ids on the device, the expert's input (the gathered rows, × their
/// weights with [`SparseMoe::input_scaled`]), gate and up projections, activation, product and output;
/// `up_act`'s output where there is one; the gathered rows before their weights where they were scaled.
struct ExpertPass<D: Device> {
    ids: D::Ids,
    bufs: [D::Buf; 6],
    up_act: Option<D::Buf>,
    unscaled: Option<D::Buf>,
}

impl SparseMoe {
    /// Every expert's projections (all read as linear weights).
    fn projections(&self) -> Vec<ParamId> {
        self.experts
            .iter()
            .flat_map(|e| [e.gate, e.up, e.down])
            .collect()
    }

    /// The projections and their biases.
    fn params(&self) -> Vec<ParamId> {
        let biases = self
            .experts
            .iter()
            .flat_map(|e| e.bias.into_iter().flatten());
        self.projections().into_iter().chain(biases).collect()
    }

    fn routing<D: Device>(&self, t: &Tape<D>) -> Result<Routing> {
        let mut scratch = Vec::new();
        let logits = t.dev.host_view(t.data(self.logits), &mut scratch)?;
        Ok(Routing::with(
            logits,
            self.experts.len(),
            self.top_k,
            self.normalise,
            &self.router,
        ))
    }

    /// Expert `e`'s forward on `rows` of `x`: gather (× the rows' weights `s` with `input_scaled`), gate
    /// and up, activation, product, down.
    #[allow(clippy::too_many_arguments)]
    fn expert_forward<D: Device>(
        &self,
        t: &Tape<D>,
        store: &dyn ParamStore,
        pool: &mut Pool<D>,
        e: usize,
        rows: &[i64],
        s: &D::Buf,
    ) -> Result<ExpertPass<D>> {
        let (dev, ex) = (&t.dev, self.experts[e]);
        let (c, h, i) = (rows.len(), t.bufs[self.x].cols, self.inter);
        let ids = dev.ids(rows)?;
        let mut xe = pool.alloc(dev, c * h)?;
        dev.embedding_forward(&ids, t.data(self.x), h, 1.0, &mut xe)?;
        let unscaled = match self.input_scaled {
            true => {
                let mut scaled = pool.alloc(dev, c * h)?;
                dev.row_scale_forward(&xe, s, h, &mut scaled)?;
                Some(std::mem::replace(&mut xe, scaled))
            }
            false => None,
        };
        let bias = |k: usize| ex.bias.map(|b| t.p(store, b[k])).transpose();
        let [bg, bu, bd] = [bias(0)?, bias(1)?, bias(2)?];
        let mut g = pool.alloc(dev, c * i)?;
        dev.linear_forward(&xe, &t.w(store, ex.gate)?, bg.as_deref(), c, h, i, &mut g)?;
        let mut u = pool.alloc(dev, c * i)?;
        dev.linear_forward(&xe, &t.w(store, ex.up)?, bu.as_deref(), c, h, i, &mut u)?;
        let mut a = pool.alloc(dev, c * i)?;
        dev.activation_forward(self.act, &g, &mut a)?;
        let up_act = match self.up_act {
            Some(act) => {
                let mut v = pool.alloc(dev, c * i)?;
                dev.activation_forward(act, &u, &mut v)?;
                Some(v)
            }
            None => None,
        };
        let mut m = pool.alloc(dev, c * i)?;
        dev.mul_forward(&a, up_act.as_ref().unwrap_or(&u), &mut m)?;
        let mut ye = pool.alloc(dev, c * h)?;
        dev.linear_forward(&m, &t.w(store, ex.down)?, bd.as_deref(), c, i, h, &mut ye)?;
        Ok(ExpertPass {
            ids,
            bufs: [xe, g, u, a, m, ye],
            up_act,
            unscaled,
        })
    }

    /// Upload an expert's routing weights (one per row).
    fn weights<D: Device>(dev: &D, pool: &mut Pool<D>, w: &[f32]) -> Result<D::Buf> {
        let mut s = pool.alloc(dev, w.len())?;
        dev.upload(w, &mut s)?;
        Ok(s)
    }
}

impl<D: Device> TapeOp<D> for SparseMoe {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "sparse_moe",
            inputs: vec![self.x, self.logits],
            outputs: vec![self.out],
            saved: vec![self.x, self.logits],
            params: self.params(),
        }
    }
    fn weights(&self) -> Vec<ParamId> {
        self.projections()
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let routing = self.routing(t)?;
        let h = t.bufs[self.x].cols;
        let mut pool = std::mem::take(&mut t.pool);
        let r = t.write_output(self.out, |t, y| {
            for e in 0..self.experts.len() {
                let (rows, weights) = padded_rows(&routing, e);
                if rows.is_empty() {
                    continue;
                }
                let s = Self::weights(&t.dev, &mut pool, &weights)?;
                let pass = self.expert_forward(t, store, &mut pool, e, &rows, &s)?;
                // The weighted output (the output itself where the input was weighted).
                let z = match self.input_scaled {
                    true => None,
                    false => {
                        let mut z = pool.alloc(&t.dev, rows.len() * h)?;
                        t.dev.row_scale_forward(&pass.bufs[5], &s, h, &mut z)?;
                        Some(z)
                    }
                };
                let out = z.as_ref().unwrap_or(&pass.bufs[5]);
                t.dev.embedding_backward(&pass.ids, out, h, 1.0, None, y)?;
                let rest = [pass.up_act, pass.unscaled, z].into_iter().flatten();
                for b in pass.bufs.into_iter().chain(rest).chain([s]) {
                    pool.release(&t.dev, b);
                }
            }
            Ok(())
        });
        t.pool = pool;
        r
    }
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        let routing = self.routing(t)?;
        let (h, i) = (t.bufs[self.x].cols, self.inter);
        let mut pool = std::mem::take(&mut t.pool);
        // Each expert's d(routing weights), downloaded once every expert has been queued (a GPU then
        // waits once, not once per expert).
        let mut dweight_bufs: Vec<(usize, D::Buf)> = Vec::new();
        let r = t.write_grad(self.x, |t, dx| {
            let dev = &t.dev;
            for e in 0..self.experts.len() {
                let (rows, weights) = padded_rows(&routing, e);
                let c = rows.len();
                if c == 0 {
                    continue;
                }
                let ex = self.experts[e];
                let s = Self::weights(dev, &mut pool, &weights)?;
                let pass = self.expert_forward(t, store, &mut pool, e, &rows, &s)?;
                let [xe, g, u, a, m, ye] = &pass.bufs;
                // The biases' gradients beside their weights'.
                let mut db = ex.bias.map(|b| b.map(|p| pg.take(p)));
                // d(weighted output), gathered from the output's gradient: d(output) itself where the
                // input was weighted.
                let mut dz = pool.alloc(dev, c * h)?;
                dev.embedding_forward(&pass.ids, t.grad(self.out), h, 1.0, &mut dz)?;
                let mut ds = pool.alloc(dev, c)?;
                let dye = match self.input_scaled {
                    true => None,
                    false => {
                        let mut dye = pool.alloc(dev, c * h)?;
                        dev.row_scale_backward(ye, &s, &dz, h, &mut dye, &mut ds)?;
                        Some(dye)
                    }
                };
                let mut dm = pool.alloc(dev, c * i)?;
                let mut dw = pg.take(ex.down);
                let w = t.w(store, ex.down)?;
                let ddb = db.as_mut().map(|d| &mut *d[2]);
                let dout = dye.as_ref().unwrap_or(&dz);
                let r = dev.linear_backward(m, &w, dout, c, i, h, Some(&mut dm), &mut dw, ddb);
                pg.put(ex.down, dw);
                r?;
                let (mut da, mut du) = (pool.alloc(dev, c * i)?, pool.alloc(dev, c * i)?);
                let up_act = pass.up_act.as_ref();
                dev.mul_backward(a, up_act.unwrap_or(u), &dm, &mut da, &mut du)?;
                // Through the up projection's activation: du is then d(its output).
                if let Some(act) = self.up_act {
                    let mut d = pool.alloc(dev, c * i)?;
                    dev.activation_backward(act, u, &du, &mut d)?;
                    pool.release(dev, std::mem::replace(&mut du, d));
                }
                let mut dg = pool.alloc(dev, c * i)?;
                dev.activation_backward(self.act, g, &da, &mut dg)?;
                let mut dxe = pool.alloc(dev, c * h)?;
                for (k, p, d) in [(0, ex.gate, &dg), (1, ex.up, &du)] {
                    let mut dw = pg.take(p);
                    let w = t.w(store, p)?;
                    let ddb = db.as_mut().map(|d| &mut *d[k]);
                    let r = dev.linear_backward(xe, &w, d, c, h, i, Some(&mut dxe), &mut dw, ddb);
                    pg.put(p, dw);
                    r?;
                }
                if let (Some(b), Some(db)) = (ex.bias, db) {
                    b.into_iter().zip(db).for_each(|(p, d)| pg.put(p, d));
                }
                // Through the input's weights: d(gathered rows) and d(weights).
                let dxg = match &pass.unscaled {
                    Some(xg) => {
                        let mut dxg = pool.alloc(dev, c * h)?;
                        dev.row_scale_backward(xg, &s, &dxe, h, &mut dxg, &mut ds)?;
                        Some(dxg)
                    }
                    None => None,
                };
                dweight_bufs.push((e, ds));
                dev.embedding_backward(&pass.ids, dxg.as_ref().unwrap_or(&dxe), h, 1.0, None, dx)?;
                let rest = [pass.up_act, pass.unscaled, dye, dxg].into_iter().flatten();
                for b in (pass.bufs.into_iter().chain(rest)).chain([s, dz, dm, da, du, dg, dxe]) {
                    pool.release(dev, b);
                }
            }
            Ok(())
        });
        let r = r.and_then(|()| {
            let mut dweights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
            for (e, ds) in dweight_bufs.drain(..) {
                t.dev.download(&ds, &mut dweights[e])?;
                pool.release(&t.dev, ds);
            }
            let dlogits = routing.backward(&dweights);
            let mut up = pool.alloc(&t.dev, dlogits.len())?;
            t.dev.upload(&dlogits, &mut up)?;
            let r = t.write_grad(self.logits, |t, dl| t.dev.accumulate(dl, &up));
            pool.release(&t.dev, up);
            r
        });
        t.pool = pool;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routing's backward against central differences of a loss Σ c · w over the chosen experts' weights
    /// (the choice held fixed: the logits move too little to change it), with and without the
    /// renormalisation, for the softmax and for σ with a bias, groups and a scale.
    #[test]
    fn routing_backward_matches_finite_differences() {
        let (n, e, k) = (5, 8, 3);
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        };
        let logits: Vec<f32> = (0..n * e).map(|_| rnd() as f32).collect();
        let sigmoid = Router::Sigmoid {
            bias: (0..e).map(|_| 0.1 * rnd() as f32).collect(),
            groups: 4,
            topk_group: 2,
            scale: 2.5,
        };
        let biased = Router::SoftmaxBiased {
            bias: (0..e).map(|_| 0.1 * rnd() as f32).collect(),
        };
        let grouped = Router::SoftmaxGroups {
            groups: 4,
            topk_group: 2,
            best: 1,
            scale: 16.0,
        };
        for (normalise, router) in [
            (false, Router::Softmax),
            (true, Router::Softmax),
            (true, biased),
            (false, grouped),
            (false, sigmoid.clone()),
            (true, sigmoid),
        ] {
            let routing = Routing::with(&logits, e, k, normalise, &router);
            let coef: Vec<Vec<f32>> = routing
                .weights
                .iter()
                .map(|w| w.iter().map(|_| rnd() as f32).collect())
                .collect();
            // The loss, `None` where the step moved the choice (σ's biased scores come closer together
            // than the softmax's probabilities: there the difference quotient is no derivative).
            let loss = |z: &[f32]| -> Option<f64> {
                let r = Routing::with(z, e, k, normalise, &router);
                (r.rows == routing.rows).then(|| {
                    r.weights
                        .iter()
                        .zip(&coef)
                        .flat_map(|(w, c)| w.iter().zip(c))
                        .map(|(&w, &c)| w as f64 * c as f64)
                        .sum()
                })
            };
            let grad = routing.backward(&coef);
            let mut checked = 0;
            for j in 0..n * e {
                let step = 1e-2f32;
                let (mut zp, mut zm) = (logits.clone(), logits.clone());
                zp[j] += step;
                zm[j] -= step;
                let (Some(lp), Some(lm)) = (loss(&zp), loss(&zm)) else {
                    continue;
                };
                checked += 1;
                let fd = (lp - lm) / (2.0 * step as f64);
                assert!(
                    (fd - grad[j] as f64).abs() < 2e-4,
                    "{router:?} normalise {normalise}, logit {j}: finite difference {fd}, backward {}",
                    grad[j]
                );
            }
            assert!(
                checked >= n * e * 9 / 10,
                "{router:?}: {checked} of {}",
                n * e
            );
        }
    }

    /// Each row goes to its `top_k` most probable experts, with the softmax probabilities as weights
    /// (summing to 1 per row when renormalised), and every expert's rows ascend.
    #[test]
    fn routing_picks_the_most_probable_experts() {
        let logits = [0.5f32, 2.0, -1.0, 1.0, /* row 1 */ 3.0, 0.0, 0.1, 2.9];
        let r = Routing::new(&logits, 4, 2, false);
        assert_eq!(r.rows, vec![vec![1], vec![0], vec![], vec![0, 1]]);
        let p = |z: &[f32], i: usize| {
            let s: f64 = z.iter().map(|&v| (v as f64).exp()).sum();
            (z[i] as f64).exp() / s
        };
        assert!((r.weights[1][0] as f64 - p(&logits[..4], 1)).abs() < 1e-7);
        assert!((r.weights[0][0] as f64 - p(&logits[4..], 0)).abs() < 1e-7);
        let r = Routing::new(&logits, 4, 2, true);
        let row0 = r.weights[1][0] + r.weights[3][0];
        assert!(
            (row0 - 1.0).abs() < 1e-6,
            "renormalised weights sum to {row0}"
        );
    }

    /// DeepSeek-V2's group-limited greedy choice: the groups by their best probability (not their best
    /// two), the weights the probabilities (not renormalised) × the scale.
    #[test]
    fn grouped_softmax_routing_picks_inside_the_groups_with_the_best_expert() {
        // Groups {0, 1}, {2, 3}, {4, 5}: by best probability group 1 (expert 2) then group 2 (expert 4);
        // by the best two, group 2 (4 and 5) would lead and group 0 (0 and 1) come before group 1.
        let logits = [1.0f32, 0.9, 3.0, -3.0, 2.0, 1.9];
        let router = Router::SoftmaxGroups {
            groups: 3,
            topk_group: 2,
            best: 1,
            scale: 16.0,
        };
        let r = Routing::with(&logits, 6, 3, false, &router);
        assert_eq!(r.chosen, vec![2, 4, 5]);
        let sum: f64 = logits.iter().map(|&z| (z as f64).exp()).sum();
        let p = |i: usize| (logits[i] as f64).exp() / sum;
        assert!((r.weights[2][0] as f64 - 16.0 * p(2)).abs() < 1e-5);
        assert!((r.weights[5][0] as f64 - 16.0 * p(5)).abs() < 1e-5);
    }

    /// σ routing as GLM-4.5 / DeepSeek-V3 route: the choice by σ + bias inside the best groups (by their
    /// two best biased scores), the weights the unbiased σ renormalised and scaled.
    #[test]
    fn sigmoid_routing_picks_inside_the_best_groups() {
        let s = |v: f64| 1.0 / (1.0 + (-v).exp());
        // Groups {0, 1}, {2, 3}, {4, 5}: biased scores make group 2 best, then group 0, though expert 2
        // alone has the highest logit; the bias moves expert 1 above expert 0.
        let logits = [1.0f32, 0.9, 3.0, -3.0, 2.0, 1.9];
        let bias: std::sync::Arc<[f32]> = vec![0.0, 0.1, 0.0, 0.0, 0.0, 0.0].into();
        let router = Router::Sigmoid {
            bias,
            groups: 3,
            topk_group: 2,
            scale: 2.0,
        };
        let r = Routing::with(&logits, 6, 2, true, &router);
        assert_eq!(r.chosen, vec![4, 5], "the two of the best group");
        let (a, b) = (s(2.0), s(1.9));
        assert!((r.weights[4][0] as f64 - 2.0 * a / (a + b)).abs() < 1e-6);
        let r = Routing::with(&logits, 6, 3, false, &router);
        assert_eq!(
            r.chosen,
            vec![4, 5, 1],
            "then the biased best of the second group"
        );
        assert!((r.weights[1][0] as f64 - 2.0 * s(0.9)).abs() < 1e-6);
    }
}
