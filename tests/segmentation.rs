//! Fisher's segmentation against brute force, the automatic k rule, and the REFERENCES example where
//! the published greedy backtracking goes wrong.

#[path = "common/seg_ref.rs"]
mod seg_ref;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use seg_ref::{brute_force, diameter};
use sglp_engine::segmentation::{
    choose_k, elbow_k, fisher_segments, loss_curve, segment_cka, Features, KChoice,
};

#[test]
fn the_dp_is_exact_against_brute_force_up_to_12_layers() {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    for trial in 0..300 {
        let l = rng.random_range(1..=12);
        let p = if trial % 2 == 0 {
            1
        } else {
            rng.random_range(2..5)
        };
        // Piecewise-constant means plus noise: realistic, and continuous values make ties improbable.
        let mut level = 0.0;
        let x: Vec<Vec<f64>> = (0..l)
            .map(|_| {
                if rng.random_bool(0.3) {
                    level += rng.random_range(-5.0..5.0);
                }
                (0..p)
                    .map(|_| level + rng.random_range(-1.0..1.0))
                    .collect()
            })
            .collect();
        let min_len = rng.random_range(1..=3);
        for k in 1..=l {
            let want = brute_force(&x, k, min_len);
            let got = fisher_segments(&x, k, min_len);
            match want {
                None => assert!(
                    got.is_err(),
                    "L={l} k={k} min_len={min_len}: expected an error"
                ),
                Some((loss, segs)) => {
                    let got = got.unwrap();
                    assert!(
                        (got.loss - loss).abs() <= 1e-9 * loss.max(1.0),
                        "L={l} k={k}: {} vs {loss}",
                        got.loss
                    );
                    assert_eq!(got.segments, segs, "L={l} k={k} min_len={min_len}");
                    let recomputed: f64 =
                        got.segments.iter().map(|&(a, b)| diameter(&x, a, b)).sum();
                    assert!((recomputed - got.loss).abs() <= 1e-9 * loss.max(1.0));
                }
            }
        }
    }
}

#[test]
fn greedy_backtracking_counterexample_is_solved_exactly() {
    let x: Vec<Vec<f64>> = [0., 0., 10., 10., 10., 20.]
        .iter()
        .map(|&v| vec![v])
        .collect();
    let s = fisher_segments(&x, 2, 1).unwrap();
    assert_eq!(s.segments, vec![(0, 1), (2, 5)]);
    assert!((s.loss - 75.0).abs() < 1e-12);
}

#[test]
fn auto_k_takes_the_largest_k_with_a_relative_gain_above_the_threshold() {
    // r_1 = 0.5, r_2 = 0.5, r_3 = 0.01, r_4 = 0.2 → k* = 5 (the largest k+1 with r_k > 0.05).
    assert_eq!(choose_k(&[100.0, 50.0, 25.0, 24.75, 19.8], 0.05), 5);
    assert_eq!(choose_k(&[100.0, 99.0, 98.5], 0.05), 1);
    assert_eq!(choose_k(&[10.0, 0.0, 0.0], 0.05), 2);
    // Rounding residue after a perfect fit is not a gain.
    assert_eq!(choose_k(&[10.0, 3.0, 4e-15, 1e-15], 0.05), 3);
    // Three constant blocks: L(3) = 0, so nothing is gained past k = 3. (With noise inside the blocks the
    // rule as published keeps splitting the noise: each further split still gains > 5% of a tiny loss.)
    let x: Vec<Vec<f64>> = [1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 9.0, 9.0]
        .iter()
        .map(|&v| vec![v])
        .collect();
    let curve = loss_curve(&x, 8, 1).unwrap();
    let k = choose_k(&curve, 0.05);
    assert_eq!(k, 3, "from {curve:?}");
    assert!(
        curve.windows(2).all(|w| w[1] <= w[0] + 1e-12),
        "loss curve must not increase: {curve:?}"
    );
}

#[test]
fn segment_cka_uses_column_sums_and_rejects_bad_matrices() {
    // A block-diagonal CKA matrix: layers 0-2 very alike, 3-5 less so (so column sums differ too).
    let l = 6;
    let cka: Vec<Vec<f64>> = (0..l)
        .map(|i| {
            (0..l)
                .map(|j| match (i == j, i < 3, j < 3) {
                    (true, _, _) => 1.0,
                    (_, true, true) => 0.9,
                    (_, false, false) => 0.5 + 0.01 * (i * j) as f64,
                    _ => 0.2,
                })
                .collect()
        })
        .collect();
    let names: Vec<String> = (0..l).map(|i| format!("l{i}")).collect();
    for f in [Features::ColSum, Features::Rows] {
        let r = segment_cka(&names, &cka, f, KChoice::Fixed(2), 1).unwrap();
        assert_eq!(r.segments, vec![[0, 2], [3, 5]], "{f:?}");
        assert_eq!(r.segment_layers[1], vec!["l3", "l4", "l5"]);
    }
    let mut bad = cka.clone();
    bad[2][4] = f64::NAN;
    assert!(
        segment_cka(&names, &bad, Features::ColSum, KChoice::Fixed(2), 1)
            .unwrap_err()
            .to_string()
            .contains("not finite")
    );
    assert!(segment_cka(&names, &cka[..5], Features::ColSum, KChoice::Fixed(2), 1).is_err());
    assert!(segment_cka(&names, &cka, Features::ColSum, KChoice::Fixed(7), 1).is_err());
}

#[test]
fn elbow_rule_finds_the_knee_and_ignores_a_noisy_tail() {
    // A knee at k = 3, then small steady gains that the 5% rule keeps taking.
    let curve = [100.0, 40.0, 10.0, 9.0, 8.2, 7.5, 6.9, 6.4];
    assert_eq!(elbow_k(&curve), 3);
    assert_eq!(choose_k(&curve, 0.05), 8);
    // A straight line has no knee; too short a curve neither.
    assert_eq!(elbow_k(&[4.0, 3.0, 2.0, 1.0]), 1);
    assert_eq!(elbow_k(&[4.0, 1.0]), 1);
    assert_eq!(elbow_k(&[0.0, 0.0, 0.0]), 1);
    // Fresh random convex curves: the choice is a k whose point lies furthest under the chord.
    let mut rng = StdRng::seed_from_u64(rand::random());
    for _ in 0..50 {
        let n = rng.random_range(3..10);
        let mut c = vec![rng.random_range(1.0..100.0)];
        for _ in 1..n {
            let last = *c.last().unwrap();
            c.push(last * rng.random_range(0.1..0.99));
        }
        let k = elbow_k(&c);
        let d = |i: usize| {
            let x = i as f64 / (n - 1) as f64;
            1.0 - x - (c[i] - c[n - 1]) / (c[0] - c[n - 1])
        };
        for i in 0..n {
            assert!(
                d(k - 1) >= d(i) - 1e-9 || (k == 1 && d(i) <= 1e-9),
                "{c:?} → {k}"
            );
        }
    }
}
