//! Kernel by kernel, against a CPU twin: the similarity stage's validate-and-time harness (llm.c's
//! `dev/cuda`, in one program: `benches/cka_kernels.rs`).
//!
//! [`CudaBackend::stage_outputs`] runs one batch through the launches `batch_hsic` makes and downloads what
//! each stage leaves on the device. [`check_stages`] holds each stage's output to a float64 CPU twin
//! ([`reference()`] runs the twins end to end) computed from the *previous stage's device output*, so a
//! failure names the kernels at fault rather than only saying that the CKA is off:
//!
//! | stage | kernels | twin |
//! |---|---|---|
//! | centre | column_centre, column_to_f16 | (x − μ)·2^e, μ the f64 column mean (16-bit: rounded to the dtype) |
//! | gram | gram_fma, the 16-bit Gram kernel in use ([`super::GramKernel`]) | C·Cᵀ in f64 of the centred values |
//! | rbf | rbf_* | [`cpu::rbf_from_linear`] of the device Gram |
//! | centre_pack | gram_row_sums, centre_offsets, centre_pack | [`cpu::double_centre`] / [`cpu::u_centre`], packed |
//! | pairs | hsic_pairs, hsic_reduce_splits | Σₚ G_a(p)·G_b(p) in f64 |

use super::super::backend::{Estimator, Kernel};
use super::super::cpu;
use super::{plan, CuResult, CudaBackend, Input};
use crate::error::{Error, Result};
use crate::io::{BatchRef, DType};
use half::f16;

/// What each stage of one batch left on the device (host copies, in the units the next stage reads).
#[derive(Clone, Debug)]
pub struct StageOutputs {
    pub n: usize,
    /// Per layer, `n × cols`: the upload slot after the centring, decoded to f64 (a 16-bit layer holds
    /// f16 values of (x − μ)·2^e).
    pub centred: Vec<Vec<f64>>,
    /// Per layer: e (0 for f32 / f64 layers).
    pub exponent: Vec<i32>,
    /// Per layer, `n × n`: the Gram of the centred values (in their units).
    pub gram: Vec<Vec<f32>>,
    /// The kernel that computed the 16-bit layers' Grams (`gram_mma` for the twins).
    pub gram_16bit: &'static str,
    /// With the RBF kernel, per layer, `n × n`: the kernel matrix the centring reads.
    pub rbf: Option<Vec<Vec<f32>>>,
    /// Per layer: its row of G, the centred matrix's lower triangle packed (`n(n+1)/2` values).
    pub packed: Vec<Vec<f32>>,
    /// `L × L` row-major, lower triangle (b ≤ a): Σₚ G_a(p)·G_b(p).
    pub pairs: Vec<f64>,
}

/// One stage's output against its twin: the largest difference relative to the twin's largest value.
#[derive(Clone, Debug, PartialEq)]
pub struct StageCheck {
    pub stage: &'static str,
    pub kernels: &'static str,
    pub rel_err: f64,
    pub tol: f64,
}

impl StageCheck {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

impl CudaBackend {
    /// Run `batch` through the Gram route's launches (the 16-bit Grams with the kernel
    /// [`CudaBackend::set_gram_kernel`] chose), downloading each stage's output. For the harness: the
    /// batch must fit one upload chunk and one layer block (small shapes).
    pub fn stage_outputs(
        &mut self,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<StageOutputs> {
        let (n, l) = (batch.rows, batch.layers.len());
        let input = Input::Host(batch);
        let sizes = self.prepare_route(input, estimator)?;
        let flags = self
            .compute
            .alloc_zeros::<u64>(l)
            .cu("allocating non-finite flags")?;
        self.nonfinite = Some((flags, 0));
        let mut ws = self.ws.take().expect("workspace planned");
        let res = (|| -> Result<StageOutputs> {
            if ws.plan.layer_block < l {
                return Err(Error::invalid(format!(
                    "stage_outputs: {l} layers of {n} samples need layer blocks; use a smaller batch"
                )));
            }
            let ti = self.tables_for(&mut ws, input, &sizes, 0, l)?;
            let (chunks, span) = (&ws.tables[ti].1.chunks, ws.tables[ti].1.spans[0]);
            if chunks.len() != 1 {
                return Err(Error::invalid(format!(
                    "stage_outputs: {l} layers of {n} samples need {} upload chunks; use a smaller batch",
                    chunks.len()
                )));
            }
            let ch = chunks[0].clone();
            let slot = self.next_slot;
            self.next_slot ^= 1;
            self.upload_chunk(&mut ws, slot, input, &sizes, &ch)?;
            self.launch_grams(&mut ws, slot, n, ti, span)?;
            let slot_bytes = self.compute.clone_dtoh(&ws.dev_in[slot]).cu("download")?;
            let scale = self.compute.clone_dtoh(&ws.col_scale).cu("download")?;
            let gram = self.compute.clone_dtoh(&ws.gram).cu("download")?;
            self.rbf_stage(&mut ws, n, l, kernel)?;
            let rbf = match kernel {
                Kernel::Rbf { .. } => Some(self.compute.clone_dtoh(&ws.gram).cu("download")?),
                Kernel::Linear => None,
            };
            self.centre_stage(&mut ws, n, l, 0, estimator, kernel)?;
            let g = self.compute.clone_dtoh(&ws.g).cu("download")?;
            self.ws = Some(ws);
            self.pairs(n, l, 0, l, 0, l, 0, 0, true)?;
            self.reduce_pairs(l)?;
            let ws = self.ws.as_ref().expect("put back above");
            let pairs = self.compute.clone_dtoh(&ws.out).cu("download")?;
            self.compute.synchronize().cu("synchronize")?;

            let (nn, p) = (n * n, plan::packed_len(n));
            let per_layer = |v: &[f32], size: usize| -> Vec<Vec<f32>> {
                (0..l)
                    .map(|y| v[y * size..(y + 1) * size].to_vec())
                    .collect()
            };
            let centred = (0..l)
                .map(|k| {
                    let s = &batch.layers[k];
                    let bytes = &slot_bytes[ch.offsets[k]..];
                    // The centring rewrote 16-bit layers as f16 in place.
                    let dtype = match s.dtype {
                        DType::BF16 => DType::F16,
                        d => d,
                    };
                    decode(bytes, dtype, n * s.cols)
                })
                .collect();
            let exponent = (0..l).map(|y| scale[2 * y + 1] as i32).collect();
            Ok(StageOutputs {
                gram_16bit: self.gram_kernel_in_use().kernel_name(),
                n,
                centred,
                exponent,
                gram: per_layer(&gram, nn),
                rbf: rbf.map(|r| per_layer(&r, nn)),
                packed: per_layer(&g, p),
                pairs,
            })
        })();
        // After an error the workspace may be gone with the closure: the next batch plans a new one.
        self.nonfinite = None;
        res
    }
}

/// `count` values of `dtype` from little-endian `bytes`, as f64.
fn decode(bytes: &[u8], dtype: DType, count: usize) -> Vec<f64> {
    let mut out = vec![0.0; count];
    crate::io::convert_into(dtype, &bytes[..count * dtype.size()], &mut out);
    out
}

/// Twin of column_centre (and column_to_f16): `x − μ` per column, μ the f64 mean (for a 16-bit `dtype`
/// rounded to it through f32, as centre_columns.cu's `centre_of`), times 2^e.
pub fn centre_twin(x: &[f64], n: usize, cols: usize, dtype: DType, e: i32) -> Vec<f64> {
    let mut mu = vec![0.0; cols];
    for row in x.chunks_exact(cols) {
        for (m, v) in mu.iter_mut().zip(row) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| {
        *m /= n as f64;
        *m = match dtype {
            DType::BF16 if m.is_finite() => half::bf16::from_f32(*m as f32).to_f64(),
            DType::F16 if m.is_finite() => f16::from_f32(*m as f32).to_f64(),
            _ => *m,
        }
    });
    let s = 2f64.powi(e);
    x.chunks_exact(cols)
        .flat_map(|row| row.iter().zip(&mu).map(move |(v, m)| (v - m) * s))
        .collect()
}

/// The exponent column_to_f16 picks (`centre_scale_exp`): with the f32 range max |x − μ| = m·2^k,
/// m ∈ [0.5, 1) (frexp), e = 14 − k, so that max |x − μ|·2^e < 2^14; clamped to ±60.
pub fn scale_exponent(centred: &[f64]) -> i32 {
    let range = centred.iter().fold(0f64, |m, v| m.max(v.abs())) as f32;
    // Zero, NaN or huge: no scaling (as the kernel).
    if range.is_nan() || range <= 0.0 || range > 3.0e38 {
        return 0;
    }
    // frexp's k from the f32 exponent bits (a subnormal gives k = −126: clamped to e = 60 either way).
    let k = ((range.to_bits() >> 23) & 0xff) as i32 - 126;
    (14 - k).clamp(-60, 60)
}

/// Twin of the Gram kernels: C·Cᵀ (n × n) of a row-major `n × cols` matrix, in f64.
pub fn gram_twin(c: &[f64], n: usize, cols: usize) -> Vec<f64> {
    let mut k = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let v: f64 = (0..cols).map(|t| c[i * cols + t] * c[j * cols + t]).sum();
            k[i * n + j] = v;
            k[j * n + i] = v;
        }
    }
    k
}

/// Twin of centre_pack (after gram_row_sums and centre_offsets): the matrix centred as the estimator
/// does, its lower triangle packed row by row, the diagonal times 1/√2 (biased; zero for unbiased),
/// and a linear Gram of a 2^e-scaled layer scaled back by 2^(−2e).
pub fn centre_pack_twin(k: &[f64], n: usize, estimator: Estimator, unscale_e: i32) -> Vec<f64> {
    let mut c = k.to_vec();
    match estimator {
        Estimator::Biased => cpu::double_centre(&mut c, n),
        Estimator::Unbiased => cpu::u_centre(&mut c, n),
    }
    let s = 2f64.powi(-2 * unscale_e);
    let mut out = vec![0.0; plan::packed_len(n)];
    cpu::pack_lower(&c, n, &mut out);
    out.iter_mut().for_each(|v| *v *= s);
    out
}

/// Twin of hsic_pairs + hsic_reduce_splits: Σₚ G_a(p)·G_b(p) for b ≤ a (upper triangle 0).
pub fn pairs_twin(g: &[Vec<f64>]) -> Vec<f64> {
    let l = g.len();
    let mut out = vec![0.0; l * l];
    for a in 0..l {
        for b in 0..=a {
            out[a * l + b] = g[a].iter().zip(&g[b]).map(|(x, y)| x * y).sum();
        }
    }
    out
}

/// max |got − want| / max |want| (NaN or a length mismatch: infinite).
fn rel_err(got: impl IntoIterator<Item = f64>, want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    let (mut err, mut count) = (0f64, 0);
    for (g, w) in got.into_iter().zip(want) {
        let d = (g - w).abs();
        err = if d.is_nan() {
            f64::INFINITY
        } else {
            err.max(d)
        };
        count += 1;
    }
    if count != want.len() {
        return f64::INFINITY;
    }
    err / scale
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Hold every stage of `out` (what the device computed for `batch`) to its twin, each twin fed the
/// device's output of the stage before. Tolerances, relative to the twin's largest value:
/// * centre (f32 / f64 layers): 1e-6 (one f32 rounding); centre_f16 (16-bit layers): 1e-3 (f16 keeps
///   11 bits: 2^-11 ≈ 4.9e-4 of a value);
/// * gram_fma, gram_mma: 1e-5 (exact products, f32 sums over the columns);
/// * rbf: 1e-4 (f32 distances and exp, as tests/cuda_backend.rs);
/// * centre_pack: 1e-6 (f64 centring, one f32 rounding);
/// * pairs: 1e-5 (f32 tiles of products, reduced in f64).
pub fn check_stages(
    batch: &BatchRef<'_>,
    out: &StageOutputs,
    estimator: Estimator,
    kernel: Kernel,
) -> Vec<StageCheck> {
    let n = batch.rows;
    let worst = |errs: &mut dyn Iterator<Item = f64>| errs.fold(0f64, f64::max);
    let mut checks = Vec::new();
    // The f32 / f64 layers and the 16-bit ones go through different kernels: one check each.
    for (sixteen, centre, gram) in [
        (false, "column_centre", "gram_fma"),
        (true, "column_centre, column_to_f16", "gram_mma"),
    ] {
        let layers: Vec<usize> = (0..batch.layers.len())
            .filter(|&y| batch.layers[y].dtype.is_16bit() == sixteen)
            .collect();
        if layers.is_empty() {
            continue;
        }
        checks.push(StageCheck {
            stage: if sixteen { "centre_f16" } else { "centre" },
            kernels: centre,
            rel_err: worst(&mut layers.iter().map(|&y| {
                let s = &batch.layers[y];
                let x = decode(s.bytes, s.dtype, n * s.cols);
                let e = if sixteen { out.exponent[y] } else { 0 };
                rel_err(
                    out.centred[y].iter().copied(),
                    &centre_twin(&x, n, s.cols, s.dtype, e),
                )
            })),
            tol: if sixteen { 1e-3 } else { 1e-6 },
        });
        checks.push(StageCheck {
            stage: gram,
            kernels: if sixteen { out.gram_16bit } else { gram },
            rel_err: worst(&mut layers.iter().map(|&y| {
                let want = gram_twin(&out.centred[y], n, batch.layers[y].cols);
                rel_err(out.gram[y].iter().map(|&v| v as f64), &want)
            })),
            tol: 1e-5,
        });
    }
    let centre_input: Vec<Vec<f64>> = match (&out.rbf, kernel) {
        (Some(rbf), Kernel::Rbf { threshold }) => {
            let mut errs = Vec::new();
            for (y, r) in rbf.iter().enumerate() {
                let mut want = as_f64(&out.gram[y]);
                cpu::rbf_from_linear(&mut want, n, threshold, &mut Vec::new());
                errs.push(rel_err(r.iter().map(|&v| v as f64), &want));
            }
            checks.push(StageCheck {
                stage: "rbf",
                kernels: "rbf_copy_diag, rbf_sqdist, rbf_select_*, rbf_exp",
                rel_err: worst(&mut errs.into_iter()),
                tol: 1e-4,
            });
            rbf.iter().map(|r| as_f64(r)).collect()
        }
        _ => out.gram.iter().map(|g| as_f64(g)).collect(),
    };
    checks.push(StageCheck {
        stage: "centre_pack",
        kernels: "gram_row_sums, centre_offsets, centre_pack",
        rel_err: worst(&mut centre_input.iter().enumerate().map(|(y, k)| {
            let e = match kernel {
                Kernel::Linear => out.exponent[y],
                Kernel::Rbf { .. } => 0,
            };
            let want = centre_pack_twin(k, n, estimator, e);
            rel_err(out.packed[y].iter().map(|&v| v as f64), &want)
        })),
        tol: 1e-6,
    });
    let g: Vec<Vec<f64>> = out.packed.iter().map(|r| as_f64(r)).collect();
    let l = g.len();
    let lower = |m: &[f64]| -> Vec<f64> {
        (0..l)
            .flat_map(|a| (0..=a).map(move |b| (a, b)))
            .map(|(a, b)| m[a * l + b])
            .collect()
    };
    checks.push(StageCheck {
        stage: "pairs",
        kernels: "hsic_pairs, hsic_reduce_splits",
        rel_err: rel_err(lower(&out.pairs), &lower(&pairs_twin(&g))),
        tol: 1e-5,
    });
    checks
}

/// What a device without rounding error would leave after each stage: the twins end to end (16-bit
/// layers scaled as column_to_f16 scales them, values rounded where the device stores f32 or f16).
pub fn reference(batch: &BatchRef<'_>, estimator: Estimator, kernel: Kernel) -> StageOutputs {
    reference_with(batch, estimator, kernel, &mut |_, _, _| {})
}

/// [`reference()`], with `tamper(stage, layer, values)` called on each stage's output before the next
/// stage reads it (stages "centre", "gram", "rbf", "centre_pack", per layer; "pairs" once, layer 0):
/// what a device with one faulty kernel would leave.
pub fn reference_with(
    batch: &BatchRef<'_>,
    estimator: Estimator,
    kernel: Kernel,
    tamper: &mut dyn FnMut(&'static str, usize, &mut [f64]),
) -> StageOutputs {
    let n = batch.rows;
    let f32s = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
    let (mut centred, mut exponent, mut gram) = (Vec::new(), Vec::new(), Vec::new());
    let mut rbf: Option<Vec<Vec<f32>>> = matches!(kernel, Kernel::Rbf { .. }).then(Vec::new);
    let mut packed = Vec::new();
    for (y, s) in batch.layers.iter().enumerate() {
        let x = decode(s.bytes, s.dtype, n * s.cols);
        let c = centre_twin(&x, n, s.cols, s.dtype, 0);
        let (mut c, e): (Vec<f64>, i32) = match s.dtype {
            DType::F16 | DType::BF16 => {
                let e = scale_exponent(&c);
                let s = 2f64.powi(e);
                (c.iter().map(|v| f16::from_f64(v * s).to_f64()).collect(), e)
            }
            DType::F32 => (c.iter().map(|&v| v as f32 as f64).collect(), 0),
            DType::F64 => (c, 0),
        };
        tamper("centre", y, &mut c);
        let mut k = as_f64(&f32s(&gram_twin(&c, n, s.cols)));
        tamper("gram", y, &mut k);
        gram.push(f32s(&k));
        let mut unscale = e;
        if let (Some(r), Kernel::Rbf { threshold }) = (rbf.as_mut(), kernel) {
            cpu::rbf_from_linear(&mut k, n, threshold, &mut Vec::new());
            k = as_f64(&f32s(&k));
            tamper("rbf", y, &mut k);
            r.push(f32s(&k));
            unscale = 0;
        }
        let mut g = as_f64(&f32s(&centre_pack_twin(&k, n, estimator, unscale)));
        tamper("centre_pack", y, &mut g);
        packed.push(f32s(&g));
        centred.push(c);
        exponent.push(e);
    }
    let mut pairs = pairs_twin(&packed.iter().map(|r| as_f64(r)).collect::<Vec<_>>());
    tamper("pairs", 0, &mut pairs);
    StageOutputs {
        gram_16bit: "gram_mma",
        n,
        centred,
        exponent,
        gram,
        rbf,
        packed,
        pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Batch, LayerBlock};
    use rand::{Rng, SeedableRng};

    /// Large-mean layers of every dtype, `n` samples.
    fn batch(rng: &mut rand::rngs::StdRng, n: usize) -> Batch {
        let layers = [
            (13, DType::F32),
            (7, DType::F64),
            (24, DType::BF16),
            (5, DType::F16),
        ];
        Batch {
            rows: n,
            layers: layers
                .iter()
                .map(|&(cols, dtype)| {
                    let vals: Vec<f64> = (0..n * cols)
                        .map(|i| {
                            let mean = if i % cols == 3 { 3000.0 } else { 90.0 };
                            mean + rng.random_range(-2.0..2.0)
                        })
                        .collect();
                    let data: Vec<u8> = match dtype {
                        DType::F32 => vals
                            .iter()
                            .flat_map(|&v| (v as f32).to_le_bytes())
                            .collect(),
                        DType::F64 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        DType::F16 => vals
                            .iter()
                            .flat_map(|&v| f16::from_f64(v).to_le_bytes())
                            .collect(),
                        DType::BF16 => vals
                            .iter()
                            .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
                            .collect(),
                    };
                    LayerBlock {
                        dtype,
                        cols,
                        data: data.into(),
                    }
                })
                .collect(),
        }
    }

    /// The twins' own outputs pass their checks, every estimator and kernel. A device with one faulty
    /// kernel (its output off, the later stages computed from it) fails that kernel's check only: each
    /// twin reads the device's previous stage.
    #[test]
    fn each_stage_is_held_to_its_twin_in_isolation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let b = batch(&mut rng, 37);
        let b = b.as_ref();
        for estimator in [Estimator::Biased, Estimator::Unbiased] {
            for kernel in [Kernel::Linear, Kernel::Rbf { threshold: 1.0 }] {
                let good = reference(&b, estimator, kernel);
                let checks = check_stages(&b, &good, estimator, kernel);
                let rbf = matches!(kernel, Kernel::Rbf { .. });
                assert_eq!(checks.len(), if rbf { 7 } else { 6 });
                for c in &checks {
                    assert!(c.passed(), "{estimator:?} {kernel:?}: {c:?}");
                }
                // The 16-bit layers were scaled to f16's range.
                assert!(good.exponent[2] != 0 && good.exponent[0] == 0);
                // (stage, layer) made wrong → the check that must fail, alone.
                let mut cases = vec![
                    ("centre", 0, "centre"),
                    ("centre", 2, "centre_f16"),
                    ("gram", 1, "gram_fma"),
                    ("gram", 3, "gram_mma"),
                    ("centre_pack", 2, "centre_pack"),
                    ("pairs", 0, "pairs"),
                ];
                if rbf {
                    cases.push(("rbf", 1, "rbf"));
                }
                for (stage, layer, check) in cases {
                    let bad = reference_with(&b, estimator, kernel, &mut |s, y, v| {
                        if s == stage && y == layer {
                            let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
                            v[v.len() / 2 + 1] += 1e-2 * max;
                        }
                    });
                    let failed: Vec<&str> = check_stages(&b, &bad, estimator, kernel)
                        .into_iter()
                        .filter(|c| !c.passed())
                        .map(|c| c.stage)
                        .collect();
                    assert_eq!(failed, [check], "{estimator:?} {kernel:?} {stage} {layer}");
                }
            }
        }
    }

    #[test]
    fn the_scale_exponent_is_the_kernels() {
        // max |x − μ|·2^e < 2^14 ≤ max |x − μ|·2^(e+1).
        for range in [
            1.0f64, 0.75, 3.0, 1000.0, 16384.0, 16385.0, 1e-3, 0.99999994,
        ] {
            let e = scale_exponent(&[range, -0.5 * range]);
            assert!(range * 2f64.powi(e) < 16384.0, "{range}: {e}");
            assert!(range * 2f64.powi(e + 1) >= 16384.0, "{range}: {e}");
        }
        assert_eq!(scale_exponent(&[0.0, 0.0]), 0);
    }
}
