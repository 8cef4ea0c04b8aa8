//! The feature-space route for linear kernels: everything from Z = [X_1 … X_L] (n × D), its cross
//! product ZᵀZ and per-sample statistics, never forming an n×n matrix. Cheaper when D ≪ n; the biased
//! estimator streams over any number of samples this way.
//!
//! Biased (all samples): C = ZᵀZ − s sᵀ/n (centred), HSIC₀(l, m) = ‖C_lm‖²_F/(n−1)².
//! Unbiased (one batch): with q_i = ‖x_i‖², s = Σ_i x_i, a_i = x_i·s (per layer):
//!   tr(K̃L̃) = ‖X_lᵀX_m‖²_F − Σ_i q_i^l q_i^m,  1ᵀK̃1 = ‖s_l‖² − Σ_i q_i^l,
//!   1ᵀK̃L̃1 = Σ_i (a_i^l − q_i^l)(a_i^m − q_i^m),
//!   HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).

use super::backend::Backend;
use crate::error::Result;
use crate::io::{Batch, BatchRef, DType, LayerBlock, LayerMeta};

pub(crate) struct FeatureState {
    /// Column offset of each layer in Z, and the total width D.
    offsets: Vec<usize>,
    widths: Vec<usize>,
    dtot: usize,
    /// Biased: Σ ZᵀZ and Σ rows over all samples so far.
    cross: Vec<f64>,
    colsum: Vec<f64>,
    n: usize,
}

impl FeatureState {
    pub fn new(layers: &[LayerMeta]) -> Self {
        let widths: Vec<usize> = layers.iter().map(|m| m.cols).collect();
        let mut offsets = Vec::with_capacity(widths.len());
        let mut dtot = 0;
        for w in &widths {
            offsets.push(dtot);
            dtot += w;
        }
        FeatureState {
            offsets,
            widths,
            dtot,
            cross: Vec::new(),
            colsum: vec![0.0; dtot],
            n: 0,
        }
    }

    /// Column sums (D) of a batch, and per layer the rows' squared norms (n × L, row-major).
    fn row_stats(&self, batch: &BatchRef<'_>) -> (Vec<f64>, Vec<f64>) {
        let (n, l) = (batch.rows, self.widths.len());
        let mut s = vec![0.0; self.dtot];
        let mut q = vec![0.0; n * l];
        let mut row = Vec::new();
        for (li, slice) in batch.layers.iter().enumerate() {
            row.resize(slice.cols, 0.0f64);
            let off = self.offsets[li];
            for r in 0..n {
                slice.row_into(r, &mut row);
                let mut qq = 0.0;
                for (acc, &x) in s[off..off + slice.cols].iter_mut().zip(&row) {
                    *acc += x;
                    qq += x * x;
                }
                q[r * l + li] = qq;
            }
        }
        (s, q)
    }

    /// Biased estimator: fold a chunk into ZᵀZ and the column sums.
    pub fn add_biased(&mut self, batch: &BatchRef<'_>, backend: &mut dyn Backend) -> Result<()> {
        if self.cross.is_empty() {
            self.cross = vec![0.0; self.dtot * self.dtot];
        }
        backend.accumulate_cross(batch, &mut self.cross)?;
        let (s, _) = self.row_stats(batch);
        for (a, b) in self.colsum.iter_mut().zip(&s) {
            *a += b;
        }
        self.n += batch.rows;
        Ok(())
    }

    /// Σ over the block (layer li rows, layer lm columns) of f(i, j, C_ij).
    fn block_sum(
        &self,
        cross: &[f64],
        li: usize,
        lm: usize,
        f: impl Fn(usize, usize, f64) -> f64,
    ) -> f64 {
        let (oi, om) = (self.offsets[li], self.offsets[lm]);
        let mut acc = 0.0;
        for i in 0..self.widths[li] {
            let row =
                &cross[(oi + i) * self.dtot + om..(oi + i) * self.dtot + om + self.widths[lm]];
            for (j, &c) in row.iter().enumerate() {
                acc += f(oi + i, om + j, c);
            }
        }
        acc
    }

    /// Biased HSIC₀ of every pair over all samples folded in.
    pub fn biased_hsic(&self) -> Vec<f64> {
        let l = self.widths.len();
        let n = self.n as f64;
        let mut h = vec![0.0; l * l];
        for li in 0..l {
            for lm in 0..=li {
                let v = self.block_sum(&self.cross, li, lm, |i, j, c| {
                    let centred = c - self.colsum[i] * self.colsum[j] / n;
                    centred * centred
                }) / ((n - 1.0) * (n - 1.0));
                h[li * l + lm] = v;
                h[lm * l + li] = v;
            }
        }
        h
    }

    /// Unbiased HSIC₁ of every pair on one batch.
    pub fn unbiased_batch_hsic(
        &mut self,
        batch: &BatchRef<'_>,
        backend: &mut dyn Backend,
    ) -> Result<Vec<f64>> {
        let centred = centred_f64(batch);
        let batch = &centred.as_ref();
        let (nrows, l) = (batch.rows, self.widths.len());
        let mut cross = vec![0.0; self.dtot * self.dtot];
        backend.accumulate_cross(batch, &mut cross)?;
        let (s, q) = self.row_stats(batch);
        // a_i^l = x_i^l · s_l, less q_i^l: the row sums of the zero-diagonal Gram.
        let mut aq = vec![0.0; nrows * l];
        let mut row = Vec::new();
        for (li, slice) in batch.layers.iter().enumerate() {
            row.resize(slice.cols, 0.0f64);
            let sl = &s[self.offsets[li]..self.offsets[li] + slice.cols];
            for r in 0..nrows {
                slice.row_into(r, &mut row);
                let a: f64 = row.iter().zip(sl).map(|(x, y)| x * y).sum();
                aq[r * l + li] = a - q[r * l + li];
            }
        }
        let n = nrows as f64;
        let ones: Vec<f64> = (0..l)
            .map(|li| {
                let sl = &s[self.offsets[li]..self.offsets[li] + self.widths[li]];
                sl.iter().map(|v| v * v).sum::<f64>()
                    - (0..nrows).map(|r| q[r * l + li]).sum::<f64>()
            })
            .collect();
        let mut h = vec![0.0; l * l];
        for li in 0..l {
            for lm in 0..=li {
                let frob = self.block_sum(&cross, li, lm, |_, _, c| c * c);
                let (mut qq, mut kl1) = (0.0, 0.0);
                for r in 0..nrows {
                    qq += q[r * l + li] * q[r * l + lm];
                    kl1 += aq[r * l + li] * aq[r * l + lm];
                }
                let tr = frob - qq;
                let v = (tr + ones[li] * ones[lm] / ((n - 1.0) * (n - 2.0))
                    - 2.0 / (n - 2.0) * kl1)
                    / (n * (n - 3.0));
                h[li * l + lm] = v;
                h[lm * l + li] = v;
            }
        }
        Ok(h)
    }
}

/// The batch as f64 with each column's mean over its rows subtracted. HSIC₁ does not change (a per-feature
/// shift only adds terms its U-statistic cancels), but the formulas of `unbiased_batch_hsic` are sums of
/// raw products that cancel each other: on activations with large means (LLM-like, ~100 with a few
/// features ~5000) they lost 4 to 5 digits of the CKA (`tests/hostile_numerics.rs`). Centred, they
/// cancel nothing.
fn centred_f64(batch: &BatchRef<'_>) -> Batch {
    let n = batch.rows;
    let layers = batch
        .layers
        .iter()
        .map(|s| {
            let mut x = vec![0.0f64; n * s.cols];
            s.to_vec_into(&mut x);
            for c in 0..s.cols {
                let mean = (0..n).map(|r| x[r * s.cols + c]).sum::<f64>() / n as f64;
                for r in 0..n {
                    x[r * s.cols + c] -= mean;
                }
            }
            LayerBlock {
                dtype: DType::F64,
                cols: s.cols,
                data: bytemuck::cast_slice(&x).to_vec().into(),
            }
        })
        .collect();
    Batch { rows: n, layers }
}
