//! Fisher segmentation of L = 200 layers: the loss curve for k = 1..8 and the optimal segments, with
//! one-number features (column sums, as SGLP) and whole CKA rows (200-dimensional features).
//! Cost: O(L²·p) diameters + O(k_max·L²) DP.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sglp_engine::segmentation::{segment_cka, Features, KChoice};

fn bench_segmentation(c: &mut Criterion) {
    let l = 200;
    let mut rng = StdRng::seed_from_u64(3);
    // A CKA-like matrix: similarity decays with layer distance, plus noise; symmetric, unit diagonal.
    let mut cka = vec![vec![1.0; l]; l];
    for i in 0..l {
        for j in 0..i {
            let v = (-((i - j) as f64) / 30.0).exp() * 0.9 + rng.random_range(0.0..0.05);
            cka[i][j] = v;
            cka[j][i] = v;
        }
    }
    let names: Vec<String> = (0..l).map(|i| format!("layer{i}")).collect();
    let mut group = c.benchmark_group("segmentation");
    for (label, f) in [("colsum", Features::ColSum), ("rows", Features::Rows)] {
        group.bench_function(format!("L200_kauto8_{label}"), |b| {
            b.iter(|| {
                segment_cka(
                    &names,
                    &cka,
                    f,
                    KChoice::Auto {
                        k_max: 8,
                        threshold: 0.05,
                    },
                    1,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_segmentation);
criterion_main!(benches);
