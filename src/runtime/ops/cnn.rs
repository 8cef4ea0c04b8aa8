//! CPU kernels of the convolutional networks' ops over NCHW f32 tensors: 2-D convolution (im2col + the
//! crate's GEMM), batch norm with inference statistics, ReLU, max pooling, adaptive average pooling and the
//! option-A shortcut of the CIFAR ResNets. Conventions as in [`super`]: forwards write, backwards
//! accumulate. Images are independent, so every kernel is parallel over images (or image × channel
//! planes); the GEMMs inside run single-threaded per image.
//!
//! Flatten needs no kernel: a tape buffer is `[n, c·h·w]` row-major, which is already the flattened NCHW
//! tensor a linear layer reads. Linear, add and cross-entropy are the decoder's ([`super::cpu`]).

use crate::linalg::{matmul, MatRef, Parallelism};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------------------
// Conv2d: y[n, o, ho, wo] = Σ_{c, i, j} w[o, c, i, j] · x[n, c, ho·s − p + i, wo·s − p + j] (+ b[o])
// ---------------------------------------------------------------------------------------------------------

/// The shape of one convolution (groups = 1, dilation = 1, zero padding on all four sides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Images.
    pub n: usize,
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the im2col matrix: c·kh·kw.
    fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Values per input image, per output image.
    pub fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.o * self.ho() * self.wo()
    }
    /// A 1×1 stride-1 unpadded convolution reads the image itself as its im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// The input row of output row `oy` at kernel offset `i`, or `None` in the padding.
fn source(o: usize, i: usize, stride: usize, pad: usize, size: usize) -> Option<usize> {
    (o * stride + i).checked_sub(pad).filter(|&v| v < size)
}

/// The output positions `o` (of `out`) whose input `o·stride − pad + k` lies inside `0..size`: a
/// contiguous range, so the copies below run over plain slices instead of testing every element.
fn valid(out: usize, k: usize, stride: usize, pad: usize, size: usize) -> std::ops::Range<usize> {
    // o·stride + k ≥ pad  and  o·stride + k < size + pad.
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = if size + pad > k {
        (size + pad - k).div_ceil(stride)
    } else {
        0
    };
    lo.min(out)..hi.clamp(lo.min(out), out)
}

/// `col[(c, i, j), (oy, ox)] = x[c, oy·s − p + i, ox·s − p + j]` (0 in the padding) for one image.
fn im2col(x: &[f32], s: &ConvShape, col: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    for c in 0..s.c {
        for i in 0..s.kh {
            let rows = valid(ho, i, s.stride, s.pad, s.h);
            for j in 0..s.kw {
                let cols = valid(wo, j, s.stride, s.pad, s.w);
                let row = &mut col[((c * s.kh + i) * s.kw + j) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    if !rows.contains(&oy) || cols.is_empty() {
                        dst.fill(0.0);
                        continue;
                    }
                    let y = oy * s.stride + i - s.pad;
                    let src = &x[(c * s.h + y) * s.w..][..s.w];
                    dst[..cols.start].fill(0.0);
                    dst[cols.end..].fill(0.0);
                    let x0 = cols.start * s.stride + j - s.pad;
                    let d = &mut dst[cols.clone()];
                    if s.stride == 1 {
                        d.copy_from_slice(&src[x0..x0 + d.len()]);
                    } else {
                        for (k, v) in d.iter_mut().enumerate() {
                            *v = src[x0 + k * s.stride];
                        }
                    }
                }
            }
        }
    }
}

/// The transpose of [`im2col`]: `row[(oy, ox), (c, i, j)]` (`[ho·wo, c·kh·kw]` row-major), the right
/// operand of the weight gradient `dW = dy · colᵀ`. The `gemm` crate runs that product with a transposed
/// (column-major) right operand at a fraction of its rate when the output is small and the sum long (16 ×
/// 144 from 1024 positions: 14–18 against ~150 GFLOP/s row-major here). Written position by position,
/// each position's `c·kh·kw` values contiguous, each kernel row's `kw` inputs one slice copy.
fn im2row(x: &[f32], s: &ConvShape, row: &mut [f32]) {
    let (ho, wo, ck) = (s.ho(), s.wo(), s.ck());
    // Output positions whose whole kernel window lies inside the image: most of them, copied by
    // `window_rows` without the edge tests.
    let (rows_in, cols_in) = (
        valid_window(ho, s.kh, s.stride, s.pad, s.h),
        valid_window(wo, s.kw, s.stride, s.pad, s.w),
    );
    for oy in 0..ho {
        for ox in 0..wo {
            let dst = &mut row[(oy * wo + ox) * ck..][..ck];
            if rows_in.contains(&oy) && cols_in.contains(&ox) {
                let top_left = (oy * s.stride - s.pad) * s.w + ox * s.stride - s.pad;
                match s.kw {
                    1 => window_rows::<1>(x, s, top_left, dst),
                    3 => window_rows::<3>(x, s, top_left, dst),
                    5 => window_rows::<5>(x, s, top_left, dst),
                    7 => window_rows::<7>(x, s, top_left, dst),
                    _ => window_rows::<0>(x, s, top_left, dst),
                }
                continue;
            }
            // Kernel columns j whose input ox·stride + j − pad lies inside the row.
            let x0 = ox * s.stride;
            let jlo = s.pad.saturating_sub(x0).min(s.kw);
            let jhi = (s.w + s.pad).saturating_sub(x0).clamp(jlo, s.kw);
            for c in 0..s.c {
                for i in 0..s.kh {
                    let d = &mut dst[(c * s.kh + i) * s.kw..][..s.kw];
                    let y = oy * s.stride + i;
                    if y < s.pad || y - s.pad >= s.h || jlo == jhi {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &x[(c * s.h + y - s.pad) * s.w..][..s.w];
                    d[..jlo].fill(0.0);
                    d[jhi..].fill(0.0);
                    let from = x0 + jlo - s.pad;
                    copy_short(&mut d[jlo..jhi], &src[from..from + (jhi - jlo)]);
                }
            }
        }
    }
}

/// The output positions `o` (of `out`) whose whole window `o·stride − pad + 0..k` lies inside `0..size`.
fn valid_window(
    out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    size: usize,
) -> std::ops::Range<usize> {
    let first = valid(out, 0, stride, pad, size);
    let last = valid(out, k - 1, stride, pad, size);
    first.start.max(last.start)..first.end.min(last.end).max(first.start.max(last.start))
}

/// One position's im2row entries when its window is inside the image: for each channel and kernel row,
/// the `kw` inputs from `top_left` (the window's first input in a channel plane). `KW` is `kw` known at
/// compile time (fixed-length copies: 8% of a ResNet-56 step against a length tested per copy), or 0
/// for a width without its own instance.
#[inline(always)]
fn window_rows<const KW: usize>(x: &[f32], s: &ConvShape, top_left: usize, dst: &mut [f32]) {
    let kw = if KW == 0 { s.kw } else { KW };
    let mut rows = dst.chunks_exact_mut(kw);
    for plane in x.chunks_exact(s.h * s.w).take(s.c) {
        for i in 0..s.kh {
            let (d, src) = (
                rows.next().expect("c·kh rows"),
                &plane[top_left + i * s.w..][..kw],
            );
            if KW == 0 {
                d.copy_from_slice(src);
            } else {
                copy_fixed::<KW>(d, src);
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, both `N` long: a copy of a length known at compile time is a few moves,
/// where a `memmove` call per 3 values cost im2row most of its time (a sixth of a ResNet-56 training step,
/// measured with perf).
#[inline(always)]
fn copy_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let s: &[f32; N] = src.try_into().expect("same length");
    let d: &mut [f32; N] = dst.try_into().expect("same length");
    *d = *s;
}

/// `dst.copy_from_slice(src)` for the few values of one kernel row (`kw`, 1–7), by [`copy_fixed`] for
/// the usual lengths (the length tested per copy: for the edge positions, where it varies).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    match dst.len() {
        1 => copy_fixed::<1>(dst, src),
        2 => copy_fixed::<2>(dst, src),
        3 => copy_fixed::<3>(dst, src),
        5 => copy_fixed::<5>(dst, src),
        7 => copy_fixed::<7>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// The adjoint of [`im2col`]: `dx[c, y, x] += Σ dcol` over the entries that read it.
fn col2im_add(dcol: &[f32], s: &ConvShape, dx: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    for c in 0..s.c {
        for i in 0..s.kh {
            let rows = valid(ho, i, s.stride, s.pad, s.h);
            for j in 0..s.kw {
                let cols = valid(wo, j, s.stride, s.pad, s.w);
                if cols.is_empty() {
                    continue;
                }
                let row = &dcol[((c * s.kh + i) * s.kw + j) * ho * wo..][..ho * wo];
                let x0 = cols.start * s.stride + j - s.pad;
                for oy in rows.clone() {
                    let y = oy * s.stride + i - s.pad;
                    let dst = &mut dx[(c * s.h + y) * s.w..][..s.w];
                    let g = &row[oy * wo + cols.start..oy * wo + cols.end];
                    if s.stride == 1 {
                        for (d, &v) in dst[x0..x0 + g.len()].iter_mut().zip(g) {
                            *d += v;
                        }
                    } else {
                        for (k, &v) in g.iter().enumerate() {
                            dst[x0 + k * s.stride] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Images per rayon task: enough tasks for the threads, few partial weight gradients to sum.
fn images_per_task(n: usize) -> usize {
    n.div_ceil(2 * rayon::current_num_threads()).max(1)
}

/// `y = conv(x, w) + b`; `x` `[n, c, h, w]`, `w` `[o, c, kh, kw]` (PyTorch layout), `y` `[n, o, ho, wo]`.
pub fn conv2d_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, s: ConvShape, y: &mut [f32]) {
    let (ck, hw) = (s.ck(), s.ho() * s.wo());
    y.par_chunks_mut(s.out_len())
        .zip(x.par_chunks(s.in_len()))
        .with_min_len(images_per_task(s.n))
        .for_each_init(
            || vec![0f32; if s.is_pointwise() { 0 } else { ck * hw }],
            |col, (yn, xn)| {
                let cols: &[f32] = if s.is_pointwise() {
                    xn
                } else {
                    im2col(xn, &s, col);
                    col
                };
                matmul(
                    yn,
                    hw,
                    MatRef::rm(w, s.o, ck),
                    MatRef::rm(cols, ck, hw),
                    1.0,
                    false,
                    Parallelism::None,
                );
                if let Some(b) = b {
                    for (plane, &bb) in yn.chunks_mut(hw).zip(b) {
                        plane.iter_mut().for_each(|v| *v += bb);
                    }
                }
            },
        );
}

/// Accumulates `dw += Σ_n dy_n · col(x_n)ᵀ`, `db += Σ dy` over images and positions, and (when given)
/// `dx += col2im(wᵀ · dy_n)`.
pub fn conv2d_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    s: ConvShape,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    let (ck, hw) = (s.ck(), s.ho() * s.wo());
    let partial = x
        .par_chunks(s.in_len())
        .zip(dy.par_chunks(s.out_len()))
        .with_min_len(images_per_task(s.n))
        .fold(
            || (vec![0f32; s.o * ck], Vec::new()),
            |(mut dwp, mut rows), (xn, dyn_)| {
                // colᵀ as a row-major [hw, ck] matrix (see `im2row`); a pointwise conv's is the image's
                // transpose.
                rows.resize(ck * hw, 0.0);
                if s.is_pointwise() {
                    for (ch, plane) in xn.chunks_exact(hw).enumerate() {
                        for (p, &v) in plane.iter().enumerate() {
                            rows[p * ck + ch] = v;
                        }
                    }
                } else {
                    im2row(xn, &s, &mut rows);
                }
                matmul(
                    &mut dwp,
                    ck,
                    MatRef::rm(dyn_, s.o, hw),
                    MatRef::rm(&rows, hw, ck),
                    1.0,
                    true,
                    Parallelism::None,
                );
                (dwp, rows)
            },
        )
        .map(|(d, _)| d)
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    if let Some(p) = partial {
        dw.iter_mut().zip(&p).for_each(|(d, v)| *d += v);
    }
    if let Some(db) = db {
        for (o, d) in db.iter_mut().enumerate() {
            let s64: f64 = dy
                .chunks(s.out_len())
                .map(|img| {
                    img[o * hw..(o + 1) * hw]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>()
                })
                .sum();
            *d += s64 as f32;
        }
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(s.in_len())
            .zip(dy.par_chunks(s.out_len()))
            .with_min_len(images_per_task(s.n))
            .for_each_init(
                || vec![0f32; ck * hw],
                |dcol, (dxn, dyn_)| {
                    if s.is_pointwise() {
                        // col(x) = x: accumulate wᵀ dy straight into dx.
                        let wt = MatRef::rm(w, s.o, ck).t();
                        let g = MatRef::rm(dyn_, s.o, hw);
                        matmul(dxn, hw, wt, g, 1.0, true, Parallelism::None);
                        return;
                    }
                    let wt = MatRef::rm(w, s.o, ck).t();
                    let g = MatRef::rm(dyn_, s.o, hw);
                    matmul(dcol, hw, wt, g, 1.0, false, Parallelism::None);
                    col2im_add(dcol, &s, dxn);
                },
            );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel ops: batch norm (inference statistics), over planes of `hw` values
// ---------------------------------------------------------------------------------------------------------

/// `n` images of `c` channels of `hw` values each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

/// Per channel: `scale = γ / √(running_var + ε)`, `shift = β − running_mean · scale` (f64, rounded once).
fn bn_affine(gamma: &[f32], var: &[f32], mean: &[f32], beta: &[f32], eps: f64) -> Vec<(f32, f32)> {
    (0..gamma.len())
        .map(|k| {
            let scale = gamma[k] as f64 / (var[k] as f64 + eps).sqrt();
            (
                scale as f32,
                (beta[k] as f64 - mean[k] as f64 * scale) as f32,
            )
        })
        .collect()
}

/// Batch norm in inference mode (the model is pruned and scored as deployed, with its running statistics,
/// never with batch statistics): `y = γ (x − μ) / √(σ² + ε) + β` per channel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
    s: Planes,
    y: &mut [f32],
) {
    let aff = bn_affine(gamma, var, mean, beta, eps);
    y.par_chunks_mut(s.hw)
        .zip(x.par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let (a, b) = aff[p % s.c];
            yp.iter_mut().zip(xp).for_each(|(o, &v)| *o = a * v + b);
        });
}

/// Accumulates `dx += dy γ/√(σ²+ε)`, `dγ += Σ dy (x − μ)/√(σ²+ε)`, `dβ += Σ dy` (the statistics are
/// constants: they have no gradient).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
    dy: &[f32],
    s: Planes,
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let inv: Vec<f64> = var.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
    let sums: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|k| {
            // 32 independent f64 partial sums a quantity: a single running sum is a dependency chain
            // the compiler may not reorder, so it would stay scalar; lanes vectorise, and four vectors
            // of them keep several additions in flight.
            const LANES: usize = 32;
            let (mut g, mut bsum) = ([0f64; LANES], [0f64; LANES]);
            let m = mean[k] as f64;
            for img in 0..s.n {
                let off = (img * s.c + k) * s.hw;
                let (dp, xp) = (&dy[off..off + s.hw], &x[off..off + s.hw]);
                let (dc, xc) = (dp.chunks_exact(LANES), xp.chunks_exact(LANES));
                let (dr, xr) = (dc.remainder(), xc.remainder());
                for (d8, x8) in dc.zip(xc) {
                    for l in 0..LANES {
                        g[l] += d8[l] as f64 * (x8[l] as f64 - m);
                        bsum[l] += d8[l] as f64;
                    }
                }
                for (l, (&d, &v)) in dr.iter().zip(xr).enumerate() {
                    g[l] += d as f64 * (v as f64 - m);
                    bsum[l] += d as f64;
                }
            }
            (g.iter().sum::<f64>() * inv[k], bsum.iter().sum::<f64>())
        })
        .collect();
    for (k, (g, b)) in sums.into_iter().enumerate() {
        dgamma[k] += g as f32;
        dbeta[k] += b as f32;
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(s.hw)
            .zip(dy.par_chunks(s.hw))
            .enumerate()
            .for_each(|(p, (dp, gp))| {
                let k = p % s.c;
                let a = (gamma[k] as f64 * inv[k]) as f32;
                dp.iter_mut().zip(gp).for_each(|(d, &g)| *d += a * g);
            });
    }
}

// ---------------------------------------------------------------------------------------------------------
// ReLU
// ---------------------------------------------------------------------------------------------------------

const CHUNK: usize = 16_384;

pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(o, &v)| *o = v.max(0.0)));
}

/// `dx += dy` where the forward's output `y` is positive (the backward reads the output, so the input
/// need not be kept).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (yc, gc))| {
            // A select, not a branch: random signs mispredict half the branches, and the select
            // vectorises.
            for ((d, &v), &g) in dc.iter_mut().zip(yc).zip(gc) {
                *d += if v > 0.0 { g } else { 0.0 };
            }
        });
}

// ---------------------------------------------------------------------------------------------------------
// Pooling
// ---------------------------------------------------------------------------------------------------------

/// A max pool over `k × k` windows with `stride` and implicit −∞ padding `pad`, on `planes` planes of
/// `h × w` (n·c of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl PoolShape {
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// Index in the plane of the maximum of window (oy, ox): the first one in row-major order, as PyTorch.
fn window_argmax(xp: &[f32], s: &PoolShape, oy: usize, ox: usize) -> usize {
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for i in 0..s.k {
        let Some(y) = source(oy, i, s.stride, s.pad, s.h) else {
            continue;
        };
        for j in 0..s.k {
            if let Some(x) = source(ox, j, s.stride, s.pad, s.w) {
                let v = xp[y * s.w + x];
                if v > best.0 || best.1 == usize::MAX || v.is_nan() {
                    best = (v, y * s.w + x);
                }
            }
        }
    }
    best.1
}

pub fn max_pool2d_forward(x: &[f32], s: PoolShape, y: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(s.h * s.w))
        .for_each(|(yp, xp)| {
            for oy in 0..ho {
                for ox in 0..wo {
                    yp[oy * wo + ox] = xp[window_argmax(xp, &s, oy, ox)];
                }
            }
        });
}

/// `dx[argmax of window] += dy[window]`, the argmax recomputed from the kept input.
pub fn max_pool2d_backward(x: &[f32], dy: &[f32], s: PoolShape, dx: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    dx.par_chunks_mut(s.h * s.w)
        .zip(x.par_chunks(s.h * s.w).zip(dy.par_chunks(ho * wo)))
        .for_each(|(dp, (xp, gp))| {
            for oy in 0..ho {
                for ox in 0..wo {
                    dp[window_argmax(xp, &s, oy, ox)] += gp[oy * wo + ox];
                }
            }
        });
}

/// PyTorch's adaptive pooling window of output cell `i` of `out` over `size` inputs:
/// `[⌊i·size/out⌋, ⌈(i+1)·size/out⌉)`.
fn adaptive_range(i: usize, out: usize, size: usize) -> std::ops::Range<usize> {
    (i * size / out)..((i + 1) * size).div_ceil(out)
}

/// Adaptive average pooling of `planes` planes of `h × w` to `oh × ow` (global average pooling is
/// `oh = ow = 1`).
pub fn adaptive_avg_pool2d_forward(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    y: &mut [f32],
) {
    debug_assert_eq!(x.len(), planes * h * w);
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(yp, xp)| {
            for oy in 0..oh {
                let rows = adaptive_range(oy, oh, h);
                for ox in 0..ow {
                    let cols = adaptive_range(ox, ow, w);
                    let mut s = 0f64;
                    for r in rows.clone() {
                        s += xp[r * w + cols.start..r * w + cols.end]
                            .iter()
                            .map(|&v| v as f64)
                            .sum::<f64>();
                    }
                    yp[oy * ow + ox] = (s / (rows.len() * cols.len()) as f64) as f32;
                }
            }
        });
}

pub fn adaptive_avg_pool2d_backward(
    dy: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    dx: &mut [f32],
) {
    debug_assert_eq!(dx.len(), planes * h * w);
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(oh * ow))
        .for_each(|(dp, gp)| {
            for oy in 0..oh {
                let rows = adaptive_range(oy, oh, h);
                for ox in 0..ow {
                    let cols = adaptive_range(ox, ow, w);
                    let g = gp[oy * ow + ox] / (rows.len() * cols.len()) as f32;
                    for r in rows.clone() {
                        dp[r * w + cols.start..r * w + cols.end]
                            .iter_mut()
                            .for_each(|d| *d += g);
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------------------
// Option-A shortcut (CIFAR ResNets): y = zero-pad the channels of x[:, :, ::s, ::s]
// ---------------------------------------------------------------------------------------------------------

/// The parameter-free shortcut of a downsampling CIFAR ResNet block: `x` `[n, c, h, w]` subsampled with
/// `stride`, then `pad` zero channels before and after (`F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`):
/// `y` `[n, c + 2·pad, ⌈h/stride⌉, ⌈w/stride⌉]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortcutA {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ShortcutA {
    pub fn ho(&self) -> usize {
        self.h.div_ceil(self.stride)
    }
    pub fn wo(&self) -> usize {
        self.w.div_ceil(self.stride)
    }
    pub fn out_channels(&self) -> usize {
        self.c + 2 * self.pad
    }
}

pub fn shortcut_a_forward(x: &[f32], s: ShortcutA, y: &mut [f32]) {
    let (ho, wo, oc) = (s.ho(), s.wo(), s.out_channels());
    y.par_chunks_mut(ho * wo).enumerate().for_each(|(p, yp)| {
        let (img, oc_k) = (p / oc, p % oc);
        let Some(k) = oc_k.checked_sub(s.pad).filter(|&k| k < s.c) else {
            yp.fill(0.0);
            return;
        };
        let xp = &x[(img * s.c + k) * s.h * s.w..][..s.h * s.w];
        for oy in 0..ho {
            for ox in 0..wo {
                yp[oy * wo + ox] = xp[oy * s.stride * s.w + ox * s.stride];
            }
        }
    });
}

pub fn shortcut_a_backward(dy: &[f32], s: ShortcutA, dx: &mut [f32]) {
    let (ho, wo, oc) = (s.ho(), s.wo(), s.out_channels());
    dx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(p, dp)| {
            let (img, k) = (p / s.c, p % s.c);
            let gp = &dy[(img * oc + k + s.pad) * ho * wo..][..ho * wo];
            for oy in 0..ho {
                for ox in 0..wo {
                    dp[oy * s.stride * s.w + ox * s.stride] += gp[oy * wo + ox];
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------------------
// Tests: every kernel against a plain f64 reference, every backward against central differences
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    type GradsFn<'a> = dyn Fn(&[Vec<f32>], &[f32]) -> Vec<Vec<f32>> + 'a;

    /// Analytic gradients of L = Σ c ⊙ f(inputs) (c a fixed random cotangent) against central differences
    /// in f64 of the f32 forward, step 1e-2; the worst error relative to the largest gradient entry must
    /// stay under `tol`.
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
            let y = f(ins);
            assert_eq!(y.len(), out_len);
            y.iter().zip(&c).map(|(&y, &cc)| y as f64 * cc as f64).sum()
        };
        let analytic = grads(&inputs, &c);
        let h = 1e-2f32;
        for (which, g) in analytic.iter().enumerate() {
            assert_eq!(g.len(), inputs[which].len());
            let scale = g.iter().map(|v| v.abs() as f64).fold(1e-3, f64::max);
            let mut worst = 0f64;
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

    /// Direct f64 convolution, the definition.
    fn conv_reference(x: &[f32], w: &[f32], b: Option<&[f32]>, s: ConvShape) -> Vec<f64> {
        let (ho, wo) = (s.ho(), s.wo());
        let mut y = vec![0f64; s.n * s.out_len()];
        for n in 0..s.n {
            for o in 0..s.o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b.map_or(0.0, |b| b[o] as f64);
                        for c in 0..s.c {
                            for i in 0..s.kh {
                                for j in 0..s.kw {
                                    let yy = (oy * s.stride + i) as isize - s.pad as isize;
                                    let xx = (ox * s.stride + j) as isize - s.pad as isize;
                                    if yy < 0 || xx < 0 || yy >= s.h as isize || xx >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * s.c + c) * s.h + yy as usize) * s.w + xx as usize];
                                    let wv = w[((o * s.c + c) * s.kh + i) * s.kw + j];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((n * s.o + o) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    fn conv_shapes() -> Vec<ConvShape> {
        let base = ConvShape {
            n: 2,
            c: 3,
            h: 5,
            w: 6,
            o: 4,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        vec![
            base,
            ConvShape { stride: 2, ..base },
            ConvShape {
                kh: 1,
                kw: 1,
                pad: 0,
                ..base
            },
            ConvShape {
                kh: 1,
                kw: 1,
                pad: 0,
                stride: 2,
                ..base
            },
            ConvShape {
                kh: 3,
                kw: 2,
                pad: 0,
                stride: 1,
                ..base
            },
            ConvShape {
                h: 9,
                w: 7,
                kh: 7,
                kw: 7,
                stride: 2,
                pad: 3,
                ..base
            },
        ]
    }

    #[test]
    fn conv2d_matches_direct_convolution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for s in conv_shapes() {
            let x = rand_vec(&mut rng, s.n * s.in_len());
            let w = rand_vec(&mut rng, s.o * s.c * s.kh * s.kw);
            let b = rand_vec(&mut rng, s.o);
            let mut y = vec![0f32; s.n * s.out_len()];
            conv2d_forward(&x, &w, Some(&b), s, &mut y);
            let r = conv_reference(&x, &w, Some(&b), s);
            for (a, e) in y.iter().zip(&r) {
                assert!((*a as f64 - e).abs() < 1e-5, "{s:?}: {a} vs {e}");
            }
        }
    }

    /// im2row (edge positions tested element by element, inner ones copied whole by `window_rows`) is
    /// exactly the transpose of im2col, on every shape (kernel widths 1, 2, 3, 7; strides 1, 2; pads 0,
    /// 1, 3).
    #[test]
    fn im2row_is_the_transpose_of_im2col() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for s in conv_shapes() {
            let x = rand_vec(&mut rng, s.in_len());
            let (ck, hw) = (s.ck(), s.ho() * s.wo());
            let (mut col, mut row) = (vec![f32::NAN; ck * hw], vec![f32::NAN; ck * hw]);
            im2col(&x, &s, &mut col);
            im2row(&x, &s, &mut row);
            for r in 0..ck {
                for p in 0..hw {
                    assert_eq!(
                        row[p * ck + r].to_bits(),
                        col[r * hw + p].to_bits(),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn conv2d_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for s in conv_shapes() {
            let ins = vec![
                rand_vec(&mut rng, s.n * s.in_len()),
                rand_vec(&mut rng, s.o * s.c * s.kh * s.kw),
                rand_vec(&mut rng, s.o),
            ];
            check_grads(
                ins,
                s.n * s.out_len(),
                &|i| {
                    let mut y = vec![0f32; s.n * s.out_len()];
                    conv2d_forward(&i[0], &i[1], Some(&i[2]), s, &mut y);
                    y
                },
                &|i, c| {
                    let mut dx = vec![0f32; i[0].len()];
                    let mut dw = vec![0f32; i[1].len()];
                    let mut db = vec![0f32; i[2].len()];
                    conv2d_backward(&i[0], &i[1], c, s, Some(&mut dx), &mut dw, Some(&mut db));
                    vec![dx, dw, db]
                },
                1e-3,
            );
        }
    }

    #[test]
    fn batch_norm_reference_and_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let s = Planes { n: 3, c: 4, hw: 5 };
        let len = s.n * s.c * s.hw;
        let x = rand_vec(&mut rng, len);
        let (g, b, m) = (
            rand_vec(&mut rng, s.c),
            rand_vec(&mut rng, s.c),
            rand_vec(&mut rng, s.c),
        );
        let var: Vec<f32> = (0..s.c).map(|_| rng.random_range(0.2f32..2.0)).collect();
        let mut y = vec![0f32; len];
        batch_norm_forward(&x, &g, &b, &m, &var, 1e-5, s, &mut y);
        for (i, &v) in y.iter().enumerate() {
            let k = (i / s.hw) % s.c;
            let e = g[k] as f64 * (x[i] as f64 - m[k] as f64) / (var[k] as f64 + 1e-5).sqrt()
                + b[k] as f64;
            assert!((v as f64 - e).abs() < 1e-5);
        }
        check_grads(
            vec![x, g, b],
            len,
            &|i| {
                let mut y = vec![0f32; len];
                batch_norm_forward(&i[0], &i[1], &i[2], &m, &var, 1e-5, s, &mut y);
                y
            },
            &|i, c| {
                let (mut dx, mut dg, mut db) = (vec![0f32; len], vec![0f32; s.c], vec![0f32; s.c]);
                batch_norm_backward(
                    &i[0],
                    &i[1],
                    &m,
                    &var,
                    1e-5,
                    c,
                    s,
                    Some(&mut dx),
                    &mut dg,
                    &mut db,
                );
                vec![dx, dg, db]
            },
            1e-3,
        );
    }

    #[test]
    fn relu_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        // Keep inputs away from the kink, where central differences straddle it.
        let x: Vec<f32> = rand_vec(&mut rng, 40)
            .into_iter()
            .map(|v| if v.abs() < 0.05 { v + 0.1 } else { v })
            .collect();
        check_grads(
            vec![x],
            40,
            &|i| {
                let mut y = vec![0f32; 40];
                relu_forward(&i[0], &mut y);
                y
            },
            &|i, c| {
                let mut y = vec![0f32; 40];
                relu_forward(&i[0], &mut y);
                let mut dx = vec![0f32; 40];
                relu_backward(&y, c, &mut dx);
                vec![dx]
            },
            1e-3,
        );
    }

    #[test]
    fn max_pool_reference_and_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for s in [
            PoolShape {
                planes: 3,
                h: 7,
                w: 6,
                k: 3,
                stride: 2,
                pad: 1,
            },
            PoolShape {
                planes: 2,
                h: 4,
                w: 6,
                k: 2,
                stride: 2,
                pad: 0,
            },
        ] {
            let len = s.planes * s.h * s.w;
            // Distinct values spaced wider than the finite-difference step, so no argmax flips.
            let mut x: Vec<f32> = (0..len).map(|i| i as f32 * 0.05).collect();
            for i in (1..len).rev() {
                x.swap(i, rng.random_range(0..=i));
            }
            let out = s.planes * s.ho() * s.wo();
            let mut y = vec![0f32; out];
            max_pool2d_forward(&x, s, &mut y);
            for p in 0..s.planes {
                for oy in 0..s.ho() {
                    for ox in 0..s.wo() {
                        let mut m = f32::NEG_INFINITY;
                        for i in 0..s.k {
                            for j in 0..s.k {
                                let (yy, xx) = (
                                    (oy * s.stride + i) as isize - s.pad as isize,
                                    (ox * s.stride + j) as isize - s.pad as isize,
                                );
                                if yy >= 0 && xx >= 0 && yy < s.h as isize && xx < s.w as isize {
                                    m = m.max(x[(p * s.h + yy as usize) * s.w + xx as usize]);
                                }
                            }
                        }
                        assert_eq!(y[(p * s.ho() + oy) * s.wo() + ox], m);
                    }
                }
            }
            check_grads(
                vec![x],
                out,
                &|i| {
                    let mut y = vec![0f32; out];
                    max_pool2d_forward(&i[0], s, &mut y);
                    y
                },
                &|i, c| {
                    let mut dx = vec![0f32; len];
                    max_pool2d_backward(&i[0], c, s, &mut dx);
                    vec![dx]
                },
                1e-3,
            );
        }
    }

    #[test]
    fn adaptive_avg_pool_reference_and_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        // Global (1×1), shrinking with overlapping windows (5×7 → 3×2), growing (2×2 → 7×7, torchvision's
        // VGG on small inputs).
        for (h, w, oh, ow) in [(4, 4, 1, 1), (5, 7, 3, 2), (2, 2, 7, 7)] {
            let planes = 3;
            let x = rand_vec(&mut rng, planes * h * w);
            let mut y = vec![0f32; planes * oh * ow];
            adaptive_avg_pool2d_forward(&x, planes, (h, w), (oh, ow), &mut y);
            for p in 0..planes {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (r0, r1) = ((oy * h) / oh, ((oy + 1) * h).div_ceil(oh));
                        let (c0, c1) = ((ox * w) / ow, ((ox + 1) * w).div_ceil(ow));
                        let mut s = 0f64;
                        for r in r0..r1 {
                            for c in c0..c1 {
                                s += x[(p * h + r) * w + c] as f64;
                            }
                        }
                        let e = s / ((r1 - r0) * (c1 - c0)) as f64;
                        assert!((y[(p * oh + oy) * ow + ox] as f64 - e).abs() < 1e-6);
                    }
                }
            }
            check_grads(
                vec![x],
                planes * oh * ow,
                &|i| {
                    let mut y = vec![0f32; planes * oh * ow];
                    adaptive_avg_pool2d_forward(&i[0], planes, (h, w), (oh, ow), &mut y);
                    y
                },
                &|_, c| {
                    let mut dx = vec![0f32; planes * h * w];
                    adaptive_avg_pool2d_backward(c, planes, (h, w), (oh, ow), &mut dx);
                    vec![dx]
                },
                1e-3,
            );
        }
    }

    #[test]
    fn shortcut_a_reference_and_gradients() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let s = ShortcutA {
            n: 2,
            c: 4,
            h: 5,
            w: 6,
            stride: 2,
            pad: 2,
        };
        let x = rand_vec(&mut rng, s.n * s.c * s.h * s.w);
        let out = s.n * s.out_channels() * s.ho() * s.wo();
        let mut y = vec![0f32; out];
        shortcut_a_forward(&x, s, &mut y);
        let (oc, ho, wo) = (s.out_channels(), s.ho(), s.wo());
        for n in 0..s.n {
            for k in 0..oc {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let e = if k >= s.pad && k < s.pad + s.c {
                            x[((n * s.c + k - s.pad) * s.h + 2 * oy) * s.w + 2 * ox]
                        } else {
                            0.0
                        };
                        assert_eq!(y[((n * oc + k) * ho + oy) * wo + ox], e);
                    }
                }
            }
        }
        check_grads(
            vec![x],
            out,
            &|i| {
                let mut y = vec![0f32; out];
                shortcut_a_forward(&i[0], s, &mut y);
                y
            },
            &|i, c| {
                let mut dx = vec![0f32; i[0].len()];
                shortcut_a_backward(c, s, &mut dx);
                vec![dx]
            },
            1e-3,
        );
    }
}
