//! The CPU CKA estimators against a plain float64 reference (explicit centring matrix H, O(n³)), and the
//! identities CKA must satisfy. Tolerance: 1e-6 absolute on CKA (the bound; the f64 engine is
//! typically within 1e-12).

#[path = "common/cka_ref.rs"]
mod cka_ref;

use cka_ref::{batch, engine, matmul, metas, reference, round_to, Mat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use sglp_engine::io::DType;
use sglp_engine::similarity::cpu::CpuBackend;
use sglp_engine::similarity::{
    Backend, CkaAccumulator, CkaResult, CkaSpec, Estimator, Kernel, Precision, Route,
};

/// Structured activations: a shared latent seen through per-layer random maps, plus noise that grows
/// with depth, so the CKA matrix has graded, non-trivial structure.
fn structured(rng: &mut StdRng, n: usize, widths: &[usize]) -> Vec<Mat> {
    let g = Normal::new(0.0, 1.0).unwrap();
    let latent_dim = 5;
    let z: Mat = (0..n)
        .map(|_| (0..latent_dim).map(|_| g.sample(rng)).collect())
        .collect();
    widths
        .iter()
        .enumerate()
        .map(|(li, &d)| {
            let w: Mat = (0..latent_dim)
                .map(|_| (0..d).map(|_| g.sample(rng)).collect())
                .collect();
            let mut x = matmul(&z, &w);
            for r in &mut x {
                for v in r.iter_mut() {
                    *v += (0.3 + 0.4 * li as f64) * g.sample(rng) + 0.7; // non-zero mean too
                }
            }
            x
        })
        .collect()
}

fn assert_close(got: &CkaResult, want: &Mat, tol: f64, what: &str) {
    let g = got.cka_matrix();
    for i in 0..want.len() {
        for j in 0..want.len() {
            let d = (g[i][j] - want[i][j]).abs();
            assert!(
                d <= tol,
                "{what}: CKA[{i}][{j}] = {} vs reference {} (|Δ| = {d:.2e})",
                g[i][j],
                want[i][j]
            );
        }
    }
}

const TOL: f64 = 1e-6;

#[test]
fn every_estimator_route_and_kernel_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    // Widths below and above the batch size, so both routes are exercised by the auto rule too.
    let layers = structured(&mut rng, 47, &[3, 20, 1, 64, 9]);
    let rbf = Kernel::Rbf { threshold: 0.8 };
    for (est, kernel, route, b) in [
        (Estimator::Biased, Kernel::Linear, Route::Gram, 0),
        (Estimator::Biased, Kernel::Linear, Route::Feature, 0),
        (Estimator::Biased, rbf, Route::Gram, 0),
        (Estimator::Unbiased, Kernel::Linear, Route::Gram, 12),
        (Estimator::Unbiased, Kernel::Linear, Route::Feature, 12),
        (Estimator::Unbiased, rbf, Route::Gram, 12),
        (Estimator::Unbiased, Kernel::Linear, Route::Auto, 47),
    ] {
        let spec = CkaSpec {
            estimator: est,
            kernel,
            batch_size: b.max(4),
            route,
        };
        let want = reference(&layers, est, kernel, b).1;
        // Chunks that straddle batches in every way.
        let got = engine(&layers, spec, &[5, 13, 1, 30], DType::F64);
        assert_close(
            &got,
            &want,
            TOL,
            &format!("{est:?} {kernel:?} {route:?} b={b}"),
        );
        // 47 = 3·12 + 11: the short last batch is kept (≥ 4 samples) with a warning.
        if est == Estimator::Unbiased && b == 12 {
            assert_eq!(got.n_batches, 4);
            assert!(
                got.warnings.iter().any(|w| w.contains("last batch has 11")),
                "{:?}",
                got.warnings
            );
        }
    }
}

#[test]
fn a_last_batch_under_four_samples_is_dropped_with_a_warning() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let layers = structured(&mut rng, 22, &[6, 7]);
    let spec = CkaSpec {
        estimator: Estimator::Unbiased,
        kernel: Kernel::Linear,
        batch_size: 10,
        route: Route::Gram,
    };
    let got = engine(&layers, spec, &[22], DType::F64);
    assert_eq!((got.n_batches, got.n_samples), (2, 20));
    assert!(got
        .warnings
        .iter()
        .any(|w| w.contains("dropped the last 2")));
    assert_close(
        &got,
        &reference(&layers, Estimator::Unbiased, Kernel::Linear, 10).1,
        TOL,
        "dropped tail",
    );
}

#[test]
fn cka_is_symmetric_with_unit_diagonal_and_invariant_to_scaling_and_rotation() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let layers = structured(&mut rng, 64, &[8, 8, 12]);
    for est in [Estimator::Biased, Estimator::Unbiased] {
        let spec = CkaSpec {
            estimator: est,
            kernel: Kernel::Linear,
            batch_size: 32,
            route: Route::Gram,
        };
        let base = engine(&layers, spec, &[64], DType::F64).cka_matrix();
        for i in 0..3 {
            assert!((base[i][i] - 1.0).abs() < 1e-12);
            for j in 0..3 {
                assert!((base[i][j] - base[j][i]).abs() < 1e-12);
            }
        }
        // Layer 1 scaled by 7.5 and rotated by a random orthogonal matrix (Gram–Schmidt of a Gaussian).
        let g = Normal::new(0.0, 1.0).unwrap();
        let mut q: Mat = (0..8)
            .map(|_| (0..8).map(|_| g.sample(&mut rng)).collect())
            .collect();
        for i in 0..8 {
            for j in 0..i {
                let dot: f64 = (0..8).map(|t| q[i][t] * q[j][t]).sum();
                for t in 0..8 {
                    q[i][t] -= dot * q[j][t];
                }
            }
            let norm = q[i].iter().map(|v| v * v).sum::<f64>().sqrt();
            q[i].iter_mut().for_each(|v| *v /= norm);
        }
        let mut moved = layers.clone();
        moved[1] = matmul(&layers[1], &q)
            .into_iter()
            .map(|r| r.into_iter().map(|v| 7.5 * v).collect())
            .collect();
        let after = engine(&moved, spec, &[64], DType::F64).cka_matrix();
        for i in 0..3 {
            for j in 0..3 {
                assert!(
                    (after[i][j] - base[i][j]).abs() < 1e-9,
                    "{est:?} [{i}][{j}] {} vs {}",
                    after[i][j],
                    base[i][j]
                );
            }
        }
    }
}

#[test]
fn biased_cka_of_independent_data_falls_with_n_while_unbiased_stays_near_zero() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let g = Normal::new(0.0, 1.0).unwrap();
    let mut at = |n: usize, est: Estimator| -> f64 {
        let mut sum = 0.0;
        let reps = 6;
        for _ in 0..reps {
            let layers: Vec<Mat> = (0..2)
                .map(|_| {
                    (0..n)
                        .map(|_| (0..64).map(|_| g.sample(&mut rng)).collect())
                        .collect()
                })
                .collect();
            let spec = CkaSpec {
                estimator: est,
                kernel: Kernel::Linear,
                batch_size: n,
                route: Route::Gram,
            };
            sum += engine(&layers, spec, &[n], DType::F64).cka_matrix()[0][1];
        }
        sum / reps as f64
    };
    let (b32, b256) = (at(32, Estimator::Biased), at(256, Estimator::Biased));
    let (u32_, u256) = (at(32, Estimator::Unbiased), at(256, Estimator::Unbiased));
    assert!(
        b32 > 0.3 && b256 < 0.35 && b256 < b32 / 2.0,
        "biased: {b32} at n=32, {b256} at n=256"
    );
    assert!(
        u32_.abs() < 0.05 && u256.abs() < 0.02,
        "unbiased: {u32_} at n=32, {u256} at n=256"
    );
}

#[test]
fn zero_variance_layer_gives_nan_row_and_a_warning() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let mut layers = structured(&mut rng, 16, &[4, 4]);
    for r in &mut layers[1] {
        r.iter_mut().for_each(|v| *v = 3.25); // constant, not zero
    }
    for est in [Estimator::Biased, Estimator::Unbiased] {
        let spec = CkaSpec {
            estimator: est,
            kernel: Kernel::Linear,
            batch_size: 16,
            route: Route::Gram,
        };
        let got = engine(&layers, spec, &[16], DType::F64);
        assert!(got.cka[1].iter().all(|v| v.is_none()), "{:?}", got.cka);
        assert!(got.cka[0][0].is_some());
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("'layer1'") && w.contains("zero variance")),
            "{:?}",
            got.warnings
        );
    }
}

#[test]
fn half_precision_inputs_match_their_f32_values() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let layers = structured(&mut rng, 40, &[7, 5]);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        // Round to the dtype, then compare against the reference on the rounded values.
        let rounded = round_to(&layers, dtype);
        let b = batch(&rounded, 0, 40, dtype);
        let meta = metas(&rounded, dtype);
        let spec = CkaSpec {
            estimator: Estimator::Unbiased,
            kernel: Kernel::Linear,
            batch_size: 20,
            route: Route::Gram,
        };
        let mut acc = CkaAccumulator::new(&meta, spec, None).unwrap();
        let mut cpu = CpuBackend::new(1);
        acc.push(&b.as_ref(), &mut cpu).unwrap();
        let got = acc.finish(&mut cpu).unwrap();
        assert_close(
            &got,
            &reference(&rounded, Estimator::Unbiased, Kernel::Linear, 20).1,
            TOL,
            dtype.name(),
        );
    }
}

/// Run the CPU engine on f32-stored layers with the given Gram precision.
fn engine_f32_stored(layers: &[Mat], spec: CkaSpec, precision: Precision) -> CkaResult {
    let n = layers[0].len();
    let meta = metas(layers, DType::F32);
    let b = batch(layers, 0, n, DType::F32);
    let mut acc = CkaAccumulator::new(&meta, spec, Some(n)).unwrap();
    let mut cpu = CpuBackend::new(2);
    assert!(cpu.set_precision(precision));
    acc.push(&b.as_ref(), &mut cpu).unwrap();
    acc.finish(&mut cpu).unwrap()
}

#[test]
fn f32_grams_match_the_f64_reference_within_1e_6() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let spec = CkaSpec {
        estimator: Estimator::Unbiased,
        kernel: Kernel::Linear,
        batch_size: 12,
        route: Route::Gram,
    };
    // Against the explicit reference, on the values as stored (f32), both estimators.
    let layers = structured(&mut rng, 47, &[3, 20, 1, 64, 9]);
    let stored = round_to(&layers, DType::F32);
    for (est, b) in [(Estimator::Unbiased, 12), (Estimator::Biased, 0)] {
        let spec = CkaSpec {
            estimator: est,
            batch_size: b.max(4),
            ..spec
        };
        let got = engine_f32_stored(&stored, spec, Precision::F32);
        assert!(got.backend.contains("f32"), "{}", got.backend);
        assert_close(
            &got,
            &reference(&stored, est, Kernel::Linear, b).1,
            TOL,
            &format!("f32 Grams, {est:?}"),
        );
    }

    // LLM-like hidden states: per-feature means around 100 and a few outlier features around 5000, at
    // widths where f32 sums lose digits; against the engine's f64 Grams (themselves held to the
    // reference above), which the O(n³) reference is too slow for.
    let g = Normal::new(0.0, 1.0).unwrap();
    let (n, d) = (384, 512);
    let latent: Mat = (0..n)
        .map(|_| (0..8).map(|_| g.sample(&mut rng)).collect())
        .collect();
    let means: Vec<f64> = (0..d)
        .map(|j| {
            if j % 97 == 5 {
                5000.0 * (1.0 + 0.1 * g.sample(&mut rng))
            } else {
                100.0 + 20.0 * g.sample(&mut rng)
            }
        })
        .collect();
    let llm: Vec<Mat> = (0..6)
        .map(|li| {
            let w: Mat = (0..8)
                .map(|_| (0..d).map(|_| g.sample(&mut rng)).collect())
                .collect();
            let mut x = matmul(&latent, &w);
            for r in &mut x {
                for (j, v) in r.iter_mut().enumerate() {
                    let scale = if j % 97 == 5 { 50.0 } else { 1.0 };
                    *v = means[j] + scale * (*v + (0.5 + 0.3 * li as f64) * g.sample(&mut rng));
                }
            }
            x
        })
        .collect();
    let spec = CkaSpec {
        batch_size: 128,
        ..spec
    };
    let f64_grams = engine_f32_stored(&llm, spec, Precision::F64);
    let f32_grams = engine_f32_stored(&llm, spec, Precision::F32);
    assert_close(
        &f32_grams,
        &f64_grams.cka_matrix(),
        TOL,
        "LLM-like, f32 Grams",
    );
    // The data is not trivially similar: the check would see a wrong answer.
    let off: f64 = f64_grams.cka_matrix()[0][5];
    assert!(off < 0.99 && off > 0.05, "{off}");
}
