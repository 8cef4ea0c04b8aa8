//! CPU similarity stage: one batch of L = 32 layers through the CKA accumulator (unbiased, linear, Gram
//! route), for b ∈ {256, 1024} samples and d ∈ {768, 4096} features per layer.
//!
//! FLOPs per batch: Grams L·b²·d (lower triangle only), U-centring O(L·b²), pairs L²·b²(+b)/2·2.
//! Run: `cargo bench --bench cka_cpu` (criterion prints time per batch and GFLOP/s via throughput).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use sglp_engine::io::{Batch, DType, LayerMeta};
use sglp_engine::similarity::cpu::CpuBackend;
use sglp_engine::similarity::{CkaAccumulator, CkaSpec, Estimator, Kernel, Route};

const LAYERS: usize = 32;

fn bench_accumulator(c: &mut Criterion) {
    let mut group = c.benchmark_group("cka_cpu");
    group.sample_size(10);
    let mut rng = StdRng::seed_from_u64(7);
    let g = Normal::new(0.0f32, 1.0).unwrap();
    for &d in &[768usize, 4096] {
        for &b in &[256usize, 1024] {
            let data: Vec<Vec<f32>> = (0..LAYERS)
                .map(|_| (0..b * d).map(|_| g.sample(&mut rng)).collect())
                .collect();
            let parts: Vec<(usize, &[f32])> = data.iter().map(|v| (d, v.as_slice())).collect();
            let batch = Batch::from_f32(b, &parts);
            let metas: Vec<LayerMeta> = (0..LAYERS)
                .map(|i| LayerMeta {
                    name: format!("l{i}"),
                    cols: d,
                    dtype: DType::F32,
                    shape: vec![b, d],
                })
                .collect();
            let spec = CkaSpec {
                estimator: Estimator::Unbiased,
                kernel: Kernel::Linear,
                batch_size: b,
                route: Route::Gram,
            };
            // Useful FLOPs: lower-triangular Grams plus the symmetric pair product.
            let flops = (LAYERS * b * b * d) as u64 + (LAYERS * LAYERS * b * (b + 1)) as u64;
            group.throughput(Throughput::Elements(flops));
            let mut cpu = CpuBackend::new(0);
            group.bench_with_input(
                BenchmarkId::new(format!("L{LAYERS}_d{d}"), b),
                &batch,
                |bench, batch| {
                    bench.iter(|| {
                        let mut acc = CkaAccumulator::new(&metas, spec, None).unwrap();
                        acc.push(&batch.as_ref(), &mut cpu).unwrap();
                        acc.finish(&mut cpu).unwrap()
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_accumulator);
criterion_main!(benches);
