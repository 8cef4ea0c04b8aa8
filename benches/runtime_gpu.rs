//! Validate-and-time harness of the runtime's CUDA kernels (llm.c's `dev/cuda` in one program): the
//! linear layer's three products in both `Matmul` modes (bf16 by each `LinearKernel` the device runs:
//! `mma`, and on Hopper `wgmma`) on the shapes of a LLaMA-3-8B layer and its
//! lm_head for 8 × 512 tokens, and windowless causal GQA attention on 8 × 512 tokens, 32 / 8 heads of
//! 128 (forward and backward, on tensor cores and in f32). Each case is first checked against a float64 host reference on sampled output rows (bf16 mode:
//! against products of the bf16-rounded operands), then timed: median of `SGLP_BENCH_REPS` (default 5)
//! launches after a warm-up, each bracketed by device synchronisations, in TFLOP/s.
//!
//! The weight is held as the device's `weight` holds it in each mode (bf16: rounded once, 2 bytes).
//!
//! `cargo bench --bench runtime_gpu` (prints a skip message and exits 0 without a usable GPU; on the GPU
//! machine: `bash .device/run-bench.sh runtime_gpu`). A validation failure exits 1. `SGLP_BENCH_SMOKE=1`
//! runs small shapes through the same code (a plumbing check, e.g. on the GPU emulator).

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sglp_engine::runtime::ops::cuda::{CudaDevice, LinearKernel};
use sglp_engine::runtime::ops::{round_to_bf16, AttnShape, Device, Matmul};
use sglp_engine::similarity::cuda::kernels::kernel_times;
use std::time::Instant;

type Buf = <CudaDevice as Device>::Buf;

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn up(dev: &CudaDevice, host: &[f32]) -> Buf {
    let mut b = dev.alloc_zeroed(host.len()).expect("alloc");
    dev.upload(host, &mut b).expect("upload");
    b
}

/// Median seconds of `reps` runs of `f` (after one warm-up), each between two synchronisations.
fn time(dev: &CudaDevice, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().expect("sync");
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            dev.synchronize().expect("sync");
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// One more call of `f` with its launches timed by CUDA events, as "kernel ms" pairs: where a product's time
/// goes when it is more than one kernel (the wgmma path's conversions and its GEMM).
fn kernel_split(mut f: impl FnMut()) -> String {
    let ((), times) = kernel_times::record(|| {
        f();
        Ok(())
    })
    .expect("kernel timing");
    times
        .iter()
        .map(|t| format!("{} {:.3} ms", t.kernel, t.total_ms))
        .collect::<Vec<_>>()
        .join(", ")
}

/// max over sampled rows of |got − ref| / max |ref|, where ref row i = Σ_r a(i, r) b(r, ·) in f64.
fn sampled_error(
    got: &[f32],
    rows: &[usize],
    cols: usize,
    reference_row: impl Fn(usize) -> Vec<f64>,
) -> f64 {
    let (mut err, mut scale) = (0f64, 1e-300f64);
    for &i in rows {
        let want = reference_row(i);
        for (j, &w) in want.iter().enumerate() {
            err = err.max((got[i * cols + j] as f64 - w).abs());
            scale = scale.max(w.abs());
        }
    }
    err / scale
}

fn main() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            common::no_gpu("runtime_gpu", e);
            return;
        }
    };
    let reps: usize = std::env::var("SGLP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!("runtime_gpu on {}", dev.name());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut failed = false;
    let smoke = common::smoke();
    let n = if smoke { 160 } else { 4096 }; // 8 sequences × 512 tokens
    let sample: Vec<usize> = vec![0, 1, 127, 128, n / 2 + 1, n - 1];
    let linear_shapes: &[(&str, usize, usize)] = if smoke {
        &[("smoke 96→80", 96, 80), ("smoke lm_head 64→300", 64, 300)]
    } else {
        &[
            ("q/o proj 4096→4096", 4096, 4096),
            ("mlp up 4096→14336", 4096, 14336),
            ("mlp down 14336→4096", 14336, 4096),
            ("lm_head 4096→128256", 4096, 128_256),
        ]
    };
    println!(
        "{:<28} {:>11} {:>10} {:>10} {:>10} {:>9}",
        "linear (n × k → m)", "mode", "product", "ms", "TFLOP/s", "rel.err"
    );
    // The bf16 products by each kernel this device runs (LinearKernel: wgmma on Hopper, its time
    // including the conversions to bf16 copies), then the f32 ones.
    let mut modes = vec![("bf16 mma", Matmul::Bf16, LinearKernel::Mma)];
    dev.set_linear_kernel(LinearKernel::Wgmma);
    if dev.linear_kernel_in_use() == LinearKernel::Wgmma {
        modes.push(("bf16 wgmma", Matmul::Bf16, LinearKernel::Wgmma));
    }
    modes.push(("f32", Matmul::F32, LinearKernel::Mma));
    for &(what, k, m) in linear_shapes {
        let (x, w, dy) = (
            rand_vec(&mut rng, n * k),
            rand_vec(&mut rng, m * k),
            rand_vec(&mut rng, n * m),
        );
        let (xd, wd, dyd) = (up(&dev, &x), up(&dev, &w), up(&dev, &dy));
        let mut y = dev.alloc_zeroed(n * m).expect("alloc");
        let mut dx = dev.alloc_zeroed(n * k).expect("alloc");
        let mut dw = dev.alloc_zeroed(m * k).expect("alloc");
        for &(label, mode, kernel) in &modes {
            dev.set_matmul(mode);
            dev.set_linear_kernel(kernel);
            let wv = dev.weight_from(&wd).expect("weight");
            let (xr, wr) = match mode {
                Matmul::Bf16 => (round_to_bf16(&x), round_to_bf16(&w)),
                Matmul::F32 => (x.clone(), w.clone()),
            };
            // Forward, validated on sampled rows: y[i, j] = Σ_r x[i, r] w[j, r].
            dev.linear_forward(&xd, &wv, None, n, k, m, &mut y)
                .expect("forward");
            let mut host = Vec::new();
            dev.download(&y, &mut host).expect("download");
            let err = sampled_error(&host, &sample, m, |i| {
                (0..m)
                    .map(|j| {
                        (0..k)
                            .map(|r| xr[i * k + r] as f64 * wr[j * k + r] as f64)
                            .sum()
                    })
                    .collect()
            });
            let tol = 1e-4;
            if err.is_nan() || err > tol {
                eprintln!("runtime_gpu: {what} {label} forward: error {err:.2e} > {tol:.0e}");
                failed = true;
            }
            let flops = 2.0 * (n * k * m) as f64;
            let t = time(&dev, reps, || {
                dev.linear_forward(&xd, &wv, None, n, k, m, &mut y)
                    .expect("forward")
            });
            println!(
                "{what:<28} {label:>11} {:>10} {:>10.3} {:>10.1} {:>9.1e}",
                "forward",
                t * 1e3,
                flops / t / 1e12,
                err
            );
            if kernel == LinearKernel::Wgmma {
                let split = kernel_split(|| {
                    dev.linear_forward(&xd, &wv, None, n, k, m, &mut y)
                        .expect("forward")
                });
                println!("{:<28} {:>11} of which {split}", "", "");
            }
            // Backward: dx += dy w and dW += dyᵀ x (timed together; dx validated on sampled rows).
            dev.zero(&mut dx).expect("zero");
            dev.linear_backward(&xd, &wv, &dyd, n, k, m, Some(&mut dx), &mut dw, None)
                .expect("backward");
            dev.download(&dx, &mut host).expect("download");
            let dyr = match mode {
                Matmul::Bf16 => round_to_bf16(&dy),
                Matmul::F32 => dy.clone(),
            };
            let err = sampled_error(&host, &sample, k, |i| {
                // Σ_j dy[i, j]·w[j, :], reading whole rows of w (a column at a time strides the
                // lm_head's 2 GB and takes seconds per row).
                let mut row = vec![0f64; k];
                for j in 0..m {
                    let d = dyr[i * m + j] as f64;
                    for (r, &w) in row.iter_mut().zip(&wr[j * k..(j + 1) * k]) {
                        *r += d * w as f64;
                    }
                }
                row
            });
            if err.is_nan() || err > tol {
                eprintln!("runtime_gpu: {what} {label} backward dx: error {err:.2e} > {tol:.0e}");
                failed = true;
            }
            let t = time(&dev, reps, || {
                dev.linear_backward(&xd, &wv, &dyd, n, k, m, Some(&mut dx), &mut dw, None)
                    .expect("backward")
            });
            println!(
                "{what:<28} {label:>11} {:>10} {:>10.3} {:>10.1} {:>9.1e}",
                "dx + dW",
                t * 1e3,
                2.0 * flops / t / 1e12,
                err
            );
            if kernel == LinearKernel::Wgmma {
                let split = kernel_split(|| {
                    dev.linear_backward(&xd, &wv, &dyd, n, k, m, Some(&mut dx), &mut dw, None)
                        .expect("backward")
                });
                println!("{:<28} {:>11} of which {split}", "", "");
            }
        }
    }

    // Attention: causal, no window, 8 × 512 tokens, 32 query heads over 8 KV heads of 128.
    let sh = if smoke {
        AttnShape {
            seqs: 2,
            tokens: 80,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
        }
    } else {
        AttnShape {
            seqs: 8,
            tokens: 512,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
        }
    };
    let rows = sh.seqs * sh.tokens;
    let (qd, kvd) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let (q, kk, v, dout) = (
        rand_vec(&mut rng, rows * qd),
        rand_vec(&mut rng, rows * kvd),
        rand_vec(&mut rng, rows * kvd),
        rand_vec(&mut rng, rows * qd),
    );
    let (q, kk, v, dout) = (up(&dev, &q), up(&dev, &kk), up(&dev, &v), up(&dev, &dout));
    let mut out = dev.alloc_zeroed(rows * qd).expect("alloc");
    let mut lse = dev.alloc_zeroed(rows * sh.heads).expect("alloc");
    let (mut dq, mut dk, mut dv) = (
        dev.alloc_zeroed(rows * qd).expect("alloc"),
        dev.alloc_zeroed(rows * kvd).expect("alloc"),
        dev.alloc_zeroed(rows * kvd).expect("alloc"),
    );
    // Causal: T(T+1)/2 score rows per head and sequence, 2 products (QKᵀ, PV) of 2·D FLOPs each.
    let t = sh.tokens as f64;
    let fwd_flops =
        sh.seqs as f64 * sh.heads as f64 * t * (t + 1.0) / 2.0 * 4.0 * sh.head_dim as f64;
    dev.set_matmul(Matmul::Bf16);
    let tf_mma = time(&dev, reps, || {
        dev.attention_forward(&q, &kk, &v, sh, &mut out, &mut lse)
            .expect("attention")
    });
    let tb_mma = time(&dev, reps, || {
        dev.attention_backward(&q, &kk, &v, &lse, &dout, sh, &mut dq, &mut dk, &mut dv)
            .expect("attention backward")
    });
    dev.set_matmul(Matmul::F32);
    let tf = time(&dev, reps, || {
        dev.attention_forward(&q, &kk, &v, sh, &mut out, &mut lse)
            .expect("attention")
    });
    let tb = time(&dev, reps, || {
        dev.attention_backward(&q, &kk, &v, &lse, &dout, sh, &mut dq, &mut dk, &mut dv)
            .expect("attention backward")
    });
    println!(
        "attention {}×{}, {}/{} heads of {} (validated in tests/runtime_cuda.rs), ms and TFLOP/s (the \
         backward counted as 2.5× the forward's FLOPs): tensor cores (bf16) forward {:.3} ({:.1}), \
         backward {:.3} ({:.1}); SIMT (f32) forward {:.3} ({:.1}), backward {:.3} ({:.1})",
        sh.seqs,
        sh.tokens,
        sh.heads,
        sh.kv_heads,
        sh.head_dim,
        tf_mma * 1e3,
        fwd_flops / tf_mma / 1e12,
        tb_mma * 1e3,
        2.5 * fwd_flops / tb_mma / 1e12,
        tf * 1e3,
        fwd_flops / tf / 1e12,
        tb * 1e3,
        2.5 * fwd_flops / tb / 1e12
    );
    if failed {
        eprintln!("runtime_gpu: validation FAILED");
        std::process::exit(1);
    }
}
