//! GPU benchmark of the CUDA backend's Gram route on two workloads (prints a skip message and exits 0
//! without a usable GPU):
//!
//! * ResNet-like: 28 layers (ResNet-56 on CIFAR: conv1 and 9 blocks at 16×32×32 = 16,384 features, 9 at
//!   8,192, 9 at 4,096), b = 500, f32; the published calibration is 5 such batches;
//! * LLM-like: 32 layers, b = 1,024 tokens, d = 4,096, bf16; 64 batches.
//!
//! `cargo bench --bench cka_gpu` runs criterion on one batch of each (throughput in Gram FLOP/s, the full
//! L·b²·d·2 count). With `SGLP_BENCH_JSON=<file>` it instead times every batch of both workloads with
//! CUDA events per kernel and per stage and writes medians and totals as JSON (what scripts/bench_gpu.py
//! reads), after validating each workload's first batch against the CPU backend (max |ΔCKA| and the
//! relative HSIC difference go into the JSON; over 1e-4 is reported on stderr). `SGLP_BENCH_SMOKE=1`
//! shrinks both workloads to a few small layers (a plumbing check, e.g. on the GPU emulator);
//! `SGLP_BENCH_WORKLOADS=resnet_like` (comma-separated names) runs only those; `SGLP_BENCH_KERNELS_ONLY=1`
//! times the per-batch path alone (no streamed, page-locked or device-resident runs).

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sglp_engine::io::{Batch, DType, LayerBlock, LayerMeta};
use sglp_engine::similarity::cpu::CpuBackend;
use sglp_engine::similarity::cuda::CudaBackend;
use sglp_engine::similarity::{Backend, Estimator, HsicSum, Kernel};
use std::time::Duration;

struct Workload {
    name: &'static str,
    rows: usize,
    widths: Vec<usize>,
    dtype: DType,
    batches: usize,
}

/// The workloads to run: all, or those `SGLP_BENCH_WORKLOADS` names (comma-separated).
fn workloads() -> Vec<Workload> {
    let all = if common::smoke() {
        smoke_workloads()
    } else {
        full_workloads()
    };
    match std::env::var("SGLP_BENCH_WORKLOADS") {
        Ok(names) => all
            .into_iter()
            .filter(|w| names.split(',').any(|n| n.trim() == w.name))
            .collect(),
        Err(_) => all,
    }
}

fn full_workloads() -> Vec<Workload> {
    let resnet: Vec<usize> = std::iter::repeat_n(16384, 10)
        .chain(std::iter::repeat_n(8192, 9))
        .chain(std::iter::repeat_n(4096, 9))
        .collect();
    vec![
        Workload {
            name: "resnet_like",
            rows: 500,
            widths: resnet,
            dtype: DType::F32,
            batches: 5,
        },
        Workload {
            name: "llm_like",
            rows: 1024,
            widths: vec![4096; 32],
            dtype: DType::BF16,
            batches: 64,
        },
    ]
}

/// `SGLP_BENCH_SMOKE=1`: the same two kinds of workload, small enough for the GPU emulator (every code
/// path of the benchmark and its JSON, 20 batches so that the 16-batch memory reading exists; the timings
/// mean nothing there).
fn smoke_workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "resnet_like",
            rows: 70,
            widths: vec![256, 256, 128, 64],
            dtype: DType::F32,
            batches: 3,
        },
        Workload {
            name: "llm_like",
            rows: 130,
            widths: vec![136; 4],
            dtype: DType::BF16,
            batches: 20,
        },
    ]
}

impl Workload {
    /// Gram-stage FLOPs per batch, full products: Σ_l b²·d_l·2.
    fn gram_flops(&self) -> f64 {
        let b = self.rows as f64;
        self.widths.iter().map(|&d| b * b * d as f64 * 2.0).sum()
    }

    /// All-pairs FLOPs per batch on the full n² Grams: L²·b²·2.
    fn pairs_flops(&self) -> f64 {
        let (l, b) = (self.widths.len() as f64, self.rows as f64);
        l * l * b * b * 2.0
    }

    /// A batch of uniform random values in [−1, 1) (cheap to generate for hundreds of MB).
    fn batch(&self, seed: u64) -> Batch {
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = self
            .widths
            .iter()
            .map(|&cols| {
                let len = self.rows * cols;
                let data: Vec<u8> = match self.dtype {
                    DType::BF16 => (0..len)
                        .flat_map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
                        .collect(),
                    _ => (0..len)
                        .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
                        .collect(),
                };
                LayerBlock {
                    dtype: self.dtype,
                    cols,
                    data: data.into(),
                }
            })
            .collect();
        Batch {
            rows: self.rows,
            layers,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// (max |ΔCKA|, max |ΔHSIC| / max |HSIC|) of `batch` between the GPU and the CPU backend (all cores).
fn validate(gpu: &mut CudaBackend, batch: &Batch) -> (f64, f64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = CpuBackend::new(threads)
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .expect("cpu batch");
    let got = gpu
        .batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
        .expect("gpu batch");
    let l = batch.layers.len();
    let cka = |h: &[f64], i: usize, j: usize| h[i * l + j] / (h[i * l + i] * h[j * l + j]).sqrt();
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut dc, mut dh) = (0f64, 0f64);
    for i in 0..l {
        for j in 0..=i {
            dc = dc.max((cka(&got, i, j) - cka(&want, i, j)).abs());
            dh = dh.max((got[i * l + j] - want[i * l + j]).abs() / scale);
        }
    }
    (dc, dh)
}

/// What the other input paths measure (none with `SGLP_BENCH_KERNELS_ONLY=1`).
struct OtherPaths {
    streamed_s: f64,
    used_16: usize,
    used_all: usize,
    page_locked_s: Option<f64>,
    device_resident_s: f64,
}

/// The streamed, page-locked and device-resident paths over the workload's batches (profiling off).
fn other_paths(gpu: &mut CudaBackend, w: &Workload, data: &[Batch; 2]) -> OtherPaths {
    // The streamed path the accumulator uses: every batch submitted into a device-resident sum, one
    // download at the end, no host synchronisation per batch (profiling off: it would add one).
    // Device memory after 16 and after all batches: it must not grow with the number of batches.
    gpu.set_profiling(false);
    let mut sum = HsicSum::new(w.widths.len());
    let mut used_16 = 0usize;
    let t1 = std::time::Instant::now();
    for i in 0..w.batches {
        gpu.submit(
            &mut sum,
            &data[i % 2].as_ref(),
            Estimator::Unbiased,
            Kernel::Linear,
        )
        .expect("submit");
        if i + 1 == 16.min(w.batches) {
            used_16 = gpu.device_memory_used().expect("memory info");
        }
    }
    gpu.finish_sum(sum).expect("finish");
    let streamed_s = t1.elapsed().as_secs_f64();
    let used_all = gpu.device_memory_used().expect("memory info");
    // The same from page-locked chunk buffers (what a file reader fills): each batch is uploaded from
    // where it lies, no staging copy. The reader's own copy into the buffer is timed here too, on this
    // thread (a reader thread does it in `compute_cka`; `streamed_total_s` starts from heap batches),
    // so this is an upper bound of the path's cost.
    let metas: Vec<LayerMeta> = w
        .widths
        .iter()
        .enumerate()
        .map(|(i, &cols)| LayerMeta {
            name: format!("l{i}"),
            cols,
            dtype: w.dtype,
            shape: vec![w.rows, cols],
        })
        .collect();
    let mut buffers: Vec<Batch> = (0..2)
        .filter_map(|_| gpu.page_locked_batch(&metas, w.rows))
        .collect();
    let page_locked_s = (buffers.len() == 2).then(|| {
        let mut sum = HsicSum::new(w.widths.len());
        let t = std::time::Instant::now();
        for i in 0..w.batches {
            let buf = &mut buffers[i % 2];
            for (dst, src) in buf.layers.iter_mut().zip(&data[i % 2].layers) {
                dst.data.clear();
                dst.data.extend_from_slice(&src.data);
            }
            buf.rows = w.rows;
            gpu.submit(&mut sum, &buf.as_ref(), Estimator::Unbiased, Kernel::Linear)
                .expect("submit");
        }
        gpu.finish_sum(sum).expect("finish");
        t.elapsed().as_secs_f64()
    });
    drop(buffers);
    // Activations already on the device (computed there, or a CUDA tensor): no PCIe in the loop.
    let on_device = [
        gpu.upload(&data[0].as_ref()).expect("device copy"),
        gpu.upload(&data[1].as_ref()).expect("device copy"),
    ];
    let mut sum = HsicSum::new(w.widths.len());
    let t2 = std::time::Instant::now();
    for i in 0..w.batches {
        // SAFETY: `on_device` holds the batches on this backend's device.
        unsafe {
            gpu.submit_device(
                &mut sum,
                &on_device[i % 2].batch,
                Estimator::Unbiased,
                Kernel::Linear,
            )
        }
        .expect("submit_device");
    }
    gpu.finish_sum(sum).expect("finish");
    let device_resident_s = t2.elapsed().as_secs_f64();
    drop(on_device);
    OtherPaths {
        streamed_s,
        used_16,
        used_all,
        page_locked_s,
        device_resident_s,
    }
}

/// Every batch of every workload, validated against the CPU on its first batch, then timed per stage;
/// JSON to `path`.
fn json_report(gpu: &mut CudaBackend, path: &str) {
    // The GPU-wide use before any workspace (this process's context, any other process's memory):
    // what the workloads' device_bytes_used_* figures are to be measured from.
    let used_at_open = gpu.device_memory_used().expect("memory info");
    gpu.set_profiling(true);
    let mut entries = Vec::new();
    for w in workloads() {
        // Two distinct host batches, alternated (the upload is part of the time).
        let data = [w.batch(1), w.batch(2)];
        for b in &data {
            gpu.batch_hsic(&b.as_ref(), Estimator::Unbiased, Kernel::Linear)
                .expect("warm-up batch");
        }
        // Validate before timing (as llm.c's dev/cuda does): the first batch against the CPU backend.
        let (cka_diff, hsic_diff) = validate(gpu, &data[0]);
        if cka_diff.is_nan() || cka_diff > 1e-4 {
            eprintln!(
                "cka_gpu: {}: CKA differs from the CPU's by {cka_diff:.2e} (> 1e-4)",
                w.name
            );
        }
        let (mut wall, mut gram, mut centre, mut pairs) = (vec![], vec![], vec![], vec![]);
        // Per kernel: its device time in each batch.
        let mut per_kernel: Vec<(&'static str, Vec<f64>)> = Vec::new();
        let t0 = std::time::Instant::now();
        for i in 0..w.batches {
            gpu.batch_hsic(&data[i % 2].as_ref(), Estimator::Unbiased, Kernel::Linear)
                .expect("batch");
            let t = gpu.last_stage_times().expect("profiling on");
            wall.push(t.wall_ms);
            gram.push(t.gram_ms);
            centre.push(t.centre_ms);
            pairs.push(t.pairs_ms);
            for k in gpu.last_kernel_times() {
                match per_kernel.iter_mut().find(|(name, _)| *name == k.kernel) {
                    Some((_, v)) => v.push(k.total_ms),
                    None => per_kernel.push((k.kernel, vec![k.total_ms])),
                }
            }
        }
        let kernel_ms_median: serde_json::Map<String, serde_json::Value> = per_kernel
            .iter_mut()
            .map(|(name, v)| (name.to_string(), median(v).into()))
            .collect();
        let total_s = t0.elapsed().as_secs_f64();
        // The other input paths (the streamed sum, page-locked buffers, activations on the device), unless
        // only the kernels are compared (the candidates' runs of scripts/bench_gpu.py).
        let kernels_only = std::env::var("SGLP_BENCH_KERNELS_ONLY").as_deref() == Ok("1");
        let other = (!kernels_only).then(|| other_paths(gpu, &w, &data));
        gpu.set_profiling(true);
        let plan = gpu.memory_plan().expect("planned").clone();
        let gram_ms = median(&mut gram);
        // The Gram products alone (the stage also centres the columns; gram_row_sums belongs to the
        // centring of the Grams), with split-K's reduction of their planes, for the TFLOP/s.
        let gram_kernels_ms: f64 = kernel_ms_median
            .iter()
            .filter(|(name, _)| {
                common::gram_product_of_16bit(name).is_some()
                    || name.as_str() == "gram_reduce_splits"
            })
            .filter_map(|(_, ms)| ms.as_f64())
            .sum();
        let entry = serde_json::json!({
            "workload": w.name,
            "layers": w.widths.len(),
            "rows": w.rows,
            "dtype": w.dtype.name(),
            "batches": w.batches,
            "total_s": total_s,
            "streamed_total_s": other.as_ref().map(|o| o.streamed_s),
            "page_locked_total_s": other.as_ref().and_then(|o| o.page_locked_s),
            "device_resident_total_s": other.as_ref().map(|o| o.device_resident_s),
            "device_bytes_used_after_16_batches": other.as_ref().map(|o| o.used_16),
            "device_bytes_used_after_all_batches": other.as_ref().map(|o| o.used_all),
            "batch_wall_ms_median": median(&mut wall),
            "gram_ms_median": gram_ms,
            "centre_ms_median": median(&mut centre),
            "pairs_ms_median": median(&mut pairs),
            "kernel_ms_median": kernel_ms_median,
            "gram_flops_per_batch": w.gram_flops(),
            "pairs_flops_per_batch": w.pairs_flops(),
            "gram_kernels_ms_median": gram_kernels_ms,
            "gram_tflops_full_count": w.gram_flops() / (gram_kernels_ms * 1e-3) / 1e12,
            "gram_tflops_performed": w.gram_flops() / 2.0 / (gram_kernels_ms * 1e-3) / 1e12,
            "device_bytes_used_at_open": used_at_open,
            "plan_device_bytes": plan.device_bytes,
            "plan_layer_block": plan.layer_block,
            "backend": gpu.name(),
            "cka_max_abs_diff_vs_cpu": cka_diff,
            "hsic_max_rel_diff_vs_cpu": hsic_diff,
        });
        eprintln!("{entry}");
        entries.push(entry);
    }
    let text = serde_json::to_string_pretty(&entries).expect("json");
    std::fs::write(path, text).expect("writing the benchmark JSON");
}

fn main() {
    let mut gpu = match CudaBackend::open(0) {
        Ok(g) => g,
        Err(e) => {
            common::no_gpu("cka_gpu", e);
            return;
        }
    };
    if let Ok(path) = std::env::var("SGLP_BENCH_JSON") {
        json_report(&mut gpu, &path);
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for w in workloads() {
        let batch = w.batch(1);
        let mut group = c.benchmark_group(w.name);
        group.throughput(Throughput::Elements(w.gram_flops() as u64));
        group.bench_function("batch_hsic_unbiased_linear", |bench| {
            bench.iter(|| {
                gpu.batch_hsic(&batch.as_ref(), Estimator::Unbiased, Kernel::Linear)
                    .expect("batch")
            })
        });
        group.finish();
    }
    c.final_summary();
}
