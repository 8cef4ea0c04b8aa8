//! Property tests (proptest) of the CKA estimators and the segmentation, on random shapes (down to one
//! layer, one feature, and the smallest unbiased batch b = 4) and random data:
//!
//! * the CPU engine = the plain float64 reference (`common/cka_ref.rs`): HSIC within 1e-9 of the scale of
//!   the HSIC matrix, CKA within 1e-6 where the reference's denominators are not at rounding level;
//! * CKA is symmetric, with a unit diagonal;
//! * invariant to an orthogonal transform of a layer's features, to isotropic scaling, and to a shift of
//!   each feature's mean (every estimator and kernel here: both estimators centre, and the RBF median
//!   bandwidth scales with the data), within 1e-8;
//! * independent of how the rows are chunked when pushed (the accumulator re-batches), within 1e-10;
//! * Fisher's DP finds the same optimal loss as brute force over every split, for every k.

#[path = "common/cka_ref.rs"]
mod cka_ref;
#[path = "common/seg_ref.rs"]
mod seg_ref;

use cka_ref::{engine, nan_matrix, reference, Mat};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use seg_ref::{brute_force, diameter};
use sglp_engine::io::DType;
use sglp_engine::segmentation::{fisher_segments, loss_curve};
use sglp_engine::similarity::{CkaSpec, Estimator, Kernel, Route};

/// One random problem: `n` rows, one width per layer, the estimator settings, and a seed for the data.
#[derive(Clone, Debug)]
struct Case {
    n: usize,
    widths: Vec<usize>,
    spec: CkaSpec,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        4usize..=20,
        prop::collection::vec(1usize..=6, 1..=3),
        prop::bool::ANY,
        prop::bool::ANY,
        0usize..3,
        any::<u64>(),
        0.0f64..1.0,
    )
        .prop_map(|(n, widths, biased, rbf, route, seed, bfrac)| {
            let estimator = if biased {
                Estimator::Biased
            } else {
                Estimator::Unbiased
            };
            let kernel = if rbf {
                Kernel::Rbf { threshold: 1.0 }
            } else {
                Kernel::Linear
            };
            // The feature route is linear-only.
            let route = match (route, rbf) {
                (_, true) | (0, _) => Route::Auto,
                (1, _) => Route::Gram,
                _ => Route::Feature,
            };
            // b from 4 (the smallest) to n.
            let batch_size = 4 + ((n - 4) as f64 * bfrac) as usize;
            Case {
                n,
                widths,
                spec: CkaSpec {
                    estimator,
                    kernel,
                    batch_size,
                    route,
                },
                seed,
            }
        })
}

/// Activations: a shared latent through per-layer maps plus noise, each feature with its own mean, so the
/// layers are related but not identical and nothing is centred already.
fn data(c: &Case) -> Vec<Mat> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let g = Normal::new(0.0, 1.0).unwrap();
    let z: Mat = (0..c.n)
        .map(|_| (0..3).map(|_| g.sample(&mut rng)).collect())
        .collect();
    c.widths
        .iter()
        .map(|&d| {
            let w: Mat = (0..3)
                .map(|_| (0..d).map(|_| g.sample(&mut rng)).collect())
                .collect();
            let mean: Vec<f64> = (0..d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let noise = rng.random_range(0.1..1.5);
            cka_ref::matmul(&z, &w)
                .into_iter()
                .map(|row| {
                    row.iter()
                        .zip(&mean)
                        .map(|(v, m)| v + m + noise * g.sample(&mut rng))
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn run(layers: &[Mat], spec: CkaSpec, chunks: &[usize]) -> (Mat, Mat) {
    let r = engine(layers, spec, chunks, DType::F64);
    (nan_matrix(&r.hsic), nan_matrix(&r.cka))
}

/// Two CKA matrices agree within `tol` (NaN where the other is NaN).
fn close(a: &Mat, b: &Mat, tol: f64) -> Result<(), TestCaseError> {
    for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
        for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
            let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol;
            prop_assert!(ok, "[{i}][{j}]: {x} vs {y} (tol {tol:e})");
        }
    }
    Ok(())
}

/// A change of one layer's activations.
type Transform<'a> = Box<dyn Fn(&Mat) -> Mat + 'a>;

/// A random orthogonal d×d matrix: a product of d Householder reflections of random vectors.
fn orthogonal(rng: &mut StdRng, d: usize) -> Mat {
    let g = Normal::new(0.0, 1.0).unwrap();
    let mut q: Mat = (0..d)
        .map(|i| (0..d).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _ in 0..d {
        let v: Vec<f64> = (0..d).map(|_| g.sample(rng)).collect();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        // Q ← Q (I − 2vvᵀ/vᵀv)
        q = q
            .iter()
            .map(|row| {
                let qv: f64 = row.iter().zip(&v).map(|(a, b)| a * b).sum();
                row.iter()
                    .zip(&v)
                    .map(|(a, b)| a - 2.0 * qv * b / vv)
                    .collect()
            })
            .collect();
    }
    q
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_f64_reference(c in case()) {
        let layers = data(&c);
        let (h, k) = run(&layers, c.spec, &[c.n]);
        let (rh, rk) = reference(&layers, c.spec.estimator, c.spec.kernel, c.spec.batch_size);
        let scale = rh.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        for i in 0..h.len() {
            for j in 0..h.len() {
                prop_assert!((h[i][j] - rh[i][j]).abs() <= 1e-9 * scale,
                    "HSIC[{i}][{j}] = {} vs {} (scale {scale:e})", h[i][j], rh[i][j]);
                // CKA where the denominator is clearly positive (the unbiased diagonal can be ~0 or
                // negative on tiny batches; then both are NaN or both are noise).
                let den = rh[i][i].min(rh[j][j]);
                if den > 1e-6 * scale {
                    prop_assert!((k[i][j] - rk[i][j]).abs() <= 1e-6,
                        "CKA[{i}][{j}] = {} vs {}", k[i][j], rk[i][j]);
                } else if den <= 0.0 {
                    prop_assert!(k[i][j].is_nan(), "CKA[{i}][{j}] = {} with HSIC diag {den}", k[i][j]);
                }
            }
        }
    }

    #[test]
    fn cka_is_symmetric_with_a_unit_diagonal(c in case()) {
        let (_, k) = run(&data(&c), c.spec, &[c.n]);
        for i in 0..k.len() {
            prop_assert!(k[i][i].is_nan() || (k[i][i] - 1.0).abs() < 1e-12, "diag {}", k[i][i]);
            for j in 0..i {
                prop_assert!(
                    (k[i][j].is_nan() && k[j][i].is_nan()) || k[i][j] == k[j][i],
                    "[{i}][{j}] = {} but [{j}][{i}] = {}", k[i][j], k[j][i]
                );
            }
        }
    }

    #[test]
    fn cka_is_invariant_to_rotation_scaling_and_mean_shift(
        c in case(),
        layer in 0usize..3,
        log_scale in -2.0f64..2.0,
    ) {
        let layers = data(&c);
        let (_, base) = run(&layers, c.spec, &[c.n]);
        let l = layer % layers.len();
        let mut rng = StdRng::seed_from_u64(c.seed ^ 0x5eed);
        let q = orthogonal(&mut rng, layers[l][0].len());
        let scale = 10f64.powf(log_scale);
        let shift: Vec<f64> = (0..layers[l][0].len()).map(|_| rng.random_range(-50.0..50.0)).collect();
        let transforms: [(&str, Transform); 3] = [
            ("rotation", Box::new(|x: &Mat| cka_ref::matmul(x, &q))),
            ("scaling", Box::new(|x: &Mat| {
                x.iter().map(|r| r.iter().map(|v| v * scale).collect()).collect()
            })),
            ("mean shift", Box::new(|x: &Mat| {
                x.iter().map(|r| r.iter().zip(&shift).map(|(v, s)| v + s).collect()).collect()
            })),
        ];
        // Only entries the reference sees as well-conditioned: an unbiased diagonal at rounding level
        // makes the ratio noise whatever the input.
        let (rh, _) = reference(&layers, c.spec.estimator, c.spec.kernel, c.spec.batch_size);
        let sc = rh.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        for (what, t) in &transforms {
            let mut moved = layers.clone();
            moved[l] = t(&layers[l]);
            let (_, got) = run(&moved, c.spec, &[c.n]);
            for i in 0..base.len() {
                for j in 0..base.len() {
                    if rh[i][i].min(rh[j][j]) > 1e-6 * sc {
                        prop_assert!((got[i][j] - base[i][j]).abs() <= 1e-8,
                            "{what} of layer {l}: CKA[{i}][{j}] {} → {}", base[i][j], got[i][j]);
                    }
                }
            }
        }
    }

    #[test]
    fn the_result_does_not_depend_on_how_rows_are_chunked(
        c in case(),
        chunks in prop::collection::vec(1usize..=9, 1..=5),
    ) {
        let layers = data(&c);
        let (h1, k1) = run(&layers, c.spec, &[c.n]);
        let (h2, k2) = run(&layers, c.spec, &chunks);
        let scale = h1.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        for i in 0..h1.len() {
            for j in 0..h1.len() {
                prop_assert!((h1[i][j] - h2[i][j]).abs() <= 1e-12 * scale,
                    "HSIC[{i}][{j}]: {} in one chunk, {} in chunks {chunks:?}", h1[i][j], h2[i][j]);
            }
        }
        close(&k1, &k2, 1e-10)?;
    }
}

/// The smallest shapes every estimator takes, by name rather than by chance: one layer, one feature, a
/// batch of exactly 4 (the unbiased minimum), 4 samples in all, and a short last batch.
#[test]
fn the_smallest_shapes_match_the_reference() {
    for seed in 0..8u64 {
        let seed = seed ^ rand::random::<u64>();
        for (n, widths, b) in [
            (4, vec![1], 4),
            (4, vec![1, 1], 4),
            (5, vec![1, 3], 4),
            (9, vec![2, 1, 1], 4),
            (4, vec![6], 4),
        ] {
            for est in [Estimator::Biased, Estimator::Unbiased] {
                for (kernel, route) in [
                    (Kernel::Linear, Route::Gram),
                    (Kernel::Linear, Route::Feature),
                    (Kernel::Rbf { threshold: 0.5 }, Route::Gram),
                ] {
                    let spec = CkaSpec {
                        estimator: est,
                        kernel,
                        batch_size: b,
                        route,
                    };
                    let c = Case {
                        n,
                        widths: widths.clone(),
                        spec,
                        seed,
                    };
                    let layers = data(&c);
                    let (h, _) = run(&layers, spec, &[1, 2]);
                    let (rh, _) = reference(&layers, est, kernel, b);
                    let scale = rh.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
                    for (x, y) in h.iter().flatten().zip(rh.iter().flatten()) {
                        assert!(
                            (x - y).abs() <= 1e-9 * scale,
                            "{c:?}: HSIC {x} vs reference {y}"
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn fisher_dp_equals_brute_force(
        rows in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 2), 1..=9),
        p in 1usize..=2,
        min_len in 1usize..=3,
    ) {
        let x: Vec<Vec<f64>> = rows.iter().map(|r| r[..p].to_vec()).collect();
        let l = x.len();
        prop_assume!(min_len <= l);
        let k_max = l / min_len;
        let curve = loss_curve(&x, k_max, min_len).unwrap();
        prop_assert_eq!(curve.len(), k_max);
        for k in 1..=k_max {
            // k ≤ L / min_len: a cut always exists.
            let want = brute_force(&x, k, min_len).unwrap().0;
            let tol = 1e-9 * (1.0 + want.abs());
            let seg = fisher_segments(&x, k, min_len).unwrap();
            prop_assert!((seg.loss - want).abs() <= tol, "k = {k}: DP {} vs brute force {want}", seg.loss);
            prop_assert!((curve[k - 1] - want).abs() <= tol, "curve[{k}] {} vs {want}", curve[k - 1]);
            // The segments themselves: contiguous, covering, long enough, and of the optimal cost.
            prop_assert_eq!(seg.segments.len(), k);
            prop_assert_eq!(seg.segments[0].0, 0);
            prop_assert_eq!(seg.segments[k - 1].1, l - 1);
            for w in seg.segments.windows(2) {
                prop_assert_eq!(w[0].1 + 1, w[1].0);
            }
            prop_assert!(seg.segments.iter().all(|&(a, b)| b + 1 - a >= min_len));
            let cost: f64 = seg.segments.iter().map(|&(a, b)| diameter(&x, a, b)).sum();
            prop_assert!((cost - want).abs() <= tol, "segments {:?} cost {cost} vs {want}", seg.segments);
        }
    }
}
