//! A plain float64 CKA reference for `tests/properties.rs` and `tests/hostile_numerics.rs`: explicit Gram
//! matrices, the centring matrix H as a matrix, the estimators' formulas as published; O(n³), no shortcut
//! the engine also takes. Plus the glue to run the engine on the same data.

// Each test crate uses only some of them.
#![allow(dead_code)]

use sglp_engine::io::{Batch, DType, LayerBlock, LayerMeta};
use sglp_engine::similarity::cpu::CpuBackend;
use sglp_engine::similarity::{CkaAccumulator, CkaResult, CkaSpec, Estimator, Kernel};

/// A matrix as rows.
pub type Mat = Vec<Vec<f64>>;

pub fn matmul(a: &Mat, b: &Mat) -> Mat {
    let (n, m) = (a.len(), b[0].len());
    let mut c = vec![vec![0.0; m]; n];
    for i in 0..n {
        for (t, bt) in b.iter().enumerate() {
            for j in 0..m {
                c[i][j] += a[i][t] * bt[j];
            }
        }
    }
    c
}

pub fn transpose(a: &Mat) -> Mat {
    (0..a[0].len())
        .map(|j| a.iter().map(|r| r[j]).collect())
        .collect()
}

fn trace(a: &Mat) -> f64 {
    (0..a.len()).map(|i| a[i][i]).sum()
}

/// The kernel matrix: XXᵀ, or the RBF with the median heuristic (diagonal included, numpy's median).
pub fn gram(x: &Mat, kernel: Kernel) -> Mat {
    let n = x.len();
    let k = matmul(x, &transpose(x));
    let Kernel::Rbf { threshold } = kernel else {
        return k;
    };
    // Squared distances from the coordinates, not from K: the reference must not share the engine's way.
    let d2: Mat = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| x[i].iter().zip(&x[j]).map(|(a, b)| (a - b) * (a - b)).sum())
                .collect()
        })
        .collect();
    let mut all: Vec<f64> = d2.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let h = all.len() / 2;
    let m = if all.len() % 2 == 1 {
        all[h]
    } else {
        0.5 * (all[h - 1] + all[h])
    };
    d2.iter()
        .map(|r| {
            r.iter()
                .map(|v| (-v / (2.0 * threshold * threshold * m)).exp())
                .collect()
        })
        .collect()
}

/// HSIC₀ = tr(KHLH)/(n−1)², H = I − 11ᵀ/n as a matrix.
pub fn hsic0(k: &Mat, l: &Mat) -> f64 {
    let n = k.len();
    let h: Mat = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| if i == j { 1.0 } else { 0.0 } - 1.0 / n as f64)
                .collect()
        })
        .collect();
    trace(&matmul(&matmul(&matmul(k, &h), l), &h)) / ((n as f64 - 1.0) * (n as f64 - 1.0))
}

/// HSIC₁ of Song et al. (2012) as written: K̃, L̃ with zeroed diagonals,
/// [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
pub fn hsic1(k: &Mat, l: &Mat) -> f64 {
    let n = k.len();
    let zd = |m: &Mat| -> Mat {
        (0..n)
            .map(|i| (0..n).map(|j| if i == j { 0.0 } else { m[i][j] }).collect())
            .collect()
    };
    let (kt, lt) = (zd(k), zd(l));
    let sum = |m: &Mat| m.iter().flatten().sum::<f64>();
    let kl = matmul(&kt, &lt);
    let nf = n as f64;
    (trace(&kl) + sum(&kt) * sum(&lt) / ((nf - 1.0) * (nf - 2.0)) - 2.0 / (nf - 2.0) * sum(&kl))
        / (nf * (nf - 3.0))
}

/// `x` minus its column means.
pub fn centre(x: &[Vec<f64>]) -> Mat {
    let n = x.len() as f64;
    let mean: Vec<f64> = (0..x[0].len())
        .map(|c| x.iter().map(|r| r[c]).sum::<f64>() / n)
        .collect();
    x.iter()
        .map(|r| r.iter().zip(&mean).map(|(v, m)| v - m).collect())
        .collect()
}

/// The reference's (mean HSIC matrix, CKA matrix): biased over all rows, or the minibatch mean over
/// consecutive batches of `b` rows (a last batch of 4 or more kept, fewer dropped), as the engine.
pub fn reference(layers: &[Mat], est: Estimator, kernel: Kernel, b: usize) -> (Mat, Mat) {
    let n = layers[0].len();
    let bounds: Vec<(usize, usize)> = match est {
        Estimator::Biased => vec![(0, n)],
        Estimator::Unbiased => (0..n)
            .step_by(b)
            .map(|s| (s, (s + b).min(n)))
            .filter(|(s, e)| e - s >= 4)
            .collect(),
    };
    let nl = layers.len();
    let mut h = vec![vec![0.0; nl]; nl];
    for &(s, e) in &bounds {
        // Each batch's columns centred first (two-pass, f64): HSIC₀, HSIC₁ and RBF distances do not
        // change, and the formulas above no longer cancel digits away on data with large means.
        let grams: Vec<Mat> = layers
            .iter()
            .map(|x| gram(&centre(&x[s..e]), kernel))
            .collect();
        for i in 0..nl {
            for j in 0..nl {
                h[i][j] += match est {
                    Estimator::Biased => hsic0(&grams[i], &grams[j]),
                    Estimator::Unbiased => hsic1(&grams[i], &grams[j]),
                } / bounds.len() as f64;
            }
        }
    }
    let cka = (0..nl)
        .map(|i| {
            (0..nl)
                .map(|j| {
                    // Roots first: the product of two diagonals can leave f64's range.
                    if h[i][i] > 0.0 && h[j][j] > 0.0 {
                        h[i][j] / (h[i][i].sqrt() * h[j][j].sqrt())
                    } else {
                        f64::NAN
                    }
                })
                .collect()
        })
        .collect();
    (h, cka)
}

pub fn metas(layers: &[Mat], dtype: DType) -> Vec<LayerMeta> {
    layers
        .iter()
        .enumerate()
        .map(|(i, x)| LayerMeta {
            name: format!("layer{i}"),
            cols: x[0].len(),
            dtype,
            shape: vec![x.len(), x[0].len()],
        })
        .collect()
}

/// One value as stored in `dtype`, little-endian.
pub fn encode(v: f64, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F64 => v.to_le_bytes().to_vec(),
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
    }
}

/// Every value as `dtype` would store it (the reference runs on what the engine reads).
pub fn round_to(layers: &[Mat], dtype: DType) -> Vec<Mat> {
    let r = |v: f64| match dtype {
        DType::F64 => v,
        DType::F32 => v as f32 as f64,
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
    };
    layers
        .iter()
        .map(|x| {
            x.iter()
                .map(|row| row.iter().map(|&v| r(v)).collect())
                .collect()
        })
        .collect()
}

/// Rows [s, e) of every layer as a batch of `dtype`.
pub fn batch(layers: &[Mat], s: usize, e: usize, dtype: DType) -> Batch {
    Batch {
        rows: e - s,
        layers: layers
            .iter()
            .map(|x| LayerBlock {
                dtype,
                cols: x[0].len(),
                data: x[s..e]
                    .iter()
                    .flatten()
                    .flat_map(|&v| encode(v, dtype))
                    .collect(),
            })
            .collect(),
    }
}

/// The engine's result, the rows pushed in chunks of the given sizes (cycled).
pub fn engine(layers: &[Mat], spec: CkaSpec, chunks: &[usize], dtype: DType) -> CkaResult {
    let n = layers[0].len();
    let mut acc = CkaAccumulator::new(&metas(layers, dtype), spec, Some(n)).unwrap();
    let mut cpu = CpuBackend::new(2);
    let (mut s, mut c) = (0, 0);
    while s < n {
        let e = (s + chunks[c % chunks.len()].max(1)).min(n);
        acc.push(&batch(layers, s, e, dtype).as_ref(), &mut cpu)
            .unwrap();
        s = e;
        c += 1;
    }
    acc.finish(&mut cpu).unwrap()
}

/// A `CkaResult` matrix with `null` as NaN.
pub fn nan_matrix(m: &[Vec<Option<f64>>]) -> Mat {
    m.iter()
        .map(|r| r.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
        .collect()
}
