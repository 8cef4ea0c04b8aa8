//! Activations at the edges of the float formats, and models at the edges of what the runtime takes,
//! against the plain float64 reference (`common/cka_ref.rs`) or the documented behaviour (README,
//! "Numerics"). Tolerances: CKA within 1e-6 absolute (the bound) unless a case says otherwise; the
//! reference always runs on the values as stored (rounded to the input's dtype).

#[path = "common/cka_ref.rs"]
mod cka_ref;
mod common;

use cka_ref::{engine, nan_matrix, reference, round_to, Mat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use sglp_engine::io::DType;
use sglp_engine::similarity::{CkaResult, CkaSpec, Estimator, Kernel, Route};

const TOL: f64 = 1e-6;

fn rng() -> StdRng {
    StdRng::seed_from_u64(rand::random())
}

/// `widths.len()` related layers of `n` rows: a shared latent through random maps plus noise; every value
/// then goes through `f` (scaling, shifting).
fn layers(rng: &mut StdRng, n: usize, widths: &[usize], f: impl Fn(usize, f64) -> f64) -> Vec<Mat> {
    let g = Normal::new(0.0, 1.0).unwrap();
    let z: Mat = (0..n)
        .map(|_| (0..3).map(|_| g.sample(rng)).collect())
        .collect();
    widths
        .iter()
        .map(|&d| {
            let w: Mat = (0..3)
                .map(|_| (0..d).map(|_| g.sample(rng)).collect())
                .collect();
            cka_ref::matmul(&z, &w)
                .into_iter()
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .map(|(c, v)| f(c, v + 0.5 * g.sample(rng)))
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Every estimator, route and kernel the CPU runs.
fn specs(b: usize) -> Vec<CkaSpec> {
    let mut v = Vec::new();
    for estimator in [Estimator::Biased, Estimator::Unbiased] {
        for (kernel, route) in [
            (Kernel::Linear, Route::Gram),
            (Kernel::Linear, Route::Feature),
            (Kernel::Rbf { threshold: 1.0 }, Route::Gram),
        ] {
            v.push(CkaSpec {
                estimator,
                kernel,
                batch_size: b,
                route,
            });
        }
    }
    v
}

fn assert_cka(got: &CkaResult, want: &Mat, tol: f64, what: &str) {
    let g = nan_matrix(&got.cka);
    for i in 0..want.len() {
        for j in 0..want.len() {
            let (x, y) = (g[i][j], want[i][j]);
            assert!(
                (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol,
                "{what}: CKA[{i}][{j}] = {x} vs reference {y} (tol {tol:e}); warnings {:?}",
                got.warnings
            );
        }
    }
}

/// Run every spec on `data` stored as `dtype` and compare with the reference on the stored values.
fn check_all(data: &[Mat], dtype: DType, b: usize, tol: f64, what: &str) {
    let stored = round_to(data, dtype);
    for spec in specs(b) {
        let got = engine(&stored, spec, &[7, 13], dtype);
        let (_, want) = reference(&stored, spec.estimator, spec.kernel, b);
        assert!(
            want.iter().flatten().all(|v| v.is_finite()),
            "{what}: the reference itself is not finite: {want:?}"
        );
        assert_cka(&got, &want, tol, &format!("{what}, {dtype:?}, {spec:?}"));
        assert!(
            !got.warnings.iter().any(|w| w.contains("zero variance")),
            "{what}: {:?}",
            got.warnings
        );
    }
}

#[test]
fn activations_near_the_f16_maximum() {
    // |x| up to ~6e4 (f16's largest finite value is 65504).
    let mut r = rng();
    let data = layers(&mut r, 24, &[5, 3], |_, v| {
        (v * 1.5e4).clamp(-65000.0, 65000.0)
    });
    check_all(&data, DType::F16, 8, TOL, "near f16 max");
}

#[test]
fn activations_near_the_bf16_and_f32_maximum() {
    // ~1e38: squares (1e76) and fourth powers (HSIC, 1e152) stay in f64's range, the product of two
    // diagonal HSICs (1e304+) would not.
    let mut r = rng();
    let data = layers(&mut r, 16, &[4, 4], |_, v| (v * 5e37).clamp(-3e38, 3e38));
    check_all(&data, DType::BF16, 8, TOL, "near bf16 max");
    check_all(&data, DType::F32, 8, TOL, "near f32 max");
}

#[test]
fn subnormal_activations() {
    let mut r = rng();
    // f32 subnormals (below 1.2e-38): ~1e-40. Rounded to the subnormal grid, which the reference sees too.
    let data = layers(&mut r, 16, &[4, 3], |_, v| v * 1e-40);
    check_all(&data, DType::F32, 8, TOL, "f32 subnormals");
    // f16 subnormals (below 6.1e-5): ~1e-6, a few bits of precision each.
    let data = layers(&mut r, 16, &[4, 3], |_, v| v * 2e-6);
    check_all(&data, DType::F16, 8, TOL, "f16 subnormals");
}

/// A layer whose every column is constant (each its own value, not exactly representable: 0.1, 1/3, ...):
/// zero variance, whatever rounding the centring does. Documented: a NaN (`null`) CKA row and a warning
/// naming the layer, for every estimator, route and kernel, not a ratio of rounding errors.
#[test]
fn a_layer_of_constant_columns_has_a_nan_row_and_a_warning() {
    let mut r = rng();
    let mut data = layers(&mut r, 20, &[4, 3, 2], |_, v| v);
    let consts: Vec<f64> = (0..3)
        .map(|c| [0.1, 1.0 / 3.0, 7.3, -1234.567, 1e-3][(c + r.random_range(0..5)) % 5])
        .collect();
    for row in &mut data[1] {
        row.copy_from_slice(&consts);
    }
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for spec in specs(8) {
            let got = engine(&data, spec, &[20], dtype);
            let cka = nan_matrix(&got.cka);
            assert!(
                cka[1].iter().all(|v| v.is_nan()) && cka.iter().all(|r| r[1].is_nan()),
                "{dtype:?} {spec:?}: constant layer's CKA {:?}",
                cka
            );
            assert!(cka[0][2].is_finite(), "{spec:?}: {cka:?}");
            assert!(
                got.warnings
                    .iter()
                    .any(|w| w.contains("'layer1'") && w.contains("zero variance")),
                "{dtype:?} {spec:?}: {:?}",
                got.warnings
            );
        }
    }
}

/// Some constant columns inside a varying layer carry no information: the CKA is the reference's on the
/// same data (which is the CKA without those columns).
#[test]
fn constant_columns_inside_a_varying_layer() {
    let mut r = rng();
    let mut data = layers(&mut r, 24, &[5, 3], |_, v| v);
    for row in &mut data[0] {
        row[1] = 0.1;
        row[3] = -77.7;
    }
    check_all(&data, DType::F64, 8, TOL, "constant columns");
}

/// A layer constant over the first batch only (e.g. padding). Linear kernel: that batch adds 0 to the
/// layer's HSICs, the others do not, so its CKA is finite, no warning, and equal to the reference's mean
/// over batches. RBF kernel: the batch's median squared distance is 0 and its bandwidth undefined
/// (Kornblith et al.'s `gram_rbf` divides by it too), so the layer's HSICs are NaN: a NaN CKA row and a
/// warning that its HSIC is not finite.
#[test]
fn a_layer_with_zero_variance_in_one_batch_only() {
    let mut r = rng();
    let mut data = layers(&mut r, 32, &[4, 4], |_, v| v);
    for row in &mut data[1][..8] {
        row.iter_mut().for_each(|v| *v = 0.3);
    }
    for spec in specs(8) {
        if spec.estimator == Estimator::Biased {
            continue; // one batch of all rows: the layer varies
        }
        let got = engine(&data, spec, &[5, 11], DType::F64);
        if let Kernel::Rbf { .. } = spec.kernel {
            let cka = nan_matrix(&got.cka);
            assert!(cka[1].iter().all(|v| v.is_nan()) && cka[0][0].is_finite());
            assert!(
                got.warnings
                    .iter()
                    .any(|w| w.contains("'layer1'") && w.contains("not finite")),
                "{:?}",
                got.warnings
            );
            continue;
        }
        let (h, want) = reference(&data, spec.estimator, spec.kernel, 8);
        assert!(h[1][1] > 0.0, "{h:?}");
        assert_cka(&got, &want, TOL, &format!("{spec:?}"));
        // The unbiased estimate of two weakly related layers over few batches can come out below 0 (for
        // some fresh draws): then, and only then, the engine says so.
        let negative = want.iter().flatten().any(|&v| v < TOL);
        let unexpected: Vec<&String> = got
            .warnings
            .iter()
            .filter(|w| !(negative && w.contains("negative CKA estimate")))
            .collect();
        assert!(unexpected.is_empty(), "{:?}", got.warnings);
    }
}

/// HSIC₀ with X̃ = X − column means (two-pass, f64): ‖X̃ᵀỸ‖²_F/(n−1)², O(n·d²); for the large cases
/// where the O(n³) reference is too slow. The same number as tr(KHLH)/(n−1)² for the linear kernel.
fn hsic0_linear(x: &Mat, y: &Mat) -> f64 {
    let n = x.len();
    let centre = |m: &Mat| -> Mat {
        let d = m[0].len();
        let mean: Vec<f64> = (0..d)
            .map(|c| m.iter().map(|r| r[c]).sum::<f64>() / n as f64)
            .collect();
        m.iter()
            .map(|r| r.iter().zip(&mean).map(|(v, u)| v - u).collect())
            .collect()
    };
    let c = cka_ref::matmul(&cka_ref::transpose(&centre(x)), &centre(y));
    c.iter().flatten().map(|v| v * v).sum::<f64>() / ((n as f64 - 1.0) * (n as f64 - 1.0))
}

fn linear_cka0(layers: &[Mat]) -> Mat {
    let l = layers.len();
    let h: Mat = (0..l)
        .map(|i| {
            (0..l)
                .map(|j| hsic0_linear(&layers[i], &layers[j]))
                .collect()
        })
        .collect();
    (0..l)
        .map(|i| {
            (0..l)
                .map(|j| h[i][j] / (h[i][i].sqrt() * h[j][j].sqrt()))
                .collect()
        })
        .collect()
}

/// Biased linear CKA the way a naive f32 implementation does it: Gram in f32, double-centred in f32.
fn naive_f32_cka(x: &Mat, y: &Mat) -> f64 {
    let n = x.len();
    let gram = |m: &Mat| -> Vec<f32> {
        let mut k = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                k[i * n + j] = m[i]
                    .iter()
                    .zip(&m[j])
                    .map(|(a, b)| *a as f32 * *b as f32)
                    .sum();
            }
        }
        let means: Vec<f32> = (0..n)
            .map(|i| k[i * n..(i + 1) * n].iter().sum::<f32>() / n as f32)
            .collect();
        let grand = means.iter().sum::<f32>() / n as f32;
        for i in 0..n {
            for j in 0..n {
                k[i * n + j] += grand - means[i] - means[j];
            }
        }
        k
    };
    let (k, l) = (gram(x), gram(y));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
    (dot(&k, &l) / (dot(&k, &k).sqrt() * dot(&l, &l).sqrt())) as f64
}

/// LLM-like activations: per-feature means around 100, a few features around 5000, unit-scale variation;
/// n·d large enough that f32 Gram sums lose digits (shown by the naive f32 CKA, off by more than the
/// tolerance). The engine reads f32 / bf16 and computes in f64: within 1e-6 of the reference.
#[test]
fn large_means_and_outlier_features_llm_like() {
    let mut r = rng();
    let (n, d) = (384, 48);
    let means: Vec<f64> = (0..d)
        .map(|c| {
            if c % 16 == 3 {
                5000.0 * if c % 32 == 3 { 1.0 } else { -1.0 }
            } else {
                100.0 + r.random_range(-20.0..20.0)
            }
        })
        .collect();
    let data = layers(&mut r, n, &[d, d, d], |c, v| means[c] + v);
    let stored = round_to(&data, DType::F32);
    let want = linear_cka0(&stored);
    let naive = naive_f32_cka(&stored[0], &stored[1]);
    assert!(
        (naive - want[0][1]).abs() > TOL,
        "the data is not hostile enough: naive f32 CKA {naive} vs {}",
        want[0][1]
    );
    for route in [Route::Gram, Route::Feature] {
        let spec = CkaSpec {
            estimator: Estimator::Biased,
            kernel: Kernel::Linear,
            batch_size: n,
            route,
        };
        let got = engine(&stored, spec, &[100, 57], DType::F32);
        assert_cka(&got, &want, TOL, &format!("LLM-like, {route:?}"));
    }
    // Unbiased and RBF on a smaller slice, against the O(n³) reference.
    let small: Vec<Mat> = stored.iter().map(|x| x[..48].to_vec()).collect();
    check_all(&small, DType::F32, 16, TOL, "LLM-like, small");
    check_all(&small, DType::BF16, 16, TOL, "LLM-like bf16, small");
}

// ---------------------------------------------------------------------------------------------------------
// The runtime at its edges, on the f32 fixture checkpoint `llama_llama3_rope` (no biases).
// ---------------------------------------------------------------------------------------------------------

use sglp_engine::runtime::{Model, Tokens};

const MODEL: &str = "llama_llama3_rope";

/// A copy of the fixture checkpoint with tensor `name` (f32) rewritten by `f(row, column, value)`.
fn edited_weights(name: &str, f: impl Fn(usize, usize, f32) -> f32) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture(MODEL)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "F32", "{name}: {t}");
    let cols = t["shape"][1].as_u64().unwrap_or(1) as usize;
    let (s, e) = (
        8 + n + t["data_offsets"][0].as_u64().unwrap() as usize,
        8 + n + t["data_offsets"][1].as_u64().unwrap() as usize,
    );
    for (i, c) in bytes[s..e].chunks_exact_mut(4).enumerate() {
        let v = f(
            i / cols,
            i % cols,
            f32::from_le_bytes(c.try_into().unwrap()),
        );
        c.copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    tmp
}

fn fixture_tokens() -> Tokens {
    Tokens::load_npy(&common::fixture(MODEL).join("tokens.npy")).unwrap()
}

/// Sequences of one token have nothing to predict: refused with the documented message, not a NaN loss.
#[test]
fn sequence_length_one_is_refused() {
    let model = Model::load(&common::fixture(MODEL)).unwrap();
    let t = fixture_tokens();
    let one = Tokens {
        data: t.data.iter().step_by(t.len).copied().collect(),
        sequences: t.sequences,
        len: 1,
    };
    let e = model.forward(&one, &[], None).unwrap_err();
    assert!(e.to_string().contains("at least 2 tokens"), "{e}");
    let e = model.grad_norms(&one, &[]).unwrap_err();
    assert!(e.to_string().contains("at least 2 tokens"), "{e}");
    // Two tokens, the shortest that works: a finite loss.
    let two = Tokens {
        data: t.data.chunks(t.len).flat_map(|s| s[..2].to_vec()).collect(),
        sequences: t.sequences,
        len: 2,
    };
    let g = model.grad_norms(&two, &[]).unwrap();
    assert!(g.loss.is_finite() && g.loss > 0.0, "{}", g.loss);
}

/// lm_head scaled by 1e4: logits of ~1e4–1e5, where a softmax without the max shift overflows f32. The
/// cross-entropy is the float64 log-sum-exp of the logits the model's own last hidden state gives,
/// within 1e-5 relative, and the gradient norms stay finite.
#[test]
fn huge_logits_keep_the_cross_entropy_finite_and_right() {
    let dir = edited_weights("lm_head.weight", |_, _, v| v * 1e4);
    let model = Model::load(dir.path()).unwrap();
    let tokens = fixture_tokens();
    let nl = model.num_layers();
    let mut last = Vec::new();
    let loss = model
        .forward(
            &tokens,
            &[],
            Some(&mut |i, h| {
                if i == nl {
                    last = h.to_vec();
                }
            }),
        )
        .unwrap();
    // Reference: final RMSNorm and lm_head in f64, log-sum-exp with the max shift, next-token targets.
    let w = sglp_engine::runtime::weights::Weights::open(dir.path()).unwrap();
    let norm = w.get_f32("model.norm.weight").unwrap();
    let head = w.get_f32("lm_head.weight").unwrap();
    let (hid, vocab) = (model.hidden_size(), model.vocab_size());
    let eps = model.config.rms_norm_eps;
    let (mut sum, mut count, mut max_logit) = (0.0f64, 0usize, 0.0f64);
    for s in 0..tokens.sequences {
        for p in 0..tokens.len - 1 {
            let r = s * tokens.len + p;
            let x = &last[r * hid..(r + 1) * hid];
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hid as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            let z: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..hid)
                        .map(|c| x[c] as f64 * inv * norm[c] as f64 * head[v * hid + c] as f64)
                        .sum()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            max_logit = max_logit.max(z.iter().fold(0.0f64, |a, v| a.max(v.abs())));
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            sum += lse - z[tokens.data[r + 1] as usize];
            count += 1;
        }
    }
    let want = sum / count as f64;
    assert!(max_logit > 1e3, "logits are not huge: max {max_logit}");
    assert!(loss.is_finite(), "{loss}");
    assert!(
        common::rel(loss, want) < 1e-5,
        "loss {loss} vs reference {want}"
    );
    let g = model.grad_norms(&tokens, &[]).unwrap();
    assert!(g.loss.is_finite());
    assert!(
        g.per_layer.iter().all(|v| v.is_finite()),
        "{:?}",
        g.per_layer
    );
    assert!(g.embed_tokens.is_finite() && g.norm.is_finite());
}

/// Embedding rows of zeros for every token used: the hidden states are exactly zero (RMSNorm of a zero
/// vector is zero, not NaN, thanks to eps), so with no biases the logits are 0 and the loss is exactly
/// ln(vocab); the gradients are finite.
#[test]
fn zero_embedding_rows_give_a_finite_uniform_loss() {
    let tokens = fixture_tokens();
    let used: std::collections::HashSet<usize> = tokens.data.iter().map(|&t| t as usize).collect();
    let dir = edited_weights("model.embed_tokens.weight", |r, _, v| {
        if used.contains(&r) {
            0.0
        } else {
            v
        }
    });
    let model = Model::load(dir.path()).unwrap();
    let mut nonzero = 0usize;
    let loss = model
        .forward(
            &tokens,
            &[],
            Some(&mut |_, h| nonzero += h.iter().filter(|v| **v != 0.0).count()),
        )
        .unwrap();
    assert_eq!(nonzero, 0, "hidden states of zero embeddings are not zero");
    let want = (model.vocab_size() as f64).ln();
    assert!(
        (loss - want).abs() < 1e-6,
        "loss {loss} vs ln(vocab) {want}"
    );
    let g = model.grad_norms(&tokens, &[]).unwrap();
    assert!(
        g.per_layer.iter().all(|v| v.is_finite()),
        "{:?}",
        g.per_layer
    );
    assert!(
        g.embed_tokens.is_finite() && g.embed_tokens > 0.0,
        "{}",
        g.embed_tokens
    );
}
