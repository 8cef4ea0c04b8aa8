//! CPU backend: the same estimators as the CUDA kernels, with the `gemm` crate and rayon.
//!
//! Gram route per batch of n samples and L layers: for each layer (in parallel over layers), K = XXᵀ
//! (lower-triangular blocks only), apply the kernel, centre in f64 (double-centring for the biased
//! estimator, U-centring for the unbiased one), and pack the lower triangle into one row of
//! G (L × n(n+1)/2), the diagonal scaled by 1/√2 so that ⟨K_l, K_m⟩ = 2·(G Gᵀ)_lm. All pairs are then one
//! product G·Gᵀ in f64.
//!
//! The Gram's own arithmetic is [`Precision`]: f64 (X converted to f64), or, for the linear kernel, f32:
//! the batch's column means are subtracted first (computed and subtracted in f64, the result rounded to
//! f32 once), which leaves both centred Grams unchanged in exact arithmetic (centring removes exactly the
//! terms a mean shift adds) and keeps f32 from losing the digits of large-mean activations; then an f32
//! GEMM, at twice the f64 rate. RBF kernels always take the f64 route (the exponential of distances
//! amplifies rounding).

use super::backend::{check_batch_rows, Backend, Estimator, Kernel, Precision};
use crate::error::Result;
use crate::io::{BatchRef, DType, LayerSlice};
use crate::linalg::{gram_lower, gram_stride, gram_xxt, matmul, Layout, MatRef, Parallelism};
use rayon::prelude::*;
use std::sync::Mutex;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    precision: Precision,
    /// The stacked packed Grams (L × n(n+1)/2), kept between batches: every batch overwrites all of it.
    g: Vec<f64>,
    /// Work buffers per pool thread (indexed by the thread's index), kept between batches.
    work: Vec<Mutex<GramWork>>,
}

impl CpuBackend {
    /// `threads` = 0 means one per core. Grams in f64 (the reference); see [`CpuBackend::set_precision`].
    pub fn new(threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("rayon thread pool");
        let threads = pool.current_num_threads();
        CpuBackend {
            pool,
            threads,
            precision: Precision::F64,
            g: Vec::new(),
            work: (0..threads).map(|_| Mutex::default()).collect(),
        }
    }
}

/// One worker's buffers for one layer's Gram: the batch as f64 or as centred f32 (n×d), the Gram (n×n)
/// in f64 and in f32, the column means.
#[derive(Default)]
struct GramWork {
    x: Vec<f64>,
    k: Vec<f64>,
    scratch: Vec<f64>,
    x32: Vec<f32>,
    k32: Vec<f32>,
    mean: Vec<f64>,
    mean32: Vec<f32>,
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        match self.precision {
            Precision::F64 => format!("cpu ({} threads)", self.threads),
            Precision::F32 => format!("cpu ({} threads, f32 Grams)", self.threads),
        }
    }

    fn batch_hsic(
        &mut self,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<Vec<f64>> {
        let n = batch.rows;
        let l = batch.layers.len();
        check_batch_rows(estimator, n)?;
        let p = n * (n + 1) / 2;
        // Every element is overwritten below (`pack_lower` fills each row).
        self.g.resize(l * p, 0.0);
        let g = &mut self.g[..l * p];
        let threads = self.threads;
        let precision = match kernel {
            Kernel::Linear => self.precision,
            Kernel::Rbf { .. } => Precision::F64,
        };
        let work = &self.work;
        self.pool.install(|| {
            // Parallel over layers when there are enough of them; otherwise parallel inside each GEMM.
            let (outer, inner) = if l >= threads {
                (true, Parallelism::None)
            } else {
                (false, Parallelism::Rayon(threads))
            };
            let job = |(row, layer): (&mut [f64], &LayerSlice<'_>)| {
                // Each pool thread has its own buffers; the lock is never contended.
                let i = rayon::current_thread_index().unwrap_or(0) % work.len();
                let mut w = work[i].lock().unwrap_or_else(|e| e.into_inner());
                centred_gram_packed(layer, n, estimator, kernel, precision, inner, &mut w, row);
            };
            if outer {
                g.par_chunks_mut(p)
                    .zip(batch.layers.par_iter())
                    .for_each(job);
            } else {
                g.chunks_mut(p).zip(batch.layers.iter()).for_each(job);
            }
        });
        let g = &self.g[..l * p];
        let mut h = vec![0.0f64; l * l];
        let lg = Layout::row_major(l, p);
        matmul(
            &mut h,
            l,
            MatRef::new(g, lg),
            MatRef::new(g, lg.t()),
            1.0,
            false,
            Parallelism::Rayon(threads),
        );
        let norm = normaliser(estimator, n);
        for v in &mut h {
            *v *= 2.0 / norm;
        }
        Ok(h)
    }

    fn set_precision(&mut self, precision: Precision) -> bool {
        self.precision = precision;
        true
    }

    fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()> {
        let n = batch.rows;
        let (z, dtot) = stacked_f64(batch);
        assert_eq!(cross.len(), dtot * dtot);
        let lz = Layout::row_major(n, dtot);
        let threads = self.threads;
        self.pool.install(|| {
            matmul(
                cross,
                dtot,
                MatRef::new(&z, lz.t()),
                MatRef::new(&z, lz),
                1.0,
                true,
                Parallelism::Rayon(threads),
            );
        });
        Ok(())
    }
}

/// Z = the batch's layers side by side as f64 (n × D row-major), and D: the feature route's input, on
/// both backends.
pub(crate) fn stacked_f64(batch: &BatchRef<'_>) -> (Vec<f64>, usize) {
    let n = batch.rows;
    let dtot: usize = batch.layers.iter().map(|s| s.cols).sum();
    let mut z = vec![0.0f64; n * dtot];
    let mut off = 0;
    let mut row = Vec::new();
    for s in &batch.layers {
        row.resize(s.cols, 0.0);
        for r in 0..n {
            s.row_into(r, &mut row);
            z[r * dtot + off..r * dtot + off + s.cols].copy_from_slice(&row);
        }
        off += s.cols;
    }
    (z, dtot)
}

/// The normaliser the HSIC estimators divide ⟨K̃, L̃⟩ by: (n−1)² (biased), n(n−3) (unbiased).
pub fn normaliser(estimator: Estimator, n: usize) -> f64 {
    let n = n as f64;
    match estimator {
        Estimator::Biased => (n - 1.0) * (n - 1.0),
        Estimator::Unbiased => n * (n - 3.0),
    }
}

/// One layer's centred kernel matrix, packed (lower triangle, diagonal × 1/√2) into `out`.
fn centred_gram_packed(
    layer: &LayerSlice<'_>,
    n: usize,
    estimator: Estimator,
    kernel: Kernel,
    precision: Precision,
    par: Parallelism,
    work: &mut GramWork,
    out: &mut [f64],
) {
    let d = layer.cols;
    if precision == Precision::F32 {
        // Linear kernel only (the caller's rule): the f32 Gram's lower triangle is centred straight
        // into the packed f64 row, without a full f64 copy.
        centred_f32_into(layer, n, work);
        work.k32.resize(n * n, 0.0);
        let x = MatRef::new(&work.x32, padded(n, d));
        gram_lower(x, &mut work.k32, par);
        centre_pack_lower(&work.k32, n, estimator, &mut work.scratch, out);
        return;
    }
    work.k.resize(n * n, 0.0);
    let ld = gram_stride(d);
    work.x.resize(n * ld, 0.0);
    for (r, row) in work.x.chunks_exact_mut(ld).enumerate() {
        layer.row_into(r, &mut row[..d]);
    }
    gram_xxt(MatRef::new(&work.x, padded(n, d)), &mut work.k, par);
    if let Kernel::Rbf { threshold } = kernel {
        rbf_from_linear(&mut work.k, n, threshold, &mut work.scratch);
    }
    match estimator {
        Estimator::Biased => double_centre(&mut work.k, n),
        Estimator::Unbiased => u_centre(&mut work.k, n),
    }
    pack_lower(&work.k, n, out);
}

/// The layout of a Gram's input copy: `n × d`, rows [`gram_stride`] apart.
fn padded(n: usize, d: usize) -> Layout {
    Layout {
        rows: n,
        cols: d,
        rs: gram_stride(d),
        cs: 1,
    }
}

/// The batch (n × d) with its column means subtracted, into `work.x32` (rows [`gram_stride`] apart):
/// means summed in f64, each element subtracted in f64 from its stored value and rounded to f32 once.
fn centred_f32_into(layer: &LayerSlice<'_>, n: usize, work: &mut GramWork) {
    let d = layer.cols;
    let ld = gram_stride(d);
    work.x32.resize(n * ld, 0.0);
    work.mean.clear();
    work.mean.resize(d, 0.0);
    if layer.dtype == DType::F64 {
        // f64 values would round before the subtraction: subtract from the f64 copy.
        work.x.resize(n * d, 0.0);
        layer.to_vec_into(&mut work.x);
        column_means(&work.x, d, d, &mut work.mean);
        for (o, x) in work.x32.chunks_exact_mut(ld).zip(work.x.chunks_exact(d)) {
            for ((o, &x), &m) in o.iter_mut().zip(x).zip(&work.mean) {
                *o = (x - m) as f32;
            }
        }
    } else {
        // f32, f16 and bf16 values are exact in f32.
        for (r, row) in work.x32.chunks_exact_mut(ld).enumerate() {
            layer.row_into(r, &mut row[..d]);
        }
        column_means(&work.x32, d, ld, &mut work.mean);
        // The mean rounded to f32, subtracted in f32: a per-column constant moves no HSIC, and the f32
        // difference x − m₃₂ is rounded once, as (x − m) in f64 then rounded would be; in f32 it vectorises.
        work.mean32.clear();
        work.mean32.extend(work.mean.iter().map(|&m| m as f32));
        for row in work.x32.chunks_exact_mut(ld) {
            for (x, &m) in row.iter_mut().zip(&work.mean32) {
                *x -= m;
            }
        }
    }
}

/// Column means of the `rows × d` matrix `x` (rows `ld` apart), summed in f64, into `mean` (length d,
/// zeroed).
fn column_means<T: Copy + Into<f64>>(x: &[T], d: usize, ld: usize, mean: &mut [f64]) {
    let rows = x.len() / ld.max(1);
    for row in x.chunks_exact(ld) {
        for (m, &v) in mean.iter_mut().zip(&row[..d]) {
            *m += v.into();
        }
    }
    for m in mean.iter_mut() {
        *m /= rows as f64;
    }
}

/// K ← exp(−d²/(2t²m)) with d²_ij = K_ii + K_jj − 2K_ij and m the median of all n² squared distances
/// (diagonal included), as Kornblith et al.'s reference `gram_rbf`.
pub fn rbf_from_linear(k: &mut [f64], n: usize, threshold: f64, scratch: &mut Vec<f64>) {
    let diag: Vec<f64> = (0..n).map(|i| k[i * n + i]).collect();
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] = diag[i] + diag[j] - 2.0 * k[i * n + j];
        }
    }
    scratch.clear();
    scratch.extend_from_slice(&k[..n * n]);
    let m = median(scratch);
    let scale = -1.0 / (2.0 * threshold * threshold * m);
    for v in &mut k[..n * n] {
        *v = (*v * scale).exp();
    }
}

/// Median as numpy computes it (mean of the two middle values for an even count). Reorders `v`.
pub fn median(v: &mut [f64]) -> f64 {
    let len = v.len();
    let mid = len / 2;
    let (_, hi, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    let hi = *hi;
    if len % 2 == 1 {
        hi
    } else {
        let lo = v[..mid].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        0.5 * (lo + hi)
    }
}

/// K ← HKH with H = I − 11ᵀ/n (K symmetric).
pub fn double_centre(k: &mut [f64], n: usize) {
    let means: Vec<f64> = (0..n)
        .map(|i| k[i * n..(i + 1) * n].iter().sum::<f64>() / n as f64)
        .collect();
    let grand = means.iter().sum::<f64>() / n as f64;
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] += grand - means[i] - means[j];
        }
    }
}

/// U-centring (Song et al. 2012): zero the diagonal; m_i = rowsum_i/(n−2); m −= Σm/(2(n−1));
/// K_ij −= m_i + m_j; zero the diagonal. Then ⟨K̃_u, L̃_u⟩/(n(n−3)) = HSIC₁.
pub fn u_centre(k: &mut [f64], n: usize) {
    for i in 0..n {
        k[i * n + i] = 0.0;
    }
    let mut m: Vec<f64> = (0..n)
        .map(|i| k[i * n..(i + 1) * n].iter().sum::<f64>() / (n as f64 - 2.0))
        .collect();
    let shift = m.iter().sum::<f64>() / (2.0 * (n as f64 - 1.0));
    for v in &mut m {
        *v -= shift;
    }
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] -= m[i] + m[j];
        }
        k[i * n + i] = 0.0;
    }
}

/// Centre the symmetric kernel matrix whose lower triangle (diagonal included) is in `k` (f32, n × n
/// row-major) as [`u_centre`] or [`double_centre`] do, in f64, and pack it as [`pack_lower`] does: both
/// centrings are K_ij − a_i − a_j + c off the diagonal, so two passes over the triangle suffice (row sums,
/// then the packed values). `rows`: scratch.
fn centre_pack_lower(
    k: &[f32],
    n: usize,
    estimator: Estimator,
    rows: &mut Vec<f64>,
    out: &mut [f64],
) {
    // Off-diagonal row sums of the full symmetric matrix, from its lower triangle.
    rows.clear();
    rows.resize(n, 0.0);
    const LANES: usize = 8;
    for i in 0..n {
        let (before, rest) = rows.split_at_mut(i);
        let row = &k[i * n..i * n + i];
        // Eight partial sums, so that the loop vectorises (one running sum is a serial dependency).
        let mut s = [0.0f64; LANES];
        let mut rc = before.chunks_exact_mut(LANES);
        let mut kc = row.chunks_exact(LANES);
        for (r, kv) in (&mut rc).zip(&mut kc) {
            for l in 0..LANES {
                let v = kv[l] as f64;
                s[l] += v;
                r[l] += v;
            }
        }
        let mut tail = 0.0;
        for (r, &v) in rc.into_remainder().iter_mut().zip(kc.remainder()) {
            let v = v as f64;
            tail += v;
            *r += v;
        }
        rest[0] += s.iter().sum::<f64>() + tail;
    }
    let diag = |i: usize| k[i * n + i] as f64;
    let nf = n as f64;
    // a_i and c; `rows` becomes a.
    let (c, unbiased) = match estimator {
        Estimator::Unbiased => {
            for r in rows.iter_mut() {
                *r /= nf - 2.0;
            }
            let shift = rows.iter().sum::<f64>() / (2.0 * (nf - 1.0));
            for r in rows.iter_mut() {
                *r -= shift;
            }
            (0.0, true)
        }
        Estimator::Biased => {
            for (i, r) in rows.iter_mut().enumerate() {
                *r = (*r + diag(i)) / nf;
            }
            (rows.iter().sum::<f64>() / nf, false)
        }
    };
    let a = &rows[..];
    let mut t = 0;
    for i in 0..n {
        let ai = a[i];
        for ((o, &v), &aj) in out[t..t + i].iter_mut().zip(&k[i * n..i * n + i]).zip(a) {
            *o = v as f64 - ai - aj + c;
        }
        out[t + i] = if unbiased {
            0.0
        } else {
            (diag(i) - 2.0 * ai + c) * std::f64::consts::FRAC_1_SQRT_2
        };
        t += i + 1;
    }
}

/// Pack the lower triangle (row by row) with the diagonal scaled by 1/√2.
pub(crate) fn pack_lower(k: &[f64], n: usize, out: &mut [f64]) {
    let mut t = 0;
    for i in 0..n {
        out[t..t + i].copy_from_slice(&k[i * n..i * n + i]);
        out[t + i] = k[i * n + i] * std::f64::consts::FRAC_1_SQRT_2;
        t += i + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn centring_from_the_lower_triangle_matches_centring_the_full_matrix() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
        let n = 37;
        // A symmetric matrix with values exact in f32; junk above the diagonal of the f32 copy.
        let x: Vec<f64> = (0..n * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut full = vec![0.0; n * n];
        crate::linalg::gram_xxt(MatRef::rm(&x, n, 5), &mut full, Parallelism::None);
        for v in &mut full {
            *v = *v as f32 as f64;
        }
        let mut lower: Vec<f32> = full.iter().map(|&v| v as f32).collect();
        for i in 0..n {
            for j in i + 1..n {
                lower[i * n + j] = f32::NAN;
            }
        }
        let p = n * (n + 1) / 2;
        for est in [Estimator::Unbiased, Estimator::Biased] {
            let mut want_k = full.clone();
            match est {
                Estimator::Biased => double_centre(&mut want_k, n),
                Estimator::Unbiased => u_centre(&mut want_k, n),
            }
            let mut want = vec![0.0; p];
            pack_lower(&want_k, n, &mut want);
            let mut got = vec![0.0; p];
            centre_pack_lower(&lower, n, est, &mut Vec::new(), &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                    "{est:?}: {g} vs {w}"
                );
            }
        }
    }
}
