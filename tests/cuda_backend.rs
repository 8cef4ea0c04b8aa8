//! The CUDA backend against the CPU backend (the f64 reference) on fresh random inputs of awkward shapes.
//!
//! Without a usable GPU every GPU test prints why and passes, unless `SGLP_REQUIRE_GPU=1`, where a missing
//! GPU is a failure. The device-choice tests run everywhere.
//!
//! Tolerances, on CKA values (|CKA| ≤ 1, so absolute ≈ relative for the values that matter):
//! * f32 inputs: 1e-5 (f32 Grams and centred Grams, f64 row sums, f32 tiles of the pair products summed
//!   in f64);
//! * f16 / bf16 inputs: 1e-4 (products of 16-bit values are exact in f32; the tensor cores' f32
//!   accumulation order differs from the CPU's f64);
//! * RBF: 1e-4 (distances d² = K_ii + K_jj − 2K_ij and exp in f32; the median itself is exact).

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use sglp_engine::io::{Batch, DType, LayerBlock, LayerMeta};
use sglp_engine::similarity::cpu::CpuBackend;
use sglp_engine::similarity::cuda::{self, CudaBackend};
use sglp_engine::similarity::device::{open_backend, DeviceChoice};
use sglp_engine::similarity::{
    cka_from_hsic, Backend, CkaAccumulator, CkaResult, CkaSpec, Estimator, Kernel, Route,
};

fn gpu_or_skip() -> Option<CudaBackend> {
    match CudaBackend::open(0) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("SGLP_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SGLP_REQUIRE_GPU=1 but the CUDA backend does not open: {e}");
            }
            eprintln!("skipping: no usable GPU ({e})");
            None
        }
    }
}

/// The Gram kernels a test runs: `all`, less the wgmma ones under `SGLP_SKIP_WGMMA=1`. On a GPU a fault
/// in a kernel can leave the CUDA context unusable for the rest of the process, so the first GPU run
/// (scripts/gpu_checks.sh) tests the never-run Hopper candidate in a process of its own.
fn gram_kernels(
    all: &[sglp_engine::similarity::cuda::GramKernel],
) -> Vec<sglp_engine::similarity::cuda::GramKernel> {
    let skip = std::env::var("SGLP_SKIP_WGMMA").as_deref() == Ok("1");
    all.iter()
        .copied()
        .filter(|&g| !(skip && g.is_wgmma()))
        .collect()
}

/// One layer of each stored dtype, of widths that are no tile multiples.
const EVERY_DTYPE: [(usize, DType); 4] = [
    (96, DType::BF16),
    (50, DType::F32),
    (33, DType::F16),
    (8, DType::F64),
];

/// `a` and `b` hold the same f64 bits (what determinism promises), with `what` in the failure.
fn assert_same_bits(a: &[f64], b: &[f64], what: impl std::fmt::Display) {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a), bits(b), "{what}");
}

/// A random layer of `rows × cols` stored as `dtype`: normal values with a per-column offset (so that
/// centring matters) and a per-layer scale.
fn random_layer(rng: &mut StdRng, rows: usize, cols: usize, dtype: DType) -> LayerBlock {
    let scale: f32 = rng.random_range(0.5..3.0);
    let offsets: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| offsets[i % cols] + scale * rng.sample::<f32, _>(StandardNormal))
        .collect();
    let data: Vec<u8> = match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => vals
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect(),
        DType::F16 => vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    };
    LayerBlock {
        dtype,
        cols,
        data: data.into(),
    }
}

/// Layers that are noisy mixtures of one shared signal, so CKA values spread over (0, 1).
fn random_batch(seed: u64, rows: usize, layers: &[(usize, DType)]) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    Batch {
        rows,
        layers: layers
            .iter()
            .map(|&(cols, dt)| random_layer(&mut rng, rows, cols, dt))
            .collect(),
    }
}

/// The CKA matrix of `batch` through a `CkaAccumulator` on the GPU and on the CPU, equal within `tol`:
/// one layer `l{i}` per layer of the batch (its width and dtype), every row pushed at once.
fn assert_accumulator_matches_cpu(
    gpu: &mut CudaBackend,
    batch: &Batch,
    spec: CkaSpec,
    tol: f64,
    what: &str,
) {
    let want = accumulator_cka(batch, spec, &mut CpuBackend::new(2));
    let got = accumulator_cka(batch, spec, gpu);
    for (rw, rg) in want.iter().zip(&got) {
        for (w, g) in rw.iter().zip(rg) {
            assert!((w - g).abs() <= tol, "{what}: {w} vs {g}");
        }
    }
}

fn accumulator_cka(batch: &Batch, spec: CkaSpec, backend: &mut dyn Backend) -> Vec<Vec<f64>> {
    accumulate(batch, spec, backend).cka_matrix()
}

/// `batch` through a `CkaAccumulator` (layers `l{i}`, every row pushed at once): the whole result.
fn accumulate(batch: &Batch, spec: CkaSpec, backend: &mut dyn Backend) -> CkaResult {
    let metas: Vec<_> = batch
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| LayerMeta {
            name: format!("l{i}"),
            cols: l.cols,
            dtype: l.dtype,
            shape: vec![0, l.cols],
        })
        .collect();
    let mut acc = CkaAccumulator::new(&metas, spec, Some(batch.rows)).unwrap();
    acc.push(&batch.as_ref(), backend).unwrap();
    acc.finish(backend).unwrap()
}

/// Fewer than 32 samples per batch with 16-bit layers on the GPU: the result says that their CKA is
/// f16-bound (~1e-3, see sixteen_bit_and_mixed_dtypes); 32 or more, or f32 layers only: no such warning.
#[test]
fn small_batches_of_16_bit_layers_on_the_gpu_warn_of_f16_precision() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let warns = |layers: &[(usize, DType)], batch_size: usize, gpu: &mut CudaBackend| -> bool {
        let batch = random_batch(21, 64, layers);
        let spec = CkaSpec {
            batch_size,
            route: Route::Gram,
            ..CkaSpec::default()
        };
        accumulate(&batch, spec, gpu)
            .warnings
            .iter()
            .any(|w| w.contains("f16 tensor cores"))
    };
    let mixed = [(40, DType::BF16), (24, DType::F32)];
    assert!(warns(&mixed, 8, &mut gpu));
    assert!(!warns(&mixed, 32, &mut gpu));
    assert!(!warns(&[(40, DType::F32), (24, DType::F64)], 8, &mut gpu));
}

/// Largest |CKA_gpu − CKA_cpu| over all pairs (NaN-aware: both NaN counts as equal).
fn max_cka_diff(gpu: &[f64], cpu: &[f64], l: usize) -> f64 {
    let (a, b) = (cka_from_hsic(gpu, l), cka_from_hsic(cpu, l));
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                (x - y).abs()
            }
        })
        .fold(
            0.0,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
}

/// Largest HSIC difference relative to the geometric mean of the two diagonal entries.
fn max_hsic_rel_diff(gpu: &[f64], cpu: &[f64], l: usize) -> f64 {
    let mut worst: f64 = 0.0;
    for i in 0..l {
        for j in 0..l {
            let scale = (cpu[i * l + i] * cpu[j * l + j]).abs().sqrt().max(1e-300);
            let d = (gpu[i * l + j] - cpu[i * l + j]).abs() / scale;
            worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    worst
}

fn check(
    gpu: &mut CudaBackend,
    batch: &Batch,
    estimator: Estimator,
    kernel: Kernel,
    tol: f64,
    what: &str,
) {
    let l = batch.layers.len();
    let mut cpu = CpuBackend::new(2);
    let want = cpu.batch_hsic(&batch.as_ref(), estimator, kernel).unwrap();
    let got = gpu
        .batch_hsic(&batch.as_ref(), estimator, kernel)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.len(), l * l, "{what}");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite HSIC");
    for i in 0..l {
        for j in 0..l {
            assert_eq!(got[i * l + j], got[j * l + i], "{what}: not symmetric");
        }
    }
    let dc = max_cka_diff(&got, &want, l);
    let dh = max_hsic_rel_diff(&got, &want, l);
    eprintln!("{what}: max |ΔCKA| = {dc:.2e}, max relative ΔHSIC = {dh:.2e}");
    assert!(dc <= tol, "{what}: CKA differs by {dc:.3e} > {tol:.0e}");
    assert!(dh <= 10.0 * tol, "{what}: HSIC differs by {dh:.3e}");
}

#[test]
fn f32_awkward_shapes_both_estimators() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let shapes: &[(usize, &[usize])] = &[
        (37, &[1, 5, 130, 67]),
        (4, &[1, 3]),
        (5, &[2]),
        (129, &[16, 257]),
        (300, &[100, 1, 513]),
    ];
    for (seed, &(b, widths)) in shapes.iter().enumerate() {
        let layers: Vec<_> = widths.iter().map(|&d| (d, DType::F32)).collect();
        let batch = random_batch(seed as u64 + 1, b, &layers);
        for est in [Estimator::Unbiased, Estimator::Biased] {
            check(
                &mut gpu,
                &batch,
                est,
                Kernel::Linear,
                1e-5,
                &format!("f32 b={b} d={widths:?} {est:?}"),
            );
        }
    }
}

#[test]
fn many_layers_in_one_batch() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(300);
    let layers: Vec<_> = (0..300)
        .map(|_| (rng.random_range(1..40), DType::F32))
        .collect();
    let batch = random_batch(301, 45, &layers);
    check(
        &mut gpu,
        &batch,
        Estimator::Unbiased,
        Kernel::Linear,
        1e-5,
        "300 layers b=45",
    );
}

#[test]
fn sixteen_bit_and_mixed_dtypes() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    for (seed, dt) in [(11u64, DType::BF16), (12, DType::F16)] {
        // Widths that take the 16-byte vector path (multiples of 8) and the scalar path.
        let layers = [(8, dt), (33, dt), (256, dt), (1000, dt), (1, dt)];
        for b in [150, 4, 131] {
            let batch = random_batch(seed * 100 + b as u64, b, &layers);
            // 16-bit layers reach the tensor cores as f16 of the centred values (centre_columns.cu): 11
            // significant bits, ~2.4e-4 relative per value. Over many samples those roundings average
            // out (≤ 1e-5 at b ≥ 128); over 4 they do not: the CKA moves by ~1e-3 (numpy, 30 draws of
            // these widths: 6e-4 at b = 4, 1.5e-4 at 16, 5e-5 at 32; the emulated GPU: 2.6e-3 at b = 4).
            let tol = if b < 32 { 5e-3 } else { 1e-4 };
            check(
                &mut gpu,
                &batch,
                Estimator::Unbiased,
                Kernel::Linear,
                tol,
                &format!("{dt:?} b={b}"),
            );
        }
    }
    let mixed = [
        (64, DType::F32),
        (40, DType::BF16),
        (24, DType::F16),
        (17, DType::F64),
        (3, DType::BF16),
    ];
    let batch = random_batch(13, 77, &mixed);
    for est in [Estimator::Unbiased, Estimator::Biased] {
        check(
            &mut gpu,
            &batch,
            est,
            Kernel::Linear,
            1e-4,
            &format!("mixed dtypes {est:?}"),
        );
    }
}

#[test]
fn rbf_both_estimators() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    for (b, widths) in [
        (61usize, vec![7usize, 50, 1]),
        (4, vec![3, 2]),
        (200, vec![129]),
    ] {
        let layers: Vec<_> = widths.iter().map(|&d| (d, DType::F32)).collect();
        let batch = random_batch(b as u64 + 7, b, &layers);
        for est in [Estimator::Unbiased, Estimator::Biased] {
            for t in [0.5, 1.0] {
                check(
                    &mut gpu,
                    &batch,
                    est,
                    Kernel::Rbf { threshold: t },
                    1e-4,
                    &format!("rbf t={t} b={b} {est:?}"),
                );
            }
        }
    }
}

/// The largest budget (in 64 KiB steps, from 64 MiB down) whose memory plan splits the layers into
/// blocks of 4 or more (fewer than all of them).
fn blocking_cap(n: usize, layers: &[(usize, DType)]) -> usize {
    let row_bytes: Vec<usize> = layers.iter().map(|&(d, t)| d * t.size()).collect();
    let mut cap: usize = 64 << 20;
    while cap > 0 {
        match cuda::plan::plan(n, &row_bytes, cap) {
            Ok(p) if p.layer_block < layers.len() && p.layer_block >= 4 => return cap,
            _ => cap -= 64 << 10,
        }
    }
    panic!("no budget gives layer blocks")
}

#[test]
fn a_budget_that_forces_layer_blocks_exists() {
    // Runs without a GPU: the cap the next test uses is found from the plan alone.
    let layers: Vec<_> = (0..23).map(|i| (10 + 7 * i, DType::F32)).collect();
    let cap = blocking_cap(150, &layers);
    let row_bytes: Vec<usize> = layers.iter().map(|&(d, _)| d * 4).collect();
    let p = cuda::plan::plan(150, &row_bytes, cap).unwrap();
    assert!(p.layer_block < 23 && p.device_bytes <= cap, "{p:?}");
    assert!(p.blocks(23) >= 2);
    // The "impossible" cap of the next test: too small for b = 150, enough for a smaller batch.
    let e = cuda::plan::plan(150, &row_bytes, TINY_CAP)
        .unwrap_err()
        .to_string();
    let m = cuda::plan::largest_batch_that_fits(&row_bytes, TINY_CAP).unwrap();
    assert!(
        (4..150).contains(&m) && e.contains(&format!("--cka-batch {m}")),
        "{e}"
    );
}

const TINY_CAP: usize = 256 << 10;

#[test]
fn layer_blocks_when_memory_is_short_give_the_same_result() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers: Vec<_> = (0..23).map(|i| (10 + 7 * i, DType::F32)).collect();
    let batch = random_batch(23, 150, &layers);
    // Room for a handful of packed Grams only: forces blocks of layers (and upload chunks).
    let cap = blocking_cap(150, &layers);
    gpu.set_memory_cap(Some(cap)).unwrap();
    check(
        &mut gpu,
        &batch,
        Estimator::Unbiased,
        Kernel::Linear,
        1e-5,
        "layer blocks",
    );
    let plan = gpu.memory_plan().expect("planned").clone();
    assert!(plan.layer_block < 23, "expected blocks, got {plan:?}");
    // And an impossible cap names a batch size that fits.
    gpu.set_memory_cap(Some(TINY_CAP)).unwrap();
    let e = gpu
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cka-batch"), "{e}");
}

#[test]
fn repeated_batches_reuse_the_workspace_and_match() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(96, DType::BF16), (50, DType::F32)];
    for seed in 0..3 {
        let batch = random_batch(500 + seed, 64, &layers);
        check(
            &mut gpu,
            &batch,
            Estimator::Unbiased,
            Kernel::Linear,
            1e-4,
            &format!("repeat {seed}"),
        );
    }
}

#[test]
fn whole_pipeline_through_the_accumulator_matches_the_cpu() {
    use sglp_engine::similarity::Route;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(20usize, DType::F32), (9, DType::BF16), (31, DType::F32)];
    let data = random_batch(77, 250, &layers);
    let spec = CkaSpec {
        batch_size: 64,
        route: Route::Gram,
        ..CkaSpec::default()
    };
    assert_accumulator_matches_cpu(&mut gpu, &data, spec, 1e-4, "Gram route");
}

/// LLM-like activations: per-feature means ~100, a few "massive" features ~5000, unit-scale variation, in
/// f32 and bf16. Without the per-batch column centring before the Gram (centre_columns.cu) an f32 Gram
/// of such data is off by 0.3–0.5 in CKA (src/similarity/cuda/emulate_kernels.py); with it, within 1e-6
/// of the CPU's f64 reference (HSIC within 1e-5 relative), both estimators, linear and RBF. The bound
/// holds because a bf16 layer is centred by its mean rounded to bf16, which makes its f16 rewrite exact
/// (on the emulator over 32 draws: |ΔCKA| ≤ 2.6e-8, ΔHSIC ≤ 3.8e-7); centred by the exact mean, the
/// same draws gave up to 7.6e-6 and 1.0e-4.
#[test]
fn large_mean_llm_like_activations_match_the_f64_reference() {
    let Some(mut gpu) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let (n, d) = (200, 256);
    let means: Vec<f32> = (0..d)
        .map(|c| {
            if c % 61 == 7 {
                5000.0
            } else {
                100.0 + rng.random_range(-20.0..20.0)
            }
        })
        .collect();
    let shared: Vec<f32> = (0..n * d)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    let mut layer = |mix: f32, dtype: DType| {
        let vals: Vec<f32> = (0..n * d)
            .map(|i| {
                means[i % d] + mix * shared[i] + (1.0 - mix) * rng.sample::<f32, _>(StandardNormal)
            })
            .collect();
        let data: Vec<u8> = match dtype {
            DType::BF16 => vals
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        LayerBlock {
            dtype,
            cols: d,
            data: data.into(),
        }
    };
    let batch = Batch {
        rows: n,
        layers: vec![
            layer(0.9, DType::F32),
            layer(0.6, DType::F32),
            layer(0.9, DType::BF16),
            layer(0.5, DType::BF16),
        ],
    };
    for estimator in [Estimator::Biased, Estimator::Unbiased] {
        for kernel in [Kernel::Linear, Kernel::Rbf { threshold: 1.0 }] {
            check(
                &mut gpu,
                &batch,
                estimator,
                kernel,
                1e-6,
                &format!("large means, {estimator:?}, {kernel:?}"),
            );
        }
    }
}

/// `submit` keeps the sum on the device: the same total as adding `batch_hsic`'s matrices on the host
/// (batches of two sizes, so the workspace is re-planned mid-sum), and the same bits on a second run.
#[test]
fn submitted_batches_sum_on_the_device_and_repeat_bit_for_bit() {
    use sglp_engine::similarity::HsicSum;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(96, DType::BF16), (50, DType::F32), (33, DType::F16)];
    let seed: u64 = rand::rng().random();
    let batches: Vec<Batch> = (0..5)
        .map(|i| random_batch(seed + i, if i == 4 { 37 } else { 64 }, &layers))
        .collect();
    let l = layers.len();
    let mut want = vec![0.0; l * l];
    for b in &batches {
        let h = gpu
            .batch_hsic(&b.as_ref(), Estimator::Unbiased, Kernel::Linear)
            .unwrap();
        for (w, v) in want.iter_mut().zip(&h) {
            *w += v;
        }
    }
    let mut run = || {
        let mut sum = HsicSum::new(l);
        for b in &batches {
            gpu.submit(&mut sum, &b.as_ref(), Estimator::Unbiased, Kernel::Linear)
                .unwrap();
        }
        gpu.finish_sum(sum).unwrap()
    };
    let first = run();
    let second = run();
    for (i, (a, w)) in first.iter().zip(&want).enumerate() {
        assert!(
            (a - w).abs() <= 1e-9 * w.abs().max(1e-12),
            "entry {i}: device sum {a} vs host sum {w}"
        );
    }
    assert_same_bits(&first, &second, "two runs on the same input differ");
}

/// The feature route runs on the GPU (kernels/feature_cross.cu): ZᵀZ equal to the CPU's within f64
/// rounding (both f64; 1e-12 relative to the largest entry), over widths that are not tile multiples, and
/// the whole accumulator on the feature route (both estimators) within 1e-9 in CKA.
#[test]
fn feature_route_on_the_gpu_matches_the_cpu() {
    use sglp_engine::similarity::Route;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(5usize, DType::F32), (70, DType::BF16), (33, DType::F64)];
    let seed: u64 = rand::rng().random();
    let batch = random_batch(seed, 130, &layers);
    let d: usize = layers.iter().map(|l| l.0).sum();
    let (mut want, mut got) = (vec![0.0; d * d], vec![0.0; d * d]);
    CpuBackend::new(2)
        .accumulate_cross(&batch.as_ref(), &mut want)
        .unwrap();
    gpu.accumulate_cross(&batch.as_ref(), &mut got).unwrap();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs() / scale));
    assert!(worst <= 1e-12, "ZᵀZ differs by {worst:.2e} (relative)");
    for estimator in [Estimator::Biased, Estimator::Unbiased] {
        let spec = CkaSpec {
            estimator,
            batch_size: 40,
            route: Route::Feature,
            ..CkaSpec::default()
        };
        let what = format!("feature route, {estimator:?}");
        assert_accumulator_matches_cpu(&mut gpu, &batch, spec, 1e-9, &what);
    }
}

/// The candidate tensor-core Gram kernels (`GramKernel::MmaPipelined`: cp.async pipeline, ldmatrix;
/// `GramKernel::Wgmma` / `WgmmaTma`: Hopper's warpgroup MMA from swizzled shared memory, 4 stages filled by
/// cp.async / by TMA) on 16-bit layers:
/// aligned widths (their fast paths, over one and several 64-feature steps) and unaligned ones (their
/// fallback), sizes that are not tile multiples, against the CPU as `sixteen_bit_and_mixed_dtypes`
/// checks the default kernel.
#[test]
fn candidate_gram_kernels_match_the_cpu() {
    use sglp_engine::similarity::cuda::GramKernel;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let seed: u64 = rand::rng().random();
    for gram in gram_kernels(&[
        GramKernel::MmaPipelined,
        GramKernel::Wgmma,
        GramKernel::WgmmaTma,
    ]) {
        gpu.set_gram_kernel(gram);
        for (i, rows) in [37usize, 128, 300].into_iter().enumerate() {
            let layers = [
                (64, DType::BF16),
                (200, DType::F16),
                (33, DType::BF16),
                (7, DType::F16),
                (40, DType::F32),
                (392, DType::BF16),
            ];
            let batch = random_batch(seed + i as u64, rows, &layers);
            for estimator in [Estimator::Biased, Estimator::Unbiased] {
                check(
                    &mut gpu,
                    &batch,
                    estimator,
                    Kernel::Linear,
                    1e-4,
                    &format!("{gram:?} Gram kernel, n = {rows}, {estimator:?}"),
                );
            }
        }
    }
    gpu.set_gram_kernel(GramKernel::Mma);
}

/// Split-K Gram launches (kernels/gram_linear.cu): fixed factors on every dtype, every tensor-core
/// kernel, batches of one tile and of several (mirrored tiles), layers narrower than a split (empty
/// splits write zero planes), linear and RBF; then the factor the backend picks by itself for a few wide
/// layers of a small batch (a launch of 2 tiles), which must split, match the CPU and repeat bit for bit.
#[test]
fn split_k_gram_launches_match_the_cpu_and_repeat_bit_for_bit() {
    use sglp_engine::similarity::cuda::GramKernel;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let seed: u64 = rand::rng().random();
    let layers = [
        (300, DType::BF16),
        (520, DType::F32),
        (33, DType::F16),
        (8, DType::F64),
        (64, DType::F16),
        (392, DType::BF16),
    ];
    for gram in gram_kernels(&GramKernel::ALL) {
        gpu.set_gram_kernel(gram);
        for (i, (rows, splits)) in [(37usize, 2usize), (150, 3), (37, 5)]
            .into_iter()
            .enumerate()
        {
            gpu.set_gram_splits(Some(splits));
            let batch = random_batch(seed + i as u64, rows, &layers);
            for (est, kernel) in [
                (Estimator::Unbiased, Kernel::Linear),
                (Estimator::Biased, Kernel::Rbf { threshold: 1.0 }),
            ] {
                check(
                    &mut gpu,
                    &batch,
                    est,
                    kernel,
                    1e-4,
                    &format!("{gram:?}, {splits} splits, n = {rows}, {est:?} {kernel:?}"),
                );
            }
        }
    }
    gpu.set_gram_kernel(GramKernel::Mma);
    gpu.set_gram_splits(None);

    // Chosen by the backend: 2 layers of one tile each, 4,096 and 2,048 features deep.
    let batch = random_batch(seed ^ 1, 40, &[(4096, DType::BF16), (2048, DType::F32)]);
    gpu.set_profiling(true);
    let first = gpu
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .unwrap();
    let names: Vec<&str> = gpu.last_kernel_times().iter().map(|k| k.kernel).collect();
    assert!(
        names.contains(&"gram_reduce_splits"),
        "no split-K: {names:?}"
    );
    gpu.set_profiling(false);
    let again = gpu
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .unwrap();
    assert_same_bits(&first, &again, "split-K Grams, two runs");
    check(
        &mut gpu,
        &batch,
        Estimator::Unbiased,
        Kernel::Linear,
        1e-4,
        "automatic split-K",
    );
}

/// Activations already on the GPU (`submit_device`): the same bits as the same batch from host memory
/// (the slots hold the same bytes either way and the kernels are deterministic), row slices included, and
/// the caller's device memory is left as it was (the kernels centre the slot copy, not the input).
#[test]
fn device_resident_batches_give_the_host_path_bits() {
    use sglp_engine::similarity::HsicSum;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = EVERY_DTYPE;
    let seed: u64 = rand::rng().random();
    let batch = random_batch(seed, 150, &layers);
    let copy = gpu.upload(&batch.as_ref()).unwrap();
    for kernel in [Kernel::Linear, Kernel::Rbf { threshold: 1.0 }] {
        let want = gpu
            .batch_hsic(&batch.as_ref(), Estimator::Unbiased, kernel)
            .unwrap();
        // SAFETY: `copy` holds the batch on this backend's device.
        let got =
            unsafe { gpu.batch_hsic_device(&copy.batch, Estimator::Unbiased, kernel) }.unwrap();
        assert_same_bits(
            &got,
            &want,
            format!("{kernel:?}: device input differs from host input"),
        );
    }
    let l = layers.len();
    let (mut host_sum, mut dev_sum) = (HsicSum::new(l), HsicSum::new(l));
    for (s, e) in [(0, 64), (64, 128), (128, 150)] {
        gpu.submit(
            &mut host_sum,
            &batch.as_ref().slice(s, e),
            Estimator::Unbiased,
            Kernel::Linear,
        )
        .unwrap();
        // SAFETY: as above; a row slice of it.
        unsafe {
            gpu.submit_device(
                &mut dev_sum,
                &copy.batch.slice(s, e),
                Estimator::Unbiased,
                Kernel::Linear,
            )
        }
        .unwrap();
    }
    let (a, b) = (
        gpu.finish_sum(host_sum).unwrap(),
        gpu.finish_sum(dev_sum).unwrap(),
    );
    assert_same_bits(&a, &b, "sliced device batches differ from the host slices");
    // The input was not centred in place: a second pass gives the same numbers again.
    let again =
        unsafe { gpu.batch_hsic_device(&copy.batch, Estimator::Unbiased, Kernel::Linear) }.unwrap();
    let first = gpu
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .unwrap();
    assert_eq!(again, first);
}

/// Page-locked chunk buffers (what a file reader fills on the Gram route): each batch is uploaded from
/// where it was written, without staging, and refilled at once while the GPU may still be reading the
/// previous contents (every write waits for the upload). The device sum has the bits of the same
/// batches submitted from heap memory (the staging path).
#[test]
fn page_locked_chunks_upload_in_place_and_refill_safely() {
    use sglp_engine::similarity::HsicSum;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(96, DType::BF16), (50, DType::F32), (33, DType::F16)];
    let metas: Vec<LayerMeta> = layers
        .iter()
        .enumerate()
        .map(|(i, &(cols, dtype))| LayerMeta {
            name: format!("l{i}"),
            cols,
            dtype,
            shape: vec![0, cols],
        })
        .collect();
    let rows = 64;
    let mut buffers: Vec<Batch> = (0..2)
        .map(|_| {
            gpu.page_locked_batch(&metas, rows)
                .expect("page-locked memory")
        })
        .collect();
    assert!(buffers[0].layers.iter().all(|b| b.data.locked().is_some()));
    let seed: u64 = rand::rng().random();
    let batches: Vec<Batch> = (0..9)
        .map(|i| random_batch(seed + i, rows, &layers))
        .collect();
    let l = layers.len();
    let (mut staged, mut in_place) = (HsicSum::new(l), HsicSum::new(l));
    for (i, b) in batches.iter().enumerate() {
        gpu.submit(
            &mut staged,
            &b.as_ref(),
            Estimator::Unbiased,
            Kernel::Linear,
        )
        .unwrap();
        // Alternate the two buffers as the reader does, then refill one buffer right after its upload
        // was enqueued.
        let buf = &mut buffers[if i < 5 { i % 2 } else { 0 }];
        for (dst, src) in buf.layers.iter_mut().zip(&b.layers) {
            dst.data.clear();
            dst.data.extend_from_slice(&src.data);
        }
        buf.rows = rows;
        gpu.submit(
            &mut in_place,
            &buf.as_ref(),
            Estimator::Unbiased,
            Kernel::Linear,
        )
        .unwrap();
    }
    assert!(buffers
        .iter()
        .all(|b| b.layers.iter().all(|x| x.data.locked().is_some())));
    let (a, b) = (
        gpu.finish_sum(staged).unwrap(),
        gpu.finish_sum(in_place).unwrap(),
    );
    assert!(a.iter().any(|v| *v != 0.0));
    assert_same_bits(
        &a,
        &b,
        "batches uploaded from page-locked buffers differ from staged ones",
    );
}

/// Every stage of the Gram route against its float64 CPU twin fed the previous stage's device output
/// (`stages::check_stages`): a failure names the kernels. Every dtype, both estimators, linear and RBF,
/// every tensor-core Gram kernel; tolerances as check_stages states them.
#[test]
fn every_stage_matches_its_cpu_twin() {
    use sglp_engine::similarity::cuda::stages::check_stages;
    use sglp_engine::similarity::cuda::GramKernel;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = EVERY_DTYPE;
    let seed: u64 = rand::rng().random();
    let batch = random_batch(seed, 150, &layers);
    for gram in gram_kernels(&GramKernel::ALL) {
        gpu.set_gram_kernel(gram);
        for estimator in [Estimator::Unbiased, Estimator::Biased] {
            for kernel in [Kernel::Linear, Kernel::Rbf { threshold: 1.0 }] {
                let out = gpu
                    .stage_outputs(&batch.as_ref(), estimator, kernel)
                    .unwrap();
                for c in check_stages(&batch.as_ref(), &out, estimator, kernel) {
                    assert!(c.passed(), "{gram:?} {estimator:?} {kernel:?}: {c:?}");
                }
            }
        }
    }
    gpu.set_gram_kernel(GramKernel::Mma);
}

/// A NaN in device memory is found on the GPU (column_centre's flags): finishing the sum fails with the
/// layer's name and the first bad sample's global index, as the file readers' message does.
#[test]
fn a_nan_on_the_device_names_its_layer_and_first_sample() {
    use sglp_engine::similarity::HsicSum;
    let Some(mut gpu) = gpu_or_skip() else { return };
    let layers = [(40, DType::F32), (24, DType::BF16), (16, DType::F32)];
    let seed: u64 = rand::rng().random();
    let mut batch = random_batch(seed, 150, &layers);
    // Layer 1 (bf16), sample 70, feature 5: a NaN; layer 2, sample 120: an Inf (later, not reported).
    let nan = bf16::NAN.to_le_bytes();
    batch.layers[1].data[(70 * 24 + 5) * 2..(70 * 24 + 5) * 2 + 2].copy_from_slice(&nan);
    batch.layers[2].data[(120 * 16) * 4..(120 * 16) * 4 + 4]
        .copy_from_slice(&f32::INFINITY.to_le_bytes());
    let copy = gpu.upload(&batch.as_ref()).unwrap();
    let mut sum = HsicSum::named(vec!["a".into(), "b".into(), "c".into()]);
    for (s, e) in [(0, 64), (64, 128)] {
        // SAFETY: `copy` holds the batch on this backend's device.
        unsafe {
            gpu.submit_device(
                &mut sum,
                &copy.batch.slice(s, e),
                Estimator::Unbiased,
                Kernel::Linear,
            )
        }
        .unwrap();
    }
    let err = gpu.finish_sum(sum).unwrap_err().to_string();
    assert!(
        err.contains("layer 'b'") && err.contains("first bad sample: 70"),
        "{err}"
    );
    // The estimators that copy device rows to the host (biased; the feature route) check them there.
    let metas: Vec<LayerMeta> = ["a", "b", "c"]
        .iter()
        .zip(&layers)
        .map(|(name, &(cols, dtype))| LayerMeta {
            name: name.to_string(),
            cols,
            dtype,
            shape: vec![150, cols],
        })
        .collect();
    for (estimator, route) in [
        (Estimator::Biased, sglp_engine::similarity::Route::Gram),
        (Estimator::Unbiased, sglp_engine::similarity::Route::Feature),
    ] {
        let spec = CkaSpec {
            estimator,
            route,
            batch_size: 64,
            ..CkaSpec::default()
        };
        let mut acc = CkaAccumulator::new(&metas, spec, Some(150)).unwrap();
        // SAFETY: as above.
        let err = unsafe { acc.push_device(&copy.batch, &mut gpu) }
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 'b'") && err.contains("first bad sample: 70"),
            "{estimator:?} {route:?}: {err}"
        );
    }
}

#[test]
fn device_choice_without_and_with_a_gpu() {
    let gpus = cuda::list_devices().map(|d| d.len()).unwrap_or(0);
    if gpus == 0 {
        // This machine: `cuda` is an error (exit 2 in the CLI), `auto` falls back with a note.
        let e = match open_backend(DeviceChoice::Cuda(0), 1) {
            Err(e) => e,
            Ok(_) => panic!("cuda:0 opened without a GPU"),
        };
        assert!(matches!(e, sglp_engine::Error::Cuda { .. }), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        let (b, note) = open_backend(DeviceChoice::Auto, 1).unwrap();
        assert!(b.name().starts_with("cpu"), "{}", b.name());
        let note = note.expect("a note says why the CPU is used");
        assert!(note.contains("using the CPU"), "{note}");
        eprintln!("auto: {note}");
    } else {
        let e = open_backend(DeviceChoice::Cuda(gpus + 5), 1)
            .err()
            .expect("a GPU index past the last is an error");
        assert!(e.to_string().contains("GPU"), "{e}");
        let (b, note) = open_backend(DeviceChoice::Auto, 1).unwrap();
        assert!(b.name().starts_with("cuda:0"), "{} {note:?}", b.name());
    }
    let (b, note) = open_backend(DeviceChoice::Cpu, 1).unwrap();
    assert!(b.name().starts_with("cpu") && note.is_none());
}
