//! CPU implementations of the runtime's ops: GEMMs through [`crate::linalg::matmul`] (f32, rayon-parallel), the
//! row-wise ops parallelised over rows with rayon. Conventions in [`super`]: forwards write, backwards
//! accumulate into every gradient they are given.

use super::{vmath, Activation, ColumnBlocks, NormShape, RopeTable, Xielu};
use crate::error::Result;
use crate::linalg::{matmul, MatRef, Parallelism};
use crate::runtime::tape::ParamStore;
use rayon::prelude::*;

/// Rows per rayon task for the cheap row-wise ops: enough work per task to amortise the scheduling.
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------------------

/// `out[r] = scale · table[ids[r]]`; `table` is `[vocab, dim]`, `out` is `[ids.len(), dim]`. Ids were
/// checked against the vocabulary when the tokens were loaded.
pub fn embedding_forward(ids: &[i64], table: &[f32], dim: usize, scale: f32, out: &mut [f32]) {
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            let id = id as usize;
            let row = &table[id * dim..(id + 1) * dim];
            if scale == 1.0 {
                o.copy_from_slice(row);
            } else {
                o.iter_mut().zip(row).for_each(|(o, &t)| *o = t * scale);
            }
        });
}

/// `dtable[ids[r]] += scale · dout[r]`, but for rows whose id is `padding` (nn.Embedding's
/// `padding_idx`: that row of the table takes no gradient from the lookup). Serial over rows (repeated
/// ids would race).
pub fn embedding_backward(
    ids: &[i64],
    dout: &[f32],
    dim: usize,
    scale: f32,
    padding: Option<usize>,
    dtable: &mut [f32],
) {
    for (r, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if Some(id) == padding {
            continue;
        }
        let d = &mut dtable[id * dim..(id + 1) * dim];
        for (a, &g) in d.iter_mut().zip(&dout[r * dim..(r + 1) * dim]) {
            *a += g * scale;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Linear: y = x Wᵀ + b, x [n, k], W [m, k] (PyTorch layout), y [n, m]
// ---------------------------------------------------------------------------------------------------------

pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
    y: &mut [f32],
) {
    matmul(
        y,
        m,
        MatRef::rm(x, n, k),
        MatRef::rm(w, m, k).t(),
        1.0,
        false,
        Parallelism::Rayon(0),
    );
    if let Some(b) = b {
        y.par_chunks_mut(m).for_each(|row| {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        });
    }
}

/// Accumulates `dx += dy W`, `dw += dyᵀ x`, `db += Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    k: usize,
    m: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    if let Some(dx) = dx {
        matmul(
            dx,
            k,
            MatRef::rm(dy, n, m),
            MatRef::rm(w, m, k),
            1.0,
            true,
            Parallelism::Rayon(0),
        );
    }
    weight_grad(x, dy, n, k, m, dw);
    if let Some(db) = db {
        db.par_iter_mut().enumerate().for_each(|(j, d)| {
            let mut s = 0f64;
            for r in 0..n {
                s += dy[r * m + j] as f64;
            }
            *d += s as f32;
        });
    }
}

/// `dw += dyᵀ x` (`dw` is `[m, k]`). The `gemm` crate runs a product with many more rows than columns at
/// about half its rate (here `dyᵀ x` of the lm_head, 32000 × 768 from 1024 tokens: 124 against 220 GFLOP/s;
/// the MLP's gate/up, 2048 × 768: 161 against 218), so when `m > k` the transpose `dwᵀ = xᵀ dy`, which is
/// wide, is computed in column blocks of `dy` into a bounded scratch and added into `dw` transposed.
fn weight_grad(x: &[f32], dy: &[f32], n: usize, k: usize, m: usize, dw: &mut [f32]) {
    /// Scratch elements (16 MiB of f32), whatever the layer's width.
    const SCRATCH: usize = 1 << 22;
    /// Rows of `dw` per rayon task in the transposed add.
    const ROWS_PER_TASK: usize = 16;
    if m <= k || m < 512 {
        matmul(
            dw,
            k,
            MatRef::rm(dy, n, m).t(),
            MatRef::rm(x, n, k),
            1.0,
            true,
            Parallelism::Rayon(0),
        );
        return;
    }
    thread_local! {
        static TMP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let block = (SCRATCH / k).clamp(ROWS_PER_TASK, m);
    TMP.with(|tmp| {
        let mut tmp = tmp.borrow_mut();
        if tmp.len() < k * block {
            tmp.resize(k * block, 0.0);
        }
        for m0 in (0..m).step_by(block) {
            let w = block.min(m - m0);
            let t = &mut tmp[..k * w];
            let dy_cols = MatRef {
                data: &dy[m0..],
                rows: n,
                cols: w,
                rs: m,
                cs: 1,
            };
            matmul(
                t,
                w,
                MatRef::rm(x, n, k).t(),
                dy_cols,
                1.0,
                false,
                Parallelism::Rayon(0),
            );
            let t = &*t;
            dw[m0 * k..(m0 + w) * k]
                .par_chunks_mut(ROWS_PER_TASK * k)
                .enumerate()
                .for_each(|(jb, rows)| {
                    let j0 = jb * ROWS_PER_TASK;
                    for i in 0..k {
                        let src = &t[i * w + j0..i * w + j0 + rows.len() / k];
                        for (jj, &v) in src.iter().enumerate() {
                            rows[jj * k + i] += v;
                        }
                    }
                });
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// Norms, rows of length d: RMSNorm (HF LlamaRMSNorm) y = g ⊙ x / sqrt(mean(x²) + eps); LayerNorm (PyTorch's
// layer_norm) y = g ⊙ (x − μ) / sqrt(mean((x − μ)²) + eps) + b. Gain g = offset + w (offset alone
// without w: OLMo's LayerNorms without parameters).
// ---------------------------------------------------------------------------------------------------------

/// A row's (mean subtracted, 1/σ): (0, 1/rms) for RMSNorm, (μ, 1/std) for LayerNorm; in f64.
fn norm_stats(x: &[f32], norm: NormShape) -> (f64, f64) {
    let d = x.len() as f64;
    let mean = if norm.centre {
        x.iter().map(|&v| v as f64).sum::<f64>() / d
    } else {
        0.0
    };
    let ss: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
    (mean, 1.0 / (ss / d + norm.eps).sqrt())
}

/// With `offset` 1 the gain is `1 + w` (Gemma's RMSNorm, the sum in f32 as transformers computes it).
pub fn norm_forward(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    norm: NormShape,
    y: &mut [f32],
) {
    let d = norm.d;
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let (mean, r) = norm_stats(xr, norm);
            let at = (row % norm.groups) * d;
            for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                let bias = b.map_or(0.0, |b| b[at + j]);
                *o = (((v as f64 - mean) * r) as f32) * gain(norm, w, at + j) + bias;
            }
        });
}

/// The gain of weight value `j`: `offset + w[j]`, or `offset` without a weight.
fn gain(norm: NormShape, w: Option<&[f32]>, j: usize) -> f32 {
    norm.offset + w.map_or(0.0, |w| w[j])
}

/// With gain `g = offset + w`, `x̃ = x − μ` (x for RMSNorm) and `r = 1/σ`:
/// `dx += r (g⊙dy) − x̃ r³/d Σ(g⊙dy⊙x̃)` (LayerNorm: `− r/d Σ(g⊙dy)` too), `dw += Σ_rows dy ⊙ x̃ r`,
/// `db += Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    x: &[f32],
    w: Option<&[f32]>,
    norm: NormShape,
    dy: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let d = norm.d;
    let chunk = rows_per_task(d);
    let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(d * chunk)
        .zip(x.par_chunks(d * chunk).zip(dy.par_chunks(d * chunk)))
        .enumerate()
        .map(|(c, (dxc, (xc, dyc)))| {
            // The weight rows' partial gradients (one row unless per-head weights).
            let (mut dw_rows, mut db_rows) =
                (vec![0f64; norm.groups * d], vec![0f64; norm.groups * d]);
            let rows = dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d));
            for (i, ((dxr, xr), dyr)) in rows.enumerate() {
                let at = ((c * chunk + i) % norm.groups) * d;
                let (dwp, dbp) = (&mut dw_rows[at..at + d], &mut db_rows[at..at + d]);
                let (mean, r) = norm_stats(xr, norm);
                let gain = |j: usize| gain(norm, w, at + j) as f64;
                let (mut dot, mut sum) = (0f64, 0f64);
                for j in 0..d {
                    let gdy = gain(j) * dyr[j] as f64;
                    dot += gdy * (xr[j] as f64 - mean);
                    sum += gdy;
                }
                let c = r * r * r * dot / d as f64;
                let shift = if norm.centre { r * sum / d as f64 } else { 0.0 };
                for j in 0..d {
                    let (xv, gv) = (xr[j] as f64 - mean, dyr[j] as f64);
                    dxr[j] += (r * gain(j) * gv - xv * c - shift) as f32;
                    dwp[j] += gv * xv * r;
                    dbp[j] += gv;
                }
            }
            (dw_rows, db_rows)
        })
        .collect();
    let (dw_parts, db_parts): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    if let Some(dw) = dw {
        add_parts(dw, &dw_parts);
    }
    if let Some(db) = db {
        add_parts(db, &db_parts);
    }
}

fn add_parts(dst: &mut [f32], parts: &[Vec<f64>]) {
    for (j, v) in dst.iter_mut().enumerate() {
        *v += parts.iter().map(|p| p[j]).sum::<f64>() as f32;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rotary embedding (HF: x cos + rotate_half(x) sin, rotate_half(x) = [−x₂, x₁])
// ---------------------------------------------------------------------------------------------------------

/// `x` is `[seqs * tokens, heads * head_dim]`; row `s * tokens + t` uses position `t`. `sign` = +1 applies
/// the rotation, −1 its inverse (the transpose), which is the backward. Values past `rot_dim` pass
/// through (their table entries are cos 1, sin 0, and they pair with nothing).
fn rope_apply(x: &[f32], heads: usize, table: &RopeTable, sign: f32, y: &mut [f32], add: bool) {
    let hd = table.head_dim;
    let (rot_dim, pairs) = (table.rot_dim, table.pairs);
    let width = heads * hd;
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let t = row % table.tokens;
            let cos = &table.cos[t * hd..(t + 1) * hd];
            let sin = &table.sin[t * hd..(t + 1) * hd];
            for h in 0..heads {
                let xs = &xr[h * hd..(h + 1) * hd];
                let ys = &mut yr[h * hd..(h + 1) * hd];
                for i in 0..hd {
                    let rot = pairs.partner(i, rot_dim).map_or(0.0, |(j, s)| s * xs[j]);
                    let v = xs[i] * cos[i] + sign * rot * sin[i];
                    if add {
                        ys[i] += v;
                    } else {
                        ys[i] = v;
                    }
                }
            }
        });
}

pub fn rope_forward(x: &[f32], heads: usize, table: &RopeTable, y: &mut [f32]) {
    rope_apply(x, heads, table, 1.0, y, false);
}

/// The rotation is orthogonal per position and cos/sin repeat across the halves, so its transpose is the
/// rotation with −sin: `dx += rope⁻¹(dy)`.
pub fn rope_backward(dy: &[f32], heads: usize, table: &RopeTable, dx: &mut [f32]) {
    rope_apply(dy, heads, table, -1.0, dx, true);
}

// ---------------------------------------------------------------------------------------------------------
// Causal self-attention with grouped-query heads
// ---------------------------------------------------------------------------------------------------------

/// Shapes of one attention call. q/out are `[seqs * tokens, heads * head_dim]`, k/v are
/// `[seqs * tokens, kv_heads * head_dim]`; query head h reads kv head `h / (heads / kv_heads)`.
/// `window`: with `Some(w)` query i sees keys i − w < j ≤ i (sliding-window attention, transformers'
/// convention), with `None` all j ≤ i. `scale` multiplies the scores q·k: `None` is 1/√head_dim, Gemma 2
/// and 3 set 1/√query_pre_attn_scalar. `softcap`: Gemma 2's soft-capping of the scaled scores,
/// s ↦ c · tanh(s / c), before the mask and the softmax. `alibi`: ALiBi's bias on the scaled scores
/// (BLOOM, MPT, Falcon-RW), added before the soft-cap.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub seqs: usize,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    pub alibi: Option<Alibi>,
}

/// ALiBi (BLOOM, MPT, Falcon-RW): no rotary embedding; the attention adds `slope(h) · (j − i)` to the
/// scaled score of query i and key j (BLOOM adds `slope(h) · j`, which differs by a constant per row: the
/// same softmax). The slopes are BLOOM's and MPT's geometric sequence ([`Alibi::slope`]) times `factor`:
/// 1, or Falcon's 1/√head_dim (it adds the bias before scaling the scores). The CUDA kernels' twin is
/// `alibi_slope` in kernels/common.cuh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alibi {
    /// MPT's `alibi_bias_max`; BLOOM's and Falcon's sequence is 8's.
    pub max_bias: f32,
    pub factor: f32,
}

impl Alibi {
    /// Head `h`'s slope of `heads`: with p the largest power of two ≤ heads, 2^(−max_bias (h + 1) / p)
    /// for h < p, then the odd terms of the sequence for 2p heads, 2^(−max_bias (2 (h − p) + 1) / (2p))
    /// (transformers' `build_alibi_tensor`, and MPT's interleaving of the 2p sequence, which is the same).
    pub fn slope(&self, h: usize, heads: usize) -> f32 {
        let mut p = 1;
        while p * 2 <= heads {
            p *= 2;
        }
        let e = if h < p {
            self.max_bias * (h + 1) as f32 / p as f32
        } else {
            self.max_bias * (2 * (h - p) + 1) as f32 / (2 * p) as f32
        };
        self.factor * (-e).exp2()
    }
}

/// Add ALiBi's `slope · (j − i)` to the scores `row` of query `i` over keys `first..`.
fn add_alibi(row: &mut [f32], first: usize, i: usize, slope: f32) {
    for (j, x) in (first..).zip(row.iter_mut()) {
        *x += slope * (j as f32 - i as f32);
    }
}

impl AttnShape {
    /// The keys query row `i` attends to (never empty: a window is at least 1).
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let first = match self.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        };
        first..i + 1
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// View of head `h` of sequence `s` in a `[seqs * tokens, n_heads * head_dim]` buffer: `[tokens, head_dim]`.
    fn head<'a>(&self, buf: &'a [f32], n_heads: usize, s: usize, h: usize) -> MatRef<'a, f32> {
        let width = n_heads * self.head_dim;
        let start = s * self.tokens * width + h * self.head_dim;
        let len = (self.tokens - 1) * width + self.head_dim;
        MatRef {
            data: &buf[start..start + len],
            rows: self.tokens,
            cols: self.head_dim,
            rs: width,
            cs: 1,
        }
    }
    /// The factor on the scores q·k.
    pub fn scale(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }
}

/// Query rows per block of the attention's GEMMs: a block of rows `i0..i1` sees only the keys
/// `first(i0)..i1` (causal and window masks), so the scores above the diagonal blocks (and left of a
/// window) are never computed: about 5/8 of the full square at 256 tokens.
const ATT_BLOCK: usize = 64;

impl AttnShape {
    /// The query-row blocks and, for each, the key columns any of its rows sees.
    fn blocks(
        &self,
        block: usize,
    ) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>)> + '_ {
        (0..self.tokens).step_by(block).map(move |i0| {
            let i1 = (i0 + block).min(self.tokens);
            (i0..i1, self.visible(i0).start..i1)
        })
    }
}

/// `MatRef` of rows `rows` of a head view.
fn rows_of<'a>(m: MatRef<'a, f32>, rows: std::ops::Range<usize>) -> MatRef<'a, f32> {
    let start = rows.start * m.rs;
    let len = if rows.is_empty() {
        0
    } else {
        (rows.len() - 1) * m.rs + (m.cols - 1) * m.cs + 1
    };
    MatRef {
        data: &m.data[start..start + len],
        rows: rows.len(),
        ..m
    }
}

/// Writes `out` and, per (sequence, head, query row), the log-sum-exp of the scaled scores `lse`
/// (`[seqs, heads, tokens]`): the backward recomputes the probabilities from it, so the saved state is
/// linear in the sequence length, not quadratic.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) {
    attention_forward_blocked(q, k, v, sh, out, lse, ATT_BLOCK);
}

fn attention_forward_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
    block: usize,
) {
    let (t, d) = (sh.tokens, sh.head_dim);
    let tiles: Vec<Vec<f32>> = lse
        .par_chunks_mut(t)
        .enumerate()
        .map(|(sh_idx, lse_rows)| {
            let (s, h) = (sh_idx / sh.heads, sh_idx % sh.heads);
            let g = h / sh.group();
            let mut p = vec![0f32; t * t];
            let mut tile = vec![0f32; t * d];
            let vh = sh.head(v, sh.kv_heads, s, g);
            let slope = sh.alibi.map(|a| a.slope(h, sh.heads));
            for (rows, cols) in sh.blocks(block) {
                scaled_scores(q, k, sh, s, h, g, rows.clone(), cols.clone(), &mut p);
                for i in rows.clone() {
                    let row = &mut p[i * t + cols.start..i * t + cols.end];
                    let vis = sh.visible(i);
                    let live = vis.start - cols.start..vis.end - cols.start;
                    if let Some(slope) = slope {
                        add_alibi(&mut row[live.clone()], vis.start, i, slope);
                    }
                    if let Some(c) = sh.softcap {
                        row[live.clone()]
                            .iter_mut()
                            .for_each(|x| *x = vmath::softcap_slope(*x, c).0);
                    }
                    lse_rows[i] = masked_softmax_row(row, live);
                }
                matmul(
                    &mut tile[rows.start * d..],
                    d,
                    MatRef {
                        data: &p[rows.start * t + cols.start..],
                        rows: rows.len(),
                        cols: cols.len(),
                        rs: t,
                        cs: 1,
                    },
                    rows_of(vh, cols),
                    1.0,
                    false,
                    Parallelism::None,
                );
            }
            tile
        })
        .collect();
    scatter_heads(&tiles, sh, sh.heads, out, false);
}

/// `p[rows, cols] = scale · Q_h[rows] K_g[cols]ᵀ` for sequence `s` (`p` is `[tokens, tokens]`).
#[allow(clippy::too_many_arguments)]
fn scaled_scores(
    q: &[f32],
    k: &[f32],
    sh: AttnShape,
    s: usize,
    h: usize,
    g: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    p: &mut [f32],
) {
    let qh = rows_of(sh.head(q, sh.heads, s, h), rows.clone());
    let kh = rows_of(sh.head(k, sh.kv_heads, s, g), cols.clone());
    matmul(
        &mut p[rows.start * sh.tokens + cols.start..],
        sh.tokens,
        qh,
        kh.t(),
        sh.scale(),
        false,
        Parallelism::None,
    );
}

/// Softmax over `row[visible]` (sum in f64), zero elsewhere (the causal and window masks); returns the
/// row's log-sum-exp.
fn masked_softmax_row(row: &mut [f32], visible: std::ops::Range<usize>) -> f32 {
    let (before, rest) = row.split_at_mut(visible.start);
    let (live, after) = rest.split_at_mut(visible.len());
    let max = vmath::max(live);
    let sum = vmath::exp_in_place_sum(live, max);
    vmath::scale(live, (1.0 / sum) as f32);
    before.fill(0.0);
    after.fill(0.0);
    (max as f64 + sum.ln()) as f32
}

/// Write (or add) per-(sequence, head) tiles `[tokens, head_dim]` (tile index `s * n_heads + h`) into a
/// `[seqs * tokens, n_heads * head_dim]` buffer; parallel over sequences (disjoint row blocks).
fn scatter_heads(tiles: &[Vec<f32>], sh: AttnShape, n_heads: usize, dst: &mut [f32], add: bool) {
    let (t, d) = (sh.tokens, sh.head_dim);
    let width = n_heads * d;
    dst.par_chunks_mut(t * width)
        .enumerate()
        .for_each(|(s, block)| {
            for h in 0..n_heads {
                let tile = &tiles[s * n_heads + h];
                for r in 0..t {
                    let o = &mut block[r * width + h * d..r * width + (h + 1) * d];
                    let src = &tile[r * d..(r + 1) * d];
                    if add {
                        o.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                    } else {
                        o.copy_from_slice(src);
                    }
                }
            }
        });
}

/// [`super::Device::attention_sinks_forward`]: per sequence (one rayon task), each row and head's output
/// × σ(lse − s_h) and its lse ← log(eˡˢᵉ + eˢʰ).
pub fn attention_sinks_forward(sinks: &[f32], sh: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let (t, d, heads) = (sh.tokens, sh.head_dim, sh.heads);
    (out.par_chunks_mut(t * heads * d))
        .zip(lse.par_chunks_mut(heads * t))
        .for_each(|(out, lse)| {
            for (h, &s) in sinks.iter().enumerate() {
                for i in 0..t {
                    let l = &mut lse[h * t + i];
                    let x = (s - *l) as f64;
                    let keep = 1.0 / (1.0 + x.exp());
                    let o = &mut out[(i * heads + h) * d..(i * heads + h + 1) * d];
                    o.iter_mut().for_each(|v| *v = (*v as f64 * keep) as f32);
                    // log(eᴸ + eˢ) = max + log(1 + e^(−|L − s|)), exact for either far larger.
                    *l = (l.max(s) as f64 + (-x.abs()).exp().ln_1p()) as f32;
                }
            }
        });
}

/// [`super::Device::attention_sinks_backward`]: per sequence the heads' sums (in f64), then added up.
pub fn attention_sinks_backward(
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    sinks: &[f32],
    sh: AttnShape,
    dsinks: &mut [f32],
) {
    let (t, d, heads) = (sh.tokens, sh.head_dim, sh.heads);
    let per_seq = |s: usize| -> Vec<f64> {
        (0..heads)
            .map(|h| {
                (0..t)
                    .map(|i| {
                        let r = ((s * t + i) * heads + h) * d;
                        let dot: f64 = (out[r..r + d].iter().zip(&dout[r..r + d]))
                            .map(|(&o, &g)| o as f64 * g as f64)
                            .sum();
                        let p = (sinks[h] as f64 - lse[(s * heads + h) * t + i] as f64).exp();
                        -p * dot
                    })
                    .sum()
            })
            .collect()
    };
    let sums = (0..sh.seqs).into_par_iter().map(per_seq).reduce(
        || vec![0.0; heads],
        |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
    );
    dsinks
        .iter_mut()
        .zip(sums)
        .for_each(|(g, s)| *g += s as f32);
}

/// The buffers of an attention with sinks: `sinks` one per head, `out` and `lse` the attention's.
pub fn check_sinks(sh: AttnShape, sinks: usize, out: usize, lse: usize) -> Result<()> {
    let rows = sh.seqs * sh.tokens * sh.heads;
    if sinks != sh.heads || out != rows * sh.head_dim || lse != rows {
        return Err(crate::Error::invalid(format!(
            "attention sinks: {sinks} sinks, {out} outputs and {lse} log-sum-exps for {} heads of \
             {} rows of {} values",
            sh.heads,
            sh.seqs * sh.tokens,
            sh.head_dim
        )));
    }
    Ok(())
}

/// Per kv head g (one rayon task), over the query heads h of its group, with P the probabilities
/// recomputed from the scores and the forward's log-sum-exp (P = exp(S − lse) where visible, 0 elsewhere):
/// dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ_h = scale dS K, dK += scale dSᵀ Q_h, dV += Pᵀ dO. Each
/// product runs per block of query rows over the keys the block sees (`ATT_BLOCK` rows).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    dout: &[f32],
    sh: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    attention_backward_blocked(q, k, v, lse, dout, sh, dq, dk, dv, ATT_BLOCK);
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    dout: &[f32],
    sh: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    block: usize,
) {
    let (t, d, grp) = (sh.tokens, sh.head_dim, sh.group());
    // Per kv head: (dQ tiles of its query heads, dK tile, dV tile).
    type KvGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let tasks: Vec<KvGrads> = (0..sh.seqs * sh.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (s, g) = (task / sh.kv_heads, task % sh.kv_heads);
            let kh = sh.head(k, sh.kv_heads, s, g);
            let vh = sh.head(v, sh.kv_heads, s, g);
            let mut dk_t = vec![0f32; t * d];
            let mut dv_t = vec![0f32; t * d];
            let mut dp = vec![0f32; t * t];
            let mut p = vec![0f32; t * t];
            // With soft-capping, d(capped)/d(score) = 1 − tanh² per visible score.
            let mut cap_slope = vec![0f32; if sh.softcap.is_some() { t * t } else { 0 }];
            let mut dq_tiles = Vec::with_capacity(grp);
            for h in g * grp..(g + 1) * grp {
                let lse_rows = &lse[(s * sh.heads + h) * t..(s * sh.heads + h + 1) * t];
                let doh = sh.head(dout, sh.heads, s, h);
                let qh = sh.head(q, sh.heads, s, h);
                let mut dq_t = vec![0f32; t * d];
                let slope = sh.alibi.map(|a| a.slope(h, sh.heads));
                for (rows, cols) in sh.blocks(block) {
                    scaled_scores(q, k, sh, s, h, g, rows.clone(), cols.clone(), &mut p);
                    for i in rows.clone() {
                        let row = &mut p[i * t + cols.start..i * t + cols.end];
                        let vis = sh.visible(i);
                        let (a, b) = (vis.start - cols.start, vis.end - cols.start);
                        if let Some(slope) = slope {
                            add_alibi(&mut row[a..b], vis.start, i, slope);
                        }
                        if let Some(c) = sh.softcap {
                            let o = i * t + cols.start;
                            let slope = &mut cap_slope[o + a..o + b];
                            for (x, sl) in row[a..b].iter_mut().zip(slope) {
                                (*x, *sl) = vmath::softcap_slope(*x, c);
                            }
                        }
                        row[..a].fill(0.0);
                        vmath::exp_in_place_scaled(&mut row[a..b], lse_rows[i], 1.0);
                        row[b..].fill(0.0);
                    }
                    let pb = MatRef {
                        data: &p[rows.start * t + cols.start..],
                        rows: rows.len(),
                        cols: cols.len(),
                        rs: t,
                        cs: 1,
                    };
                    let (dob, qb) = (rows_of(doh, rows.clone()), rows_of(qh, rows.clone()));
                    let (kb, vb) = (rows_of(kh, cols.clone()), rows_of(vh, cols.clone()));
                    matmul(
                        &mut dv_t[cols.start * d..],
                        d,
                        pb.t(),
                        dob,
                        1.0,
                        true,
                        Parallelism::None,
                    );
                    let dpb = &mut dp[rows.start * t + cols.start..];
                    matmul(dpb, t, dob, vb.t(), 1.0, false, Parallelism::None);
                    for i in rows.clone() {
                        let o = i * t + cols.start;
                        let (pr, dr) = (&p[o..o + cols.len()], &mut dp[o..o + cols.len()]);
                        let vis = sh.visible(i);
                        let (a, b) = (vis.start - cols.start, vis.end - cols.start);
                        let dot: f64 = (a..b).map(|j| pr[j] as f64 * dr[j] as f64).sum();
                        let (before, rest) = dr.split_at_mut(a);
                        let (live, after) = rest.split_at_mut(b - a);
                        for (x, &pj) in live.iter_mut().zip(&pr[a..b]) {
                            *x = (pj as f64 * (*x as f64 - dot)) as f32;
                        }
                        if sh.softcap.is_some() {
                            let slope = &cap_slope[o + a..o + b];
                            live.iter_mut().zip(slope).for_each(|(x, &sl)| *x *= sl);
                        }
                        before.fill(0.0);
                        after.fill(0.0);
                    }
                    let dsb = MatRef {
                        data: &dp[rows.start * t + cols.start..],
                        rows: rows.len(),
                        cols: cols.len(),
                        rs: t,
                        cs: 1,
                    };
                    matmul(
                        &mut dq_t[rows.start * d..],
                        d,
                        dsb,
                        kb,
                        sh.scale(),
                        false,
                        Parallelism::None,
                    );
                    matmul(
                        &mut dk_t[cols.start * d..],
                        d,
                        dsb.t(),
                        qb,
                        sh.scale(),
                        true,
                        Parallelism::None,
                    );
                }
                dq_tiles.push(dq_t);
            }
            (dq_tiles, dk_t, dv_t)
        })
        .collect();
    let mut dq_tiles = Vec::with_capacity(sh.seqs * sh.heads);
    let mut dk_tiles = Vec::with_capacity(sh.seqs * sh.kv_heads);
    let mut dv_tiles = Vec::with_capacity(sh.seqs * sh.kv_heads);
    for (qs, kt, vt) in tasks {
        dq_tiles.extend(qs);
        dk_tiles.push(kt);
        dv_tiles.push(vt);
    }
    scatter_heads(&dq_tiles, sh, sh.heads, dq, true);
    scatter_heads(&dk_tiles, sh, sh.kv_heads, dk, true);
    scatter_heads(&dv_tiles, sh, sh.kv_heads, dv, true);
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise: activations, multiply, add, row scaling
// ---------------------------------------------------------------------------------------------------------

const CHUNK: usize = 16_384;

/// `y = act(x)` (the kernels in [`vmath`]).
pub fn activation_forward(act: Activation, x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| match act {
            Activation::Silu => vmath::silu(xc, yc),
            Activation::GeluTanh => vmath::gelu_tanh(xc, yc),
            Activation::Softcap(c) => vmath::softcap(xc, yc, c),
            Activation::Gelu => vmath::gelu(xc, yc),
            Activation::Scale(s) => vmath::mul_scalar(xc, yc, s),
            Activation::Sigmoid => vmath::sigmoid(xc, yc),
            Activation::Relu => vmath::relu(xc, yc),
            Activation::Relu2 => vmath::relu2(xc, yc),
            Activation::Clamp(c) => vmath::clamp(xc, yc, c),
            Activation::ClampPlusOne(c) => vmath::clamp_plus_one(xc, yc, c),
            Activation::OssGate { alpha, limit } => vmath::oss_gate(xc, yc, alpha, limit),
        });
}

/// `dx += act'(x) dy`; SiLU: σ(x) (1 + x (1 − σ(x))); sigmoid: σ(x) (1 − σ(x)); ReLU: 1 where x > 0,
/// else 0.
pub fn activation_backward(act: Activation, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| match act {
            Activation::Silu => vmath::silu_backward(xc, gc, dc),
            Activation::GeluTanh => vmath::gelu_tanh_backward(xc, gc, dc),
            Activation::Softcap(c) => vmath::softcap_backward(xc, gc, dc, c),
            Activation::Gelu => vmath::gelu_backward(xc, gc, dc),
            Activation::Scale(s) => vmath::mul_scalar_backward(gc, dc, s),
            Activation::Sigmoid => vmath::sigmoid_backward(xc, gc, dc),
            Activation::Relu => vmath::relu_backward(xc, gc, dc),
            Activation::Relu2 => vmath::relu2_backward(xc, gc, dc),
            Activation::Clamp(c) | Activation::ClampPlusOne(c) => {
                vmath::clamp_backward(xc, gc, dc, c)
            }
            Activation::OssGate { alpha, limit } => {
                vmath::oss_gate_backward(xc, gc, dc, alpha, limit)
            }
        });
}

/// softplus(v) = ln(1 + eᵛ), and its slope σ(v).
fn softplus(v: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-v).exp());
    (if v > 20.0 { v } else { v.exp().ln_1p() }, s)
}

/// See [`super::Device::xielu_forward`]; `ap`, `an` the raw parameters.
pub fn xielu_forward(x: &[f32], [ap, an]: [f32; 2], k: Xielu, y: &mut [f32]) {
    let (alpha_p, alpha_n) = (softplus(ap).0, k.beta + softplus(an).0);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = match v > 0.0 {
                    true => alpha_p * v * v + k.beta * v,
                    false => alpha_n * (v.min(k.eps).exp_m1() - v) + k.beta * v,
                };
            }
        });
}

/// See [`super::Device::xielu_backward`]: `dx += y'(x) dy`, and the raw parameters' gradients, returned.
pub fn xielu_backward(
    x: &[f32],
    [ap, an]: [f32; 2],
    k: Xielu,
    dy: &[f32],
    dx: &mut [f32],
) -> [f32; 2] {
    let ((alpha_p, sp), (soft_n, sn)) = (softplus(ap), softplus(an));
    let alpha_n = k.beta + soft_n;
    let [pos, neg] = dx
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .map(|(dc, (xc, gc))| {
            let (mut pos, mut neg) = (0f64, 0f64);
            for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                if v > 0.0 {
                    *d += g * (2.0 * alpha_p * v + k.beta);
                    pos += g as f64 * (v as f64) * (v as f64);
                } else {
                    let m = v.min(k.eps);
                    let slope = if v < k.eps { m.exp() } else { 0.0 };
                    *d += g * (alpha_n * (slope - 1.0) + k.beta);
                    neg += g as f64 * (m.exp_m1() as f64 - v as f64);
                }
            }
            [pos, neg]
        })
        .reduce(|| [0.0; 2], |a, b| [a[0] + b[0], a[1] + b[1]]);
    [(pos * sp as f64) as f32, (neg * sn as f64) as f32]
}

/// See [`super::Device::column_blocks_forward`].
pub fn column_blocks_forward(x: &[f32], width: usize, cb: ColumnBlocks, y: &mut [f32]) {
    let groups = width / cb.stride;
    y.par_chunks_mut(groups * cb.block)
        .zip(x.par_chunks(width))
        .for_each(|(yr, xr)| {
            for (g, yb) in yr.chunks_mut(cb.block).enumerate() {
                let start = g * cb.stride + cb.offset;
                yb.copy_from_slice(&xr[start..start + cb.block]);
            }
        });
}

/// See [`super::Device::column_blocks_backward`].
pub fn column_blocks_backward(dy: &[f32], width: usize, cb: ColumnBlocks, dx: &mut [f32]) {
    let groups = width / cb.stride;
    dx.par_chunks_mut(width)
        .zip(dy.par_chunks(groups * cb.block))
        .for_each(|(dxr, dyr)| {
            for (g, gb) in dyr.chunks(cb.block).enumerate() {
                let start = g * cb.stride + cb.offset;
                for (d, &v) in dxr[start..start + cb.block].iter_mut().zip(gb) {
                    *d += v;
                }
            }
        });
}

pub fn mul_forward(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(yc, (ac, bc))| {
            for ((o, &x), &z) in yc.iter_mut().zip(ac).zip(bc) {
                *o = x * z;
            }
        });
}

/// `da += dy ⊙ b`, `db += dy ⊙ a`.
pub fn mul_backward(a: &[f32], b: &[f32], dy: &[f32], da: &mut [f32], db: &mut [f32]) {
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dac, dbc), (ac, bc)), gc)| {
            for i in 0..gc.len() {
                dac[i] += gc[i] * bc[i];
                dbc[i] += gc[i] * ac[i];
            }
        });
}

pub fn add_forward(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(yc, (ac, bc))| {
            for ((o, &x), &z) in yc.iter_mut().zip(ac).zip(bc) {
                *o = x + z;
            }
        });
}

/// `dst += src` (the backward of an add, for each input).
pub fn accumulate(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dc, sc)| dc.iter_mut().zip(sc).for_each(|(d, &s)| *d += s));
}

/// `y[r] = s[r] · x[r]` for rows of `d` values, `s` one value per row (see
/// [`super::Device::row_scale_forward`]); lengths checked by the caller ([`super::row_scale_rows`]).
pub fn row_scale_forward(x: &[f32], s: &[f32], d: usize, y: &mut [f32]) {
    if d == 0 {
        return;
    }
    let chunk = rows_per_task(d);
    y.par_chunks_mut(d * chunk)
        .zip(x.par_chunks(d * chunk).zip(s.par_chunks(chunk)))
        .for_each(|(yc, (xc, sc))| {
            for ((yr, xr), &f) in yc.chunks_mut(d).zip(xc.chunks(d)).zip(sc) {
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = f * v;
                }
            }
        });
}

/// `dx[r] += s[r] · dy[r]`, `ds[r] += dy[r] · x[r]` (each row's dot product summed in f64).
pub fn row_scale_backward(
    x: &[f32],
    s: &[f32],
    dy: &[f32],
    d: usize,
    dx: &mut [f32],
    ds: &mut [f32],
) {
    if d == 0 {
        return;
    }
    let chunk = rows_per_task(d);
    dx.par_chunks_mut(d * chunk)
        .zip(ds.par_chunks_mut(chunk))
        .zip(x.par_chunks(d * chunk).zip(dy.par_chunks(d * chunk)))
        .zip(s.par_chunks(chunk))
        .for_each(|(((dxc, dsc), (xc, gc)), sc)| {
            for (((dxr, dsr), (xr, gr)), &f) in dxc
                .chunks_mut(d)
                .zip(dsc)
                .zip(xc.chunks(d).zip(gc.chunks(d)))
                .zip(sc)
            {
                let mut dot = 0f64;
                for ((o, &v), &g) in dxr.iter_mut().zip(xr).zip(gr) {
                    *o += f * g;
                    dot += g as f64 * v as f64;
                }
                *dsr += dot as f32;
            }
        });
}

// ---------------------------------------------------------------------------------------------------------
// Softmax cross-entropy over rows of logits; target −1 = position not predicted
// ---------------------------------------------------------------------------------------------------------

/// Returns (`Σ −log softmax(row)[target]`, number of predicted rows), and writes each predicted row's
/// log-sum-exp into `lse` (`[rows]`).
pub fn cross_entropy_forward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    lse: &mut [f32],
) -> (f64, usize) {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter().zip(lse.par_iter_mut()))
        .filter(|(_, (&t, _))| t >= 0)
        .map(|(row, (&t, l))| {
            let max = vmath::max(row);
            let lse_row = max as f64 + vmath::sum_exp(row, max).ln();
            *l = lse_row as f32;
            (lse_row - row[t as usize] as f64, 1usize)
        })
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// [`cross_entropy_forward`] that also overwrites `logits` with the gradient of the mean loss,
/// `(softmax(row) − onehot(target)) / count` (zero for rows not predicted), in the same pass over each
/// row (one exponential per logit). The loss is the tape's root, so this is its whole backward; reusing
/// the logits' storage saves allocating (and page-faulting) a second rows × vocab buffer.
pub fn cross_entropy_forward_grad(
    logits: &mut [f32],
    vocab: usize,
    targets: &[i64],
    lse: &mut [f32],
) -> (f64, usize) {
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let scale = 1.0 / count.max(1) as f64;
    let sum = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter().zip(lse.par_iter_mut()))
        .map(|(row, (&t, l))| {
            if t < 0 {
                row.fill(0.0);
                return 0.0;
            }
            let target_logit = row[t as usize] as f64;
            let max = vmath::max(row);
            let sum = vmath::exp_in_place_sum(row, max);
            let lse_row = max as f64 + sum.ln();
            *l = lse_row as f32;
            vmath::scale(row, (scale / sum) as f32);
            row[t as usize] -= scale as f32;
            lse_row - target_logit
        })
        .sum();
    (sum, count)
}

// ---------------------------------------------------------------------------------------------------------
// Finite-difference gradient tests
// ---------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------
// The CPU as a runtime device
// ---------------------------------------------------------------------------------------------------------

/// The CPU device: host `Vec<f32>` buffers, parameters read from the store (borrowed from the memory map
/// when stored as f32), and the free functions above. Every op is infallible here.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl super::Device for Cpu {
    type Slice = [f32];
    type Buf = Vec<f32>;
    type Param<'s> = std::borrow::Cow<'s, [f32]>;
    type Weight<'s> = std::borrow::Cow<'s, [f32]>;
    type Ids = Vec<i64>;

    fn name(&self) -> String {
        "cpu".into()
    }
    fn alloc_zeroed(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }
    fn zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload(&self, host: &[f32], dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(host);
        Ok(())
    }
    fn download(&self, src: &[f32], host: &mut Vec<f32>) -> Result<()> {
        host.clear();
        host.extend_from_slice(src);
        Ok(())
    }
    fn host_view<'a>(&self, src: &'a [f32], _: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        Ok(src)
    }
    fn ids(&self, ids: &[i64]) -> Result<Vec<i64>> {
        Ok(ids.to_vec())
    }
    fn param<'s>(
        &self,
        store: &'s dyn ParamStore,
        name: &str,
        _len: usize,
    ) -> Result<std::borrow::Cow<'s, [f32]>> {
        store.param(name)
    }
    /// The CPU multiplies in f32: a weight is read as any parameter.
    fn weight<'s>(
        &self,
        store: &'s dyn ParamStore,
        name: &str,
        len: usize,
    ) -> Result<std::borrow::Cow<'s, [f32]>> {
        self.param(store, name, len)
    }
    fn weight_from<'a>(&self, w: &'a [f32]) -> Result<std::borrow::Cow<'a, [f32]>> {
        Ok(std::borrow::Cow::Borrowed(w))
    }
    fn copy(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn sum_sq(&self, g: &[f32]) -> Result<f64> {
        Ok(g.par_chunks(16_384)
            .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
            .sum())
    }
    fn embedding_forward(
        &self,
        ids: &Vec<i64>,
        table: &[f32],
        dim: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        embedding_forward(ids, table, dim, scale, out);
        Ok(())
    }
    fn embedding_backward(
        &self,
        ids: &Vec<i64>,
        dout: &[f32],
        dim: usize,
        scale: f32,
        padding: Option<usize>,
        dtable: &mut [f32],
    ) -> Result<()> {
        embedding_backward(ids, dout, dim, scale, padding, dtable);
        Ok(())
    }
    fn linear_forward(
        &self,
        x: &[f32],
        w: &std::borrow::Cow<'_, [f32]>,
        b: Option<&[f32]>,
        n: usize,
        k: usize,
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        linear_forward(x, w, b, n, k, m, y);
        Ok(())
    }
    fn linear_backward(
        &self,
        x: &[f32],
        w: &std::borrow::Cow<'_, [f32]>,
        dy: &[f32],
        n: usize,
        k: usize,
        m: usize,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> Result<()> {
        linear_backward(x, w, dy, n, k, m, dx, dw, db);
        Ok(())
    }
    fn norm_forward(
        &self,
        x: &[f32],
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        norm: NormShape,
        y: &mut [f32],
    ) -> Result<()> {
        norm_forward(x, w, b, norm, y);
        Ok(())
    }
    fn norm_backward(
        &self,
        x: &[f32],
        w: Option<&[f32]>,
        norm: NormShape,
        dy: &[f32],
        dx: &mut [f32],
        dw: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
    ) -> Result<()> {
        norm_backward(x, w, norm, dy, dx, dw, db);
        Ok(())
    }
    fn rope_forward(
        &self,
        x: &[f32],
        heads: usize,
        table: &RopeTable,
        y: &mut [f32],
    ) -> Result<()> {
        rope_forward(x, heads, table, y);
        Ok(())
    }
    fn rope_backward(
        &self,
        dy: &[f32],
        heads: usize,
        table: &RopeTable,
        dx: &mut [f32],
    ) -> Result<()> {
        rope_backward(dy, heads, table, dx);
        Ok(())
    }
    fn attention_forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        attention_forward(q, k, v, shape, out, lse);
        Ok(())
    }
    fn attention_backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lse: &[f32],
        dout: &[f32],
        shape: AttnShape,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> Result<()> {
        attention_backward(q, k, v, lse, dout, shape, dq, dk, dv);
        Ok(())
    }
    fn attention_sinks_forward(
        &self,
        sinks: &[f32],
        shape: AttnShape,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        check_sinks(shape, sinks.len(), out.len(), lse.len())?;
        attention_sinks_forward(sinks, shape, out, lse);
        Ok(())
    }
    fn attention_sinks_backward(
        &self,
        out: &[f32],
        dout: &[f32],
        lse: &[f32],
        sinks: &[f32],
        shape: AttnShape,
        dsinks: &mut [f32],
    ) -> Result<()> {
        check_sinks(shape, sinks.len(), out.len(), lse.len())?;
        check_sinks(shape, dsinks.len(), dout.len(), lse.len())?;
        attention_sinks_backward(out, dout, lse, sinks, shape, dsinks);
        Ok(())
    }
    fn activation_forward(&self, act: Activation, x: &[f32], y: &mut [f32]) -> Result<()> {
        activation_forward(act, x, y);
        Ok(())
    }
    fn activation_backward(
        &self,
        act: Activation,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) -> Result<()> {
        activation_backward(act, x, dy, dx);
        Ok(())
    }
    fn xielu_forward(
        &self,
        x: &[f32],
        [ap, an]: [&[f32]; 2],
        k: Xielu,
        y: &mut [f32],
    ) -> Result<()> {
        xielu_forward(x, [ap[0], an[0]], k, y);
        Ok(())
    }
    fn xielu_backward(
        &self,
        x: &[f32],
        [ap, an]: [&[f32]; 2],
        k: Xielu,
        dy: &[f32],
        dx: &mut [f32],
        dap: &mut [f32],
        dan: &mut [f32],
    ) -> Result<()> {
        let [gp, gn] = xielu_backward(x, [ap[0], an[0]], k, dy, dx);
        dap[0] += gp;
        dan[0] += gn;
        Ok(())
    }
    fn mul_forward(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<()> {
        mul_forward(a, b, y);
        Ok(())
    }
    fn mul_backward(
        &self,
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        da: &mut [f32],
        db: &mut [f32],
    ) -> Result<()> {
        mul_backward(a, b, dy, da, db);
        Ok(())
    }
    fn add_forward(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<()> {
        add_forward(a, b, y);
        Ok(())
    }
    fn row_scale_forward(&self, x: &[f32], s: &[f32], d: usize, y: &mut [f32]) -> Result<()> {
        super::row_scale_rows(s.len(), d, &[(x.len(), "x"), (y.len(), "output")], &[])?;
        row_scale_forward(x, s, d, y);
        Ok(())
    }
    fn row_scale_backward(
        &self,
        x: &[f32],
        s: &[f32],
        dy: &[f32],
        d: usize,
        dx: &mut [f32],
        ds: &mut [f32],
    ) -> Result<()> {
        super::row_scale_rows(
            s.len(),
            d,
            &[
                (x.len(), "x"),
                (dy.len(), "output gradient"),
                (dx.len(), "input gradient"),
            ],
            &[(ds.len(), "scale gradient")],
        )?;
        row_scale_backward(x, s, dy, d, dx, ds);
        Ok(())
    }
    fn column_blocks_forward(
        &self,
        x: &[f32],
        width: usize,
        blocks: ColumnBlocks,
        y: &mut [f32],
    ) -> Result<()> {
        blocks.rows(x.len(), width, y.len())?;
        column_blocks_forward(x, width, blocks, y);
        Ok(())
    }
    fn column_blocks_backward(
        &self,
        dy: &[f32],
        width: usize,
        blocks: ColumnBlocks,
        dx: &mut [f32],
    ) -> Result<()> {
        blocks.rows(dx.len(), width, dy.len())?;
        column_blocks_backward(dy, width, blocks, dx);
        Ok(())
    }
    fn accumulate(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        accumulate(dst, src);
        Ok(())
    }
    fn cross_entropy_forward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &Vec<i64>,
        lse: &mut [f32],
    ) -> Result<(f64, usize)> {
        Ok(cross_entropy_forward(logits, vocab, targets, lse))
    }
    fn cross_entropy_forward_grad(
        &self,
        logits: &mut [f32],
        vocab: usize,
        targets: &Vec<i64>,
        lse: &mut [f32],
    ) -> Result<(f64, usize)> {
        Ok(cross_entropy_forward_grad(logits, vocab, targets, lse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ops::RopePairs;
    use rand::{Rng, SeedableRng};

    fn lse0_of(row: &[f32]) -> f64 {
        row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln()
    }

    type GradsFn<'a> = dyn Fn(&[Vec<f32>], &[f32]) -> Vec<Vec<f32>> + 'a;

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Check an op's analytic gradients against central differences of L = Σ c ⊙ f(inputs), where c is a
    /// fixed random cotangent. `f` maps the inputs (f64, rounded to f32 for the op) to the output;
    /// `grads` returns the analytic gradient of every input given c. The op runs in f32, so the step is
    /// large enough (1e-2) for f32 rounding to stay below the tolerance, and L is accumulated in f64.
    fn check_grads(
        inputs: Vec<Vec<f32>>,
        out_len: usize,
        f: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
        grads: &GradsFn<'_>,
        tol: f64,
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = rand_vec(&mut rng, out_len);
        let loss = |ins: &[Vec<f32>]| -> f64 {
            f(ins)
                .iter()
                .zip(&c)
                .map(|(&y, &cc)| y as f64 * cc as f64)
                .sum()
        };
        let analytic = grads(&inputs, &c);
        let h = 1e-2f32;
        for (which, g) in analytic.iter().enumerate() {
            assert_eq!(g.len(), inputs[which].len());
            let mut worst = 0f64;
            let scale = g.iter().map(|v| v.abs() as f64).fold(1e-3, f64::max);
            for i in 0..inputs[which].len() {
                let mut plus = inputs.clone();
                plus[which][i] += h;
                let mut minus = inputs.clone();
                minus[which][i] -= h;
                let num = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
                worst = worst.max((num - g[i] as f64).abs() / scale);
            }
            assert!(worst < tol, "input {which}: max rel error {worst:.3e}");
        }
    }

    /// xIELU's backward against central differences, for x (both branches: values on either side of 0,
    /// none within a step of it or of eps) and for its two raw parameters.
    #[test]
    fn xielu_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let n = 40;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let v = rng.random_range(0.05f32..2.0);
                if i % 2 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect();
        let k = Xielu {
            beta: 0.5,
            eps: -1e-6,
        };
        check_grads(
            vec![x, vec![0.3], vec![-0.4]],
            n,
            &|i| {
                let mut y = vec![0.0; n];
                xielu_forward(&i[0], [i[1][0], i[2][0]], k, &mut y);
                y
            },
            &|i, c| {
                let mut dx = vec![0.0; n];
                let [dp, dn] = xielu_backward(&i[0], [i[1][0], i[2][0]], k, c, &mut dx);
                vec![dx, vec![dp], vec![dn]]
            },
            2e-3,
        );
    }

    #[test]
    fn linear_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (n, k, m) = (5, 4, 3);
        let ins = vec![
            rand_vec(&mut rng, n * k),
            rand_vec(&mut rng, m * k),
            rand_vec(&mut rng, m),
        ];
        check_grads(
            ins,
            n * m,
            &|i| {
                let mut y = vec![0.0; n * m];
                linear_forward(&i[0], &i[1], Some(&i[2]), n, k, m, &mut y);
                y
            },
            &|i, c| {
                let (mut dx, mut dw, mut db) = (vec![0.0; n * k], vec![0.0; m * k], vec![0.0; m]);
                linear_backward(
                    &i[0],
                    &i[1],
                    c,
                    n,
                    k,
                    m,
                    Some(&mut dx),
                    &mut dw,
                    Some(&mut db),
                );
                vec![dx, dw, db]
            },
            1e-3,
        );
    }

    #[test]
    fn linear_matches_naive_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (n, k, m) = (37, 29, 23);
        let (x, w) = (rand_vec(&mut rng, n * k), rand_vec(&mut rng, m * k));
        let mut y = vec![0.0; n * m];
        linear_forward(&x, &w, None, n, k, m, &mut y);
        for i in 0..n {
            for j in 0..m {
                let r: f64 = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum();
                assert!((r - y[i * m + j] as f64).abs() < 1e-5);
            }
        }
    }

    /// The weight gradient of a layer wider than its input (`m > k`, the lm_head and the MLP's gate/up),
    /// which goes through the transposed, blocked path: several blocks (k = 2048 → 2048-row blocks, m =
    /// 4100 leaves a ragged last one) and accumulation into a gradient that already holds values.
    #[test]
    fn wide_weight_gradient_matches_f64() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, k, m) = (9, 2048, 4100);
        let (x, dy) = (rand_vec(&mut rng, n * k), rand_vec(&mut rng, n * m));
        let prior = rand_vec(&mut rng, m * k);
        let mut dw = prior.clone();
        weight_grad(&x, &dy, n, k, m, &mut dw);
        let mut worst = 0f64;
        for j in (0..m).step_by(7) {
            for i in 0..k {
                let r: f64 = prior[j * k + i] as f64
                    + (0..n)
                        .map(|p| dy[p * m + j] as f64 * x[p * k + i] as f64)
                        .sum::<f64>();
                worst = worst.max((r - dw[j * k + i] as f64).abs());
            }
        }
        assert!(worst < 1e-5, "max abs error {worst:.3e}");
    }

    /// Plain and scaled (Gemma's √hidden) lookups; a padding row.
    #[test]
    fn embedding_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (vocab, dim) = (6, 4);
        let ids = [1i64, 4, 1, 0, 5];
        for scale in [1.0, 2.5] {
            check_grads(
                vec![rand_vec(&mut rng, vocab * dim)],
                ids.len() * dim,
                &|i| {
                    let mut y = vec![0.0; ids.len() * dim];
                    embedding_forward(&ids, &i[0], dim, scale, &mut y);
                    y
                },
                &|_, c| {
                    let mut d = vec![0.0; vocab * dim];
                    embedding_backward(&ids, c, dim, scale, None, &mut d);
                    vec![d]
                },
                1e-3,
            );
        }
        // A padding row takes nothing from the lookup (nn.Embedding's padding_idx); the others do.
        let dout = rand_vec(&mut rng, ids.len() * dim);
        let (mut all, mut padded) = (vec![0.0; vocab * dim], vec![0.0; vocab * dim]);
        embedding_backward(&ids, &dout, dim, 1.0, None, &mut all);
        embedding_backward(&ids, &dout, dim, 1.0, Some(1), &mut padded);
        assert!(all[dim..2 * dim].iter().all(|&g| g != 0.0));
        assert!(padded[dim..2 * dim].iter().all(|&g| g == 0.0));
        assert_eq!(all[4 * dim..], padded[4 * dim..]);
    }

    /// RMSNorm with LLaMA's gain `w` and Gemma's `1 + w`; LayerNorm (GPT-NeoX's) with a bias, and
    /// OLMo's without parameters (gain 1: its `w` unread, its gradient 0); LayerNorm with a weight and
    /// bias per group of rows (Cohere's per-head q/k norms: row r takes row r mod 3).
    #[test]
    fn norm_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (n, d) = (6, 8);
        for (offset, centre, weighted, groups) in [
            (0.0, false, true, 1),
            (1.0, false, true, 1),
            (0.0, true, true, 1),
            (1.0, true, false, 1),
            (0.0, true, true, 3),
        ] {
            let norm = NormShape {
                d,
                eps: 1e-5,
                offset,
                centre,
                groups,
            };
            let wd = groups * d;
            // A LayerNorm's input with a large mean: the centring must cancel it.
            let shift = if centre { 30.0 } else { 0.0 };
            let x = rand_vec(&mut rng, n * d)
                .iter()
                .map(|v| v + shift)
                .collect();
            let ins = vec![x, rand_vec(&mut rng, wd), rand_vec(&mut rng, wd)];
            let forward = |i: &[Vec<f32>], norm: NormShape, rows: std::ops::Range<usize>| {
                let mut y = vec![0.0; rows.len() * d];
                let (w, b) = (weighted.then_some(&i[1][..]), weighted && centre);
                let x = &i[0][rows.start * d..rows.end * d];
                norm_forward(x, w, b.then_some(&i[2][..]), norm, &mut y);
                y
            };
            // Per group: row r normalised alone with the weight and bias of its group.
            let whole = forward(&ins, norm, 0..n);
            for r in 0..n {
                let at = (r % groups) * d;
                let alone = [
                    ins[0].clone(),
                    ins[1][at..at + d].to_vec(),
                    ins[2][at..at + d].to_vec(),
                ];
                let shared = NormShape { groups: 1, ..norm };
                assert_eq!(forward(&alone, shared, r..r + 1), whole[r * d..(r + 1) * d]);
            }
            check_grads(
                ins,
                n * d,
                &|i| forward(i, norm, 0..n),
                &|i, c| {
                    let (mut dx, mut dw, mut db) = (vec![0.0; n * d], vec![0.0; wd], vec![0.0; wd]);
                    let dbo = (weighted && centre).then_some(&mut db[..]);
                    let (w, dwo) = match weighted {
                        true => (Some(&i[1][..]), Some(&mut dw[..])),
                        false => (None, None),
                    };
                    norm_backward(&i[0], w, norm, c, &mut dx, dwo, dbo);
                    vec![dx, dw, db]
                },
                2e-3,
            );
        }
        // LayerNorm against its definition in f64: zero mean, unit variance before the gain and bias.
        let norm = NormShape {
            d,
            eps: 0.0,
            offset: 0.0,
            centre: true,
            groups: 1,
        };
        let x: Vec<f32> = rand_vec(&mut rng, d)
            .iter()
            .map(|v| 5.0 * v + 7.0)
            .collect();
        let mut y = vec![0.0; d];
        norm_forward(&x, Some(&[1.0; 8]), Some(&[0.5; 8]), norm, &mut y);
        let mean = y.iter().map(|&v| v as f64 - 0.5).sum::<f64>() / d as f64;
        let var = y.iter().map(|&v| (v as f64 - 0.5).powi(2)).sum::<f64>() / d as f64;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{mean} {var}"
        );
    }

    /// GPT-NeoX's q, k, v out of the per-head interleaved projection, and the scatter back.
    #[test]
    fn column_blocks_gather_and_scatter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (rows, heads, hd) = (3, 2, 4);
        let width = heads * 3 * hd;
        for part in 0..3 {
            let cb = ColumnBlocks {
                block: hd,
                stride: 3 * hd,
                offset: part * hd,
            };
            let x = rand_vec(&mut rng, rows * width);
            let mut y = vec![0.0; rows * heads * hd];
            column_blocks_forward(&x, width, cb, &mut y);
            for r in 0..rows {
                for h in 0..heads {
                    for i in 0..hd {
                        let want = x[r * width + h * 3 * hd + part * hd + i];
                        assert_eq!(y[(r * heads + h) * hd + i], want);
                    }
                }
            }
            check_grads(
                vec![x],
                rows * heads * hd,
                &|i| {
                    let mut y = vec![0.0; rows * heads * hd];
                    column_blocks_forward(&i[0], width, cb, &mut y);
                    y
                },
                &|_, c| {
                    let mut dx = vec![0.0; rows * width];
                    column_blocks_backward(c, width, cb, &mut dx);
                    vec![dx]
                },
                1e-3,
            );
        }
        let bad = ColumnBlocks {
            block: 4,
            stride: 6,
            offset: 3,
        };
        assert!(bad.rows(24, 12, 8).is_err());
    }

    /// Full and partial rotary (Phi-3's `partial_rotary_factor`: 6 of 8 values rotate, pairs (i, i + 3),
    /// the last 2 pass through), in the `rotate_half` layout and Cohere's interleaved one (pairs
    /// (2i, 2i + 1)), against HF's formulas and finite differences.
    #[test]
    fn rope_gradients_and_rotate_half_convention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (seqs, tokens, heads, hd) = (2, 5, 3, 8);
        for (rot, pairs) in [
            (hd, RopePairs::Halves),
            (6, RopePairs::Halves),
            (hd, RopePairs::Interleaved),
            (6, RopePairs::Interleaved),
        ] {
            let inv: Vec<f64> = (0..rot / 2)
                .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / rot as f64))
                .collect();
            let table = RopeTable::with_pairs(&inv, hd, tokens, 1.0, pairs);
            let n = seqs * tokens * heads * hd;
            let x = rand_vec(&mut rng, n);
            // Direct check of elements against the HF formula.
            let mut y = vec![0.0; n];
            rope_forward(&x, heads, &table, &mut y);
            let (s, t, h) = (1, 3, 2);
            let base = (s * tokens + t) * heads * hd + h * hd;
            for i in [1, rot / 2, rot / 2 + 1] {
                // HF: rotate_half(x) = [−x₂, x₁]; Cohere's rotate_half(x) = stack([−x[1::2], x[::2]]).
                let (freq, partner) = match pairs {
                    RopePairs::Halves if i < rot / 2 => (i, -x[base + i + rot / 2]),
                    RopePairs::Halves => (i - rot / 2, x[base + i - rot / 2]),
                    RopePairs::Interleaved if i.is_multiple_of(2) => (i / 2, -x[base + i + 1]),
                    RopePairs::Interleaved => (i / 2, x[base + i - 1]),
                };
                let ang = t as f64 * inv[freq];
                let want = x[base + i] as f64 * ang.cos() + partner as f64 * ang.sin();
                assert!(
                    (want - y[base + i] as f64).abs() < 1e-5,
                    "{pairs:?} rot {rot} i {i}"
                );
            }
            for i in rot..hd {
                assert_eq!(
                    y[base + i],
                    x[base + i],
                    "rot {rot}: value {i} passes through"
                );
            }
            check_grads(
                vec![x],
                n,
                &|i| {
                    let mut y = vec![0.0; n];
                    rope_forward(&i[0], heads, &table, &mut y);
                    y
                },
                &|_, c| {
                    let mut dx = vec![0.0; n];
                    rope_backward(c, heads, &table, &mut dx);
                    vec![dx]
                },
                1e-3,
            );
        }
    }

    /// Finite-difference check of attention over q, k, v, and the mask: output row i must not move when
    /// a value row outside `visible(i)` does (the first token sees only itself).
    fn check_attention(sh: AttnShape, seed: u64) {
        for block in [ATT_BLOCK, 1, 2, 3] {
            check_attention_blocked(sh, seed, block);
        }
    }

    fn check_attention_blocked(sh: AttnShape, seed: u64, block: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let nq = sh.seqs * sh.tokens * sh.heads * sh.head_dim;
        let nk = sh.seqs * sh.tokens * sh.kv_heads * sh.head_dim;
        let np = sh.seqs * sh.heads * sh.tokens;
        let ins = vec![
            rand_vec(&mut rng, nq),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
        ];
        let fwd = |i: &[Vec<f32>]| {
            let (mut o, mut p) = (vec![0.0; nq], vec![0.0; np]);
            attention_forward_blocked(&i[0], &i[1], &i[2], sh, &mut o, &mut p, block);
            (o, p)
        };
        let (o, _) = fwd(&ins);
        let (qw, kw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        for h in 0..sh.heads {
            let g = h / sh.group();
            for j in 0..sh.head_dim {
                let vv = ins[2][g * sh.head_dim + j];
                assert!((o[h * sh.head_dim + j] - vv).abs() < 1e-6);
            }
        }
        // Move value row r of sequence 0: exactly the query rows that see r may change.
        for r in 0..sh.tokens {
            let mut moved = ins.clone();
            moved[2][r * kw..(r + 1) * kw]
                .iter_mut()
                .for_each(|x| *x += 1.0);
            let (o2, _) = fwd(&moved);
            for i in 0..sh.tokens {
                let changed = o[i * qw..(i + 1) * qw] != o2[i * qw..(i + 1) * qw];
                assert_eq!(changed, sh.visible(i).contains(&r), "query {i}, value {r}");
            }
        }
        check_grads(
            ins,
            nq,
            &|i| fwd(i).0,
            &|i, c| {
                let (_, p) = fwd(i);
                let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
                let (q, k, v) = (&i[0], &i[1], &i[2]);
                attention_backward_blocked(q, k, v, &p, c, sh, &mut dq, &mut dk, &mut dv, block);
                vec![dq, dk, dv]
            },
            2e-3,
        );
    }

    #[test]
    fn attention_gradients_gqa() {
        let sh = AttnShape {
            seqs: 2,
            tokens: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
        };
        check_attention(sh, 8);
        // A scale other than 1/√head_dim (Gemma 3): its gradients, and it acts as scaling q would.
        let scaled = AttnShape {
            scale: Some(0.8),
            ..sh
        };
        check_attention(scaled, 9);
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let (nq, nk) = (2 * 4 * 4 * 3, 2 * 4 * 2 * 3);
        let (q, k, v) = (
            rand_vec(&mut rng, nq),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
        );
        let q_scaled: Vec<f32> = q.iter().map(|x| x * 0.8 * 3f32.sqrt()).collect();
        let (mut a, mut b, mut lse) = (vec![0.0; nq], vec![0.0; nq], vec![0.0; 2 * 4 * 4]);
        attention_forward(&q, &k, &v, scaled, &mut a, &mut lse);
        attention_forward(&q_scaled, &k, &v, sh, &mut b, &mut lse);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
        attention_forward(&q, &k, &v, sh, &mut b, &mut lse);
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
    }

    #[test]
    fn attention_gradients_sliding_window() {
        let sh = AttnShape {
            seqs: 2,
            tokens: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            window: Some(3),
            scale: None,
            softcap: None,
            alibi: None,
        };
        assert_eq!(sh.visible(0), 0..1);
        assert_eq!(sh.visible(2), 0..3);
        assert_eq!(sh.visible(6), 4..7);
        check_attention(sh, 10);
        // A window at least as long as the sequence is plain causal attention.
        let long = AttnShape {
            window: Some(7),
            ..sh
        };
        assert!((0..7).all(|i| long.visible(i) == (AttnShape { window: None, ..sh }).visible(i)));
    }

    /// Attention sinks: each output row against the softmax with the sink's logit written out in f64
    /// (windowed, GQA), the sink bites, and the gradients of q, k, v and the sinks (the attention's
    /// backward reading the lse the sinks updated) against finite differences.
    #[test]
    fn attention_sinks_match_the_formula_and_their_gradients() {
        let sh = AttnShape {
            seqs: 2,
            tokens: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            window: Some(3),
            scale: Some(0.7),
            softcap: None,
            alibi: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let (nq, nk, np) = (2 * 5 * 4 * 3, 2 * 5 * 2 * 3, 2 * 4 * 5);
        let ins = vec![
            rand_vec(&mut rng, nq),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, sh.heads),
        ];
        let fwd = |i: &[Vec<f32>]| {
            let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; np]);
            attention_forward(&i[0], &i[1], &i[2], sh, &mut o, &mut lse);
            let plain = o.clone();
            attention_sinks_forward(&i[3], sh, &mut o, &mut lse);
            (o, lse, plain)
        };
        let (o, lse, plain) = fwd(&ins);
        let (q, k, v, sinks) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        for (s, h, i) in [(0, 0, 0), (0, 3, 4), (1, 1, 2), (1, 2, 4)] {
            let g = h / sh.group();
            let qr = &q[((s * 5 + i) * 4 + h) * 3..][..3];
            let score = |j: usize| -> f64 {
                let kr = &k[((s * 5 + j) * 2 + g) * 3..][..3];
                0.7 * (qr.iter().zip(kr))
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            };
            let vis = sh.visible(i);
            let z: f64 = vis.clone().map(|j| score(j).exp()).sum::<f64>() + (sinks[h] as f64).exp();
            assert!((lse[(s * 4 + h) * 5 + i] as f64 - z.ln()).abs() < 1e-5);
            for d in 0..3 {
                let want: f64 = (vis.clone())
                    .map(|j| score(j).exp() / z * v[((s * 5 + j) * 2 + g) * 3 + d] as f64)
                    .sum();
                let r = ((s * 5 + i) * 4 + h) * 3 + d;
                assert!((o[r] as f64 - want).abs() < 1e-5, "({s}, {h}, {i}, {d})");
                assert!((plain[r] - o[r]).abs() > 1e-4, "the sink bites");
            }
        }
        check_grads(
            ins,
            nq,
            &|i| fwd(i).0,
            &|i, c| {
                let (o, lse, _) = fwd(i);
                let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
                attention_backward(&i[0], &i[1], &i[2], &lse, c, sh, &mut dq, &mut dk, &mut dv);
                let mut ds = vec![0.0; sh.heads];
                attention_sinks_backward(&o, c, &lse, &i[3], sh, &mut ds);
                vec![dq, dk, dv, ds]
            },
            2e-3,
        );
    }

    /// ALiBi's slopes are transformers' `build_alibi_tensor`'s (6 heads: 4, then the odd terms for 8;
    /// 8 heads) and MPT's for 8 heads with `alibi_bias_max` 16; the attention's gradients with it
    /// (windowed, GQA, 6 heads); one output row against the formula written out; and it bites.
    #[test]
    fn attention_with_alibi() {
        let bloom = Alibi {
            max_bias: 8.0,
            factor: 1.0,
        };
        let six: Vec<f32> = (0..6).map(|h| bloom.slope(h, 6)).collect();
        assert_eq!(six, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
        let eight: Vec<f32> = (0..8).map(|h| bloom.slope(h, 8)).collect();
        let want: Vec<f32> = (1..=8).map(|k| 0.5f32.powi(k)).collect();
        assert_eq!(eight, want);
        let mpt16 = Alibi {
            max_bias: 16.0,
            factor: 1.0,
        };
        assert_eq!(mpt16.slope(0, 8), 0.25);
        assert_eq!(mpt16.slope(7, 8), 2f32.powi(-16));
        let sh = AttnShape {
            seqs: 2,
            tokens: 7,
            heads: 6,
            kv_heads: 3,
            head_dim: 3,
            window: Some(5),
            scale: None,
            softcap: None,
            alibi: Some(Alibi {
                max_bias: 8.0,
                factor: 2.0,
            }),
        };
        check_attention(sh, 14);
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let (nq, nk) = (2 * 7 * 6 * 3, 2 * 7 * 3 * 3);
        let (q, k, v) = (
            rand_vec(&mut rng, nq),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
        );
        let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; 2 * 6 * 7]);
        attention_forward(&q, &k, &v, sh, &mut o, &mut lse);
        // Sequence 0, query head 4 (kv head 2, slope 2 · 0.5), row 6: keys 2..=6.
        let (s, h, g, i) = (0usize, 4usize, 2usize, 6usize);
        let qi = &q[(s * 7 + i) * 18 + h * 3..][..3];
        let scores: Vec<f64> = (2..=6)
            .map(|j| {
                let kj = &k[(s * 7 + j) * 9 + g * 3..][..3];
                let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                dot / 3f64.sqrt() + 1.0 * (j as f64 - i as f64)
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for dim in 0..3 {
            let want: f64 = (2..=6)
                .zip(&scores)
                .map(|(j, sc)| (sc - m).exp() / z * v[(s * 7 + j) * 9 + g * 3 + dim] as f64)
                .sum();
            let got = o[(s * 7 + i) * 18 + h * 3 + dim] as f64;
            assert!((got - want).abs() < 1e-5, "dim {dim}: {got} vs {want}");
        }
        let mut plain = vec![0.0; nq];
        attention_forward(
            &q,
            &k,
            &v,
            AttnShape { alibi: None, ..sh },
            &mut plain,
            &mut lse,
        );
        assert!(o.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-2));
    }

    /// Gemma 2's soft-capped scores, c · tanh(s / c): gradients (windowed, GQA), and one output row
    /// against the formula written out.
    #[test]
    fn attention_gradients_soft_capped() {
        let sh = AttnShape {
            seqs: 2,
            tokens: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            window: Some(4),
            scale: None,
            softcap: Some(0.7),
            alibi: None,
        };
        check_attention(sh, 12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (nq, nk) = (2 * 7 * 4 * 3, 2 * 7 * 2 * 3);
        let (q, k, v) = (
            rand_vec(&mut rng, nq)
                .iter()
                .map(|x| 3.0 * x)
                .collect::<Vec<_>>(),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
        );
        let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; 2 * 4 * 7]);
        attention_forward(&q, &k, &v, sh, &mut o, &mut lse);
        // Sequence 1, query head 3 (kv head 1), row 5: keys 2..=5.
        let (s, h, g, i) = (1usize, 3usize, 1usize, 5usize);
        let qi = &q[(s * 7 + i) * 12 + h * 3..][..3];
        let scores: Vec<f64> = (2..=5)
            .map(|j| {
                let kj = &k[(s * 7 + j) * 6 + g * 3..][..3];
                let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                let sc = dot / 3f64.sqrt();
                0.7 * (sc / 0.7).tanh()
            })
            .collect();
        let z: f64 = scores.iter().map(|x| x.exp()).sum();
        for d in 0..3 {
            let want: f64 = (2..=5)
                .zip(&scores)
                .map(|(j, sc)| sc.exp() / z * v[(s * 7 + j) * 6 + g * 3 + d] as f64)
                .sum();
            let got = o[(s * 7 + i) * 12 + h * 3 + d] as f64;
            assert!((got - want).abs() < 1e-5, "value {d}: {got} vs {want}");
        }
    }

    #[test]
    fn activation_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let n = 40;
        for act in [
            Activation::Silu,
            Activation::GeluTanh,
            Activation::Softcap(1.7),
            Activation::Gelu,
            Activation::Scale(-0.3),
            Activation::Sigmoid,
            Activation::Relu,
            Activation::Relu2,
            Activation::Clamp(1.5),
            Activation::ClampPlusOne(1.5),
            Activation::OssGate {
                alpha: 1.702,
                limit: 1.5,
            },
        ] {
            let mut x: Vec<f32> = rand_vec(&mut rng, n).iter().map(|v| 3.0 * v).collect();
            // ReLU has no derivative at 0, the clamp none at ±1.5: keep the inputs (and the ±1e-2
            // steps) clear of them.
            let kink = match act {
                Activation::Relu | Activation::Relu2 => Some(0.0),
                Activation::Clamp(c) | Activation::ClampPlusOne(c) => Some(c),
                Activation::OssGate { limit, .. } => Some(limit),
                _ => None,
            };
            if let Some(k) = kink {
                for v in &mut x {
                    if (v.abs() - k).abs() < 0.1 {
                        *v += 0.2 * v.signum();
                    }
                }
            }
            if let Activation::Clamp(c) = act {
                assert!(x.iter().any(|v| v.abs() > c) && x.iter().any(|v| v.abs() < c));
            }
            check_grads(
                vec![x],
                n,
                &|i| {
                    let mut y = vec![0.0; n];
                    activation_forward(act, &i[0], &mut y);
                    y
                },
                &|i, c| {
                    let mut dx = vec![0.0; n];
                    activation_backward(act, &i[0], c, &mut dx);
                    vec![dx]
                },
                2e-3,
            );
        }
    }

    #[test]
    fn mul_add_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let n = 30;
        let ins = vec![rand_vec(&mut rng, n), rand_vec(&mut rng, n)];
        check_grads(
            ins.clone(),
            n,
            &|i| {
                let mut y = vec![0.0; n];
                mul_forward(&i[0], &i[1], &mut y);
                y
            },
            &|i, c| {
                let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
                mul_backward(&i[0], &i[1], c, &mut da, &mut db);
                vec![da, db]
            },
            1e-3,
        );
        check_grads(
            ins,
            n,
            &|i| {
                let mut y = vec![0.0; n];
                add_forward(&i[0], &i[1], &mut y);
                y
            },
            &|_, c| {
                let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
                accumulate(&mut da, c);
                accumulate(&mut db, c);
                vec![da, db]
            },
            1e-3,
        );
    }

    /// Rows scaled by one value each (a routing weight), the gradients of x and of the scales; rows of
    /// one value, and the empty cases.
    #[test]
    fn row_scale_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for (rows, d) in [(5, 7), (3, 1), (1, 33)] {
            let ins = vec![rand_vec(&mut rng, rows * d), rand_vec(&mut rng, rows)];
            let mut y = vec![0.0; rows * d];
            row_scale_forward(&ins[0], &ins[1], d, &mut y);
            for r in 0..rows {
                for j in 0..d {
                    assert_eq!(y[r * d + j], ins[1][r] * ins[0][r * d + j]);
                }
            }
            check_grads(
                ins,
                rows * d,
                &|i| {
                    let mut y = vec![0.0; rows * d];
                    row_scale_forward(&i[0], &i[1], d, &mut y);
                    y
                },
                &|i, c| {
                    let (mut dx, mut ds) = (vec![0.0; rows * d], vec![0.0; rows]);
                    row_scale_backward(&i[0], &i[1], c, d, &mut dx, &mut ds);
                    vec![dx, ds]
                },
                1e-3,
            );
        }
        // Through the device: no rows, rows of no values, and lengths that disagree.
        use super::super::Device;
        let mut none: Vec<f32> = vec![];
        Cpu.row_scale_forward(&[], &[], 4, &mut none).unwrap();
        let mut ds = vec![1.0; 3];
        Cpu.row_scale_backward(&[], &[1.0; 3], &[], 0, &mut none, &mut ds)
            .unwrap();
        assert_eq!(ds, [1.0; 3]);
        let mut y = vec![0.0; 6];
        assert!(Cpu
            .row_scale_forward(&[1.0; 6], &[1.0; 2], 4, &mut y)
            .is_err());
        assert!(Cpu
            .row_scale_forward(&[1.0; 8], &[1.0; 2], 4, &mut y)
            .is_err());
        let mut ds = vec![0.0; 3];
        let mut dx = vec![0.0; 8];
        assert!(Cpu
            .row_scale_backward(&[1.0; 8], &[1.0; 2], &[1.0; 8], 4, &mut dx, &mut ds)
            .is_err());
    }

    #[test]
    fn cross_entropy_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (rows, vocab) = (4, 7);
        let targets = [3i64, -1, 0, 6];
        let logits: Vec<f32> = rand_vec(&mut rng, rows * vocab)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let mut lse = vec![0f32; rows];
        let (sum, count) = cross_entropy_forward(&logits, vocab, &targets, &mut lse);
        assert!((lse[0] as f64 - lse0_of(&logits[..vocab])).abs() < 1e-5);
        assert_eq!(count, 3);
        // Reference value for row 0 in f64.
        let row0: Vec<f64> = logits[..vocab].iter().map(|&v| v as f64).collect();
        let lse0 = row0.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!(sum > lse0 - row0[3]);
        check_grads(
            vec![logits],
            1,
            &|i| {
                let mut l = vec![0f32; rows];
                vec![(cross_entropy_forward(&i[0], vocab, &targets, &mut l).0 / 3.0) as f32]
            },
            &|i, c| {
                let mut d = i[0].clone();
                let mut l = vec![0f32; rows];
                let (s, n) = cross_entropy_forward_grad(&mut d, vocab, &targets, &mut l);
                let (s0, n0) = cross_entropy_forward(&i[0], vocab, &targets, &mut l);
                assert!((s - s0).abs() < 1e-12 * s0.abs() && n == n0);
                d.iter_mut().for_each(|v| *v *= c[0]);
                vec![d]
            },
            2e-3,
        );
    }
}
