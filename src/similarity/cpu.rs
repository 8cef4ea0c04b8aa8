//! CPU backend: the same estimators as the CUDA kernels, in f64, with the `gemm` crate and rayon.
//!
//! Gram route per batch of n samples and L layers: for each layer (in parallel over layers), convert the
//! batch to f64, K = XXᵀ (lower-triangular blocks only), apply the kernel, centre (double-centring for the
//! biased estimator, U-centring for the unbiased one), and pack the lower triangle into one row of
//! G (L × n(n+1)/2), the diagonal scaled by 1/√2 so that ⟨K_l, K_m⟩ = 2·(G Gᵀ)_lm. All pairs are then one
//! product G·Gᵀ.

use super::backend::{check_batch_rows, Backend, Estimator, Kernel};
use crate::error::Result;
use crate::io::{BatchRef, LayerSlice};
use crate::linalg::{gram_xxt, matmul, Layout, MatRef, Parallelism};
use rayon::prelude::*;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl CpuBackend {
    /// `threads` = 0 means one per core.
    pub fn new(threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("rayon thread pool");
        let threads = pool.current_num_threads();
        CpuBackend { pool, threads }
    }
}

/// Per-worker buffers for one layer's Gram: the f64 batch (n×d) and the Gram (n×n).
#[derive(Default)]
struct GramWork {
    x: Vec<f64>,
    k: Vec<f64>,
    scratch: Vec<f64>,
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
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
        let mut g = vec![0.0f64; l * p];
        let threads = self.threads;
        self.pool.install(|| {
            // Parallel over layers when there are enough of them; otherwise parallel inside each GEMM.
            let (outer, inner) = if l >= threads {
                (true, Parallelism::None)
            } else {
                (false, Parallelism::Rayon(threads))
            };
            let job = |work: &mut GramWork, (row, layer): (&mut [f64], &LayerSlice<'_>)| {
                centred_gram_packed(layer, n, estimator, kernel, inner, work, row);
            };
            if outer {
                g.par_chunks_mut(p)
                    .zip(batch.layers.par_iter())
                    .for_each_init(GramWork::default, job);
            } else {
                let mut work = GramWork::default();
                g.chunks_mut(p)
                    .zip(batch.layers.iter())
                    .for_each(|x| job(&mut work, x));
            }
        });
        let mut h = vec![0.0f64; l * l];
        let lg = Layout::row_major(l, p);
        matmul(
            &mut h,
            l,
            MatRef::new(&g, lg),
            MatRef::new(&g, lg.t()),
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

    fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()> {
        let n = batch.rows;
        let dtot: usize = batch.layers.iter().map(|s| s.cols).sum();
        assert_eq!(cross.len(), dtot * dtot);
        // Z = the layers side by side, f64, n × D.
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
    par: Parallelism,
    work: &mut GramWork,
    out: &mut [f64],
) {
    let d = layer.cols;
    work.x.resize(n * d, 0.0);
    work.k.resize(n * n, 0.0);
    layer.to_vec_into(&mut work.x);
    gram_xxt(&work.x, n, d, &mut work.k, par);
    if let Kernel::Rbf { threshold } = kernel {
        rbf_from_linear(&mut work.k, n, threshold, &mut work.scratch);
    }
    match estimator {
        Estimator::Biased => double_centre(&mut work.k, n),
        Estimator::Unbiased => u_centre(&mut work.k, n),
    }
    pack_lower(&work.k, n, out);
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

/// Pack the lower triangle (row by row) with the diagonal scaled by 1/√2.
fn pack_lower(k: &[f64], n: usize, out: &mut [f64]) {
    let mut t = 0;
    for i in 0..n {
        out[t..t + i].copy_from_slice(&k[i * n..i * n + i]);
        out[t + i] = k[i * n + i] * std::f64::consts::FRAC_1_SQRT_2;
        t += i + 1;
    }
}
