//! The runtime's CUDA device (`runtime::ops::cuda::CudaDevice`) against its CPU twins (the free functions
//! of `runtime::ops::cpu`) on fresh random inputs of awkward shapes, op by op, then a whole
//! decoder's forward + backward (`Model::grad_norms_on`, the fixture `qwen2_sliding`: GQA, q/k/v biases,
//! sliding-window layers; and `qwen3_qk_norm`: per-head q/k RMSNorm) on the GPU against the CPU, with the
//! whole model resident and with a weight budget small enough that the device keeps only a window of
//! layers (prefetched one group ahead).
//!
//! Without a usable GPU every test prints why and passes, unless `SGLP_REQUIRE_GPU=1`, where a missing GPU
//! is a failure.
//!
//! Errors are scale-relative, max |gpu − cpu| / max |cpu| over a tensor, as in tests/runtime_fixtures.rs.
//! Tolerances: 1e-5 for the elementwise, row-wise (f64 row sums on both sides), embedding, rotary and
//! cross-entropy ops and the f32 GEMMs of the linear layer (f32 sums in another order); attention
//! forward 1e-5, its backward 5e-5 (the probabilities are recomputed from the f32 log-sum-exp and the
//! scores summed in another order); the decoder's loss and hidden states 1e-5, gradient norms 1e-4.
//! These run the device in `Matmul::F32`. The tensor-core products (`Matmul::Bf16`, the default) are held
//! to f64 products of the bf16-rounded operands at 1e-5 (only the f32 accumulation order differs), and
//! the whole decoder in bf16 to the CPU's f32 within bf16 tolerances (loss 1e-2, hidden states 5e-2,
//! gradient norms 5e-2 relative: every product's operands carry a relative rounding of up to 2⁻⁹).

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sglp_engine::runtime::ops::cuda::{CudaDevice, CudaWeight, LinearKernel};
use sglp_engine::runtime::ops::{
    cpu, round_to_bf16, Activation, Alibi, AttnShape, ColumnBlocks, Device, Matmul, NormShape,
    RopePairs, RopeTable, Xielu,
};
use sglp_engine::runtime::tape::{Cpu, Pool};
use sglp_engine::runtime::{Model, Tokens};
use sglp_engine::similarity::cuda::kernels::kernel_times;
use std::collections::HashMap;

/// The device in f32 mode (the CPU twins' precision), or None (and why) without a GPU.
fn gpu_or_skip() -> Option<CudaDevice> {
    let d = gpu_bf16_or_skip()?;
    d.set_matmul(Matmul::F32);
    Some(d)
}

/// The device as it opens: linear products on tensor cores.
fn gpu_bf16_or_skip() -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(d) => {
            assert_eq!(d.matmul(), Matmul::Bf16, "bf16 products are the default");
            Some(d)
        }
        Err(e) => {
            if std::env::var("SGLP_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SGLP_REQUIRE_GPU=1 but the runtime's CUDA device does not open: {e}");
            }
            eprintln!("skipping: no usable GPU ({e})");
            None
        }
    }
}

type Buf = <CudaDevice as Device>::Buf;

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn up(dev: &CudaDevice, host: &[f32]) -> Buf {
    let mut b = dev.alloc_zeroed(host.len()).unwrap();
    dev.upload(host, &mut b).unwrap();
    b
}

fn down(dev: &CudaDevice, b: &Buf) -> Vec<f32> {
    let mut v = Vec::new();
    dev.download(b, &mut v).unwrap();
    v
}

/// max |got − want| / max |want| (the absolute error when `want` is all zeros).
fn scale_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| {
        if a.is_nan() || b.is_nan() {
            f64::INFINITY
        } else {
            m.max((a as f64 - b as f64).abs())
        }
    });
    if scale > 0.0 {
        err / scale
    } else {
        err
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = scale_rel(got, want);
    eprintln!("{what}: scale-relative error {e:.2e}");
    assert!(e < tol, "{what}: scale-relative error {e:.2e} ≥ {tol:.0e}");
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn elementwise_ops_and_sum_of_squares_match_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    for n in [1usize, 31, 100_003] {
        let (x, b, g) = (
            rand_vec(&mut rng, n, 4.0),
            rand_vec(&mut rng, n, 2.0),
            rand_vec(&mut rng, n, 1.0),
        );
        let (dx0, db0) = (rand_vec(&mut rng, n, 1.0), rand_vec(&mut rng, n, 1.0));
        let (xd, bd, gd) = (up(&dev, &x), up(&dev, &b), up(&dev, &g));

        for act in [
            Activation::Silu,
            Activation::GeluTanh,
            Activation::Softcap(1.7),
            Activation::Gelu,
            Activation::Scale(-0.3),
            Activation::Sigmoid,
            Activation::Relu,
            Activation::Relu2,
            Activation::Clamp(0.6),
            Activation::ClampPlusOne(0.6),
            // x spans ±4: some values past the limit.
            Activation::OssGate {
                alpha: 1.702,
                limit: 2.5,
            },
        ] {
            let mut want = vec![0f32; n];
            let mut y = dev.alloc_zeroed(n).unwrap();
            cpu::activation_forward(act, &x, &mut want);
            dev.activation_forward(act, &xd, &mut y).unwrap();
            let what = format!("{act:?} forward n={n}");
            assert_close(&what, &down(&dev, &y), &want, 1e-5);

            // Backwards accumulate: start from non-zero gradients.
            let mut want = dx0.clone();
            let mut dx = up(&dev, &dx0);
            cpu::activation_backward(act, &x, &g, &mut want);
            dev.activation_backward(act, &xd, &gd, &mut dx).unwrap();
            let what = format!("{act:?} backward n={n}");
            assert_close(&what, &down(&dev, &dx), &want, 1e-5);
        }

        // xIELU (x spans ±4: both branches) with its two raw parameters, their gradients accumulated.
        let k = Xielu {
            beta: 0.5,
            eps: -1e-6,
        };
        let raw = [0.3f32, -0.4];
        let (apd, and) = (up(&dev, &raw[..1]), up(&dev, &raw[1..]));
        let mut want = vec![0f32; n];
        let mut y = dev.alloc_zeroed(n).unwrap();
        cpu::xielu_forward(&x, raw, k, &mut want);
        dev.xielu_forward(&xd, [&apd, &and], k, &mut y).unwrap();
        assert_close(
            &format!("xielu forward n={n}"),
            &down(&dev, &y),
            &want,
            1e-5,
        );
        let mut want = dx0.clone();
        let mut dx = up(&dev, &dx0);
        let [wp, wn] = cpu::xielu_backward(&x, raw, k, &g, &mut want);
        let (mut dap, mut dan) = (up(&dev, &[0.25]), up(&dev, &[-0.5]));
        (dev.xielu_backward(&xd, [&apd, &and], k, &gd, &mut dx, &mut dap, &mut dan)).unwrap();
        assert_close(
            &format!("xielu backward n={n}"),
            &down(&dev, &dx),
            &want,
            1e-5,
        );
        let got = [down(&dev, &dap)[0] - 0.25, down(&dev, &dan)[0] + 0.5];
        for (what, g, w) in [("alpha_p", got[0], wp), ("alpha_n", got[1], wn)] {
            assert!(
                rel(g as f64, w as f64) < 1e-4,
                "xielu d{what} n={n}: {g} vs {w}"
            );
        }

        let mut y = dev.alloc_zeroed(n).unwrap();
        let mut want = vec![0f32; n];
        cpu::mul_forward(&x, &b, &mut want);
        dev.mul_forward(&xd, &bd, &mut y).unwrap();
        assert_close(&format!("mul forward n={n}"), &down(&dev, &y), &want, 1e-5);

        let (mut wa, mut wb) = (dx0.clone(), db0.clone());
        let (mut da, mut dbb) = (up(&dev, &dx0), up(&dev, &db0));
        cpu::mul_backward(&x, &b, &g, &mut wa, &mut wb);
        dev.mul_backward(&xd, &bd, &gd, &mut da, &mut dbb).unwrap();
        assert_close(
            &format!("mul backward a n={n}"),
            &down(&dev, &da),
            &wa,
            1e-5,
        );
        assert_close(
            &format!("mul backward b n={n}"),
            &down(&dev, &dbb),
            &wb,
            1e-5,
        );

        let mut want = vec![0f32; n];
        cpu::add_forward(&x, &b, &mut want);
        dev.add_forward(&xd, &bd, &mut y).unwrap();
        assert_close(&format!("add forward n={n}"), &down(&dev, &y), &want, 1e-5);

        let mut want = dx0.clone();
        let mut acc = up(&dev, &dx0);
        cpu::accumulate(&mut want, &g);
        dev.accumulate(&mut acc, &gd).unwrap();
        assert_close(&format!("accumulate n={n}"), &down(&dev, &acc), &want, 1e-5);

        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = dev.sum_sq(&xd).unwrap();
        assert!(rel(got, want) < 1e-12, "sum_sq n={n}: {got} vs {want}");
        assert_eq!(got, dev.sum_sq(&xd).unwrap(), "sum_sq is deterministic");

        dev.zero(&mut y).unwrap();
        assert!(down(&dev, &y).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn embedding_matches_the_cpu_with_repeated_ids() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(2);
    let (vocab, dim, rows) = (37, 45, 131);
    let table = rand_vec(&mut rng, vocab * dim, 1.0);
    // Repeated ids (a few hot tokens) exercise the atomicAdd of the backward.
    let ids: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 3 == 0 {
                5
            } else {
                rng.random_range(0..vocab as i64)
            }
        })
        .collect();
    let dout = rand_vec(&mut rng, rows * dim, 1.0);
    let dt0 = rand_vec(&mut rng, vocab * dim, 1.0);
    let dids = dev.ids(&ids).unwrap();
    let (td, dd) = (up(&dev, &table), up(&dev, &dout));

    // Plain, and scaled by √hidden as Gemma's embedding is.
    for scale in [1.0f32, 33.941] {
        let mut want = vec![0f32; rows * dim];
        cpu::embedding_forward(&ids, &table, dim, scale, &mut want);
        let mut out = dev.alloc_zeroed(rows * dim).unwrap();
        dev.embedding_forward(&dids, &td, dim, scale, &mut out)
            .unwrap();
        assert_eq!(down(&dev, &out), want, "a (scaled) gather is exact");
    }

    // Without and with a padding row (the hot token: every third row skips its scatter), and scaled.
    for (padding, scale) in [(None, 1.0), (Some(5), 1.0), (None, 33.941)] {
        let mut want = dt0.clone();
        cpu::embedding_backward(&ids, &dout, dim, scale, padding, &mut want);
        let mut dt = up(&dev, &dt0);
        dev.embedding_backward(&dids, &dd, dim, scale, padding, &mut dt)
            .unwrap();
        let what = format!("embedding backward, padding {padding:?}, scale {scale}");
        assert_close(&what, &down(&dev, &dt), &want, 1e-5);
    }

    // An id outside the table is an error, not an out-of-bounds read.
    let bad = dev.ids(&[0, vocab as i64]).unwrap();
    let mut out2 = dev.alloc_zeroed(2 * dim).unwrap();
    assert!(dev
        .embedding_forward(&bad, &td, dim, 1.0, &mut out2)
        .is_err());
}

#[test]
fn norms_match_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    // RMSNorms; one with Gemma's gain 1 + w; LayerNorms (GPT-NeoX's, with a bias) on inputs of mean 40;
    // OLMo's LayerNorms without parameters (gain 1, no weight gradient); weights (and biases) per group of
    // rows, as Cohere's per-head q/k norms (rows tokens × heads, row r taking row r mod heads), over
    // enough rows for several weight-gradient chunks.
    for (rows, d, offset, centre, weighted, groups) in [
        (133usize, 300usize, 0.0, false, true, 1usize),
        (1, 7, 0.0, false, true, 1),
        (70, 1029, 0.0, false, true, 1),
        (33, 64, 1.0, false, true, 1),
        (133, 300, 0.0, true, true, 1),
        (2, 5, 0.0, true, true, 1),
        (70, 300, 1.0, true, false, 1),
        (6 * 45, 64, 0.0, true, true, 6),
        (4 * 35, 16, 0.0, false, true, 4),
        (3 * 700, 24, 0.0, true, true, 3),
    ] {
        let shift = if centre { 40.0 } else { 0.0 };
        let x: Vec<f32> = rand_vec(&mut rng, rows * d, 3.0)
            .iter()
            .map(|v| v + shift)
            .collect();
        let w = rand_vec(&mut rng, groups * d, 1.5);
        let bias = rand_vec(&mut rng, groups * d, 1.0);
        let dy = rand_vec(&mut rng, rows * d, 1.0);
        let (dx0, dw0, db0) = (
            rand_vec(&mut rng, rows * d, 1.0),
            rand_vec(&mut rng, groups * d, 1.0),
            rand_vec(&mut rng, groups * d, 1.0),
        );
        let norm = NormShape {
            d,
            eps: 1e-6,
            offset,
            centre,
            groups,
        };
        let (xd, wd, bd, dyd) = (up(&dev, &x), up(&dev, &w), up(&dev, &bias), up(&dev, &dy));
        let what = |part: &str| {
            format!("norm {part} {rows}x{d}/{groups} centre={centre} weighted={weighted}")
        };
        let biased = centre && weighted;
        let (w_h, w_d) = (weighted.then_some(&w[..]), weighted.then_some(&*wd));

        let mut want = vec![0f32; rows * d];
        cpu::norm_forward(&x, w_h, biased.then_some(&bias[..]), norm, &mut want);
        let mut y = dev.alloc_zeroed(rows * d).unwrap();
        dev.norm_forward(&xd, w_d, biased.then_some(&bd), norm, &mut y)
            .unwrap();
        assert_close(&what("forward"), &down(&dev, &y), &want, 1e-5);

        let (mut wdx, mut wdw, mut wdb) = (dx0.clone(), dw0.clone(), db0.clone());
        cpu::norm_backward(
            &x,
            w_h,
            norm,
            &dy,
            &mut wdx,
            weighted.then_some(&mut wdw[..]),
            biased.then_some(&mut wdb[..]),
        );
        let (mut dx, mut dw, mut db) = (up(&dev, &dx0), up(&dev, &dw0), up(&dev, &db0));
        dev.norm_backward(
            &xd,
            w_d,
            norm,
            &dyd,
            &mut dx,
            weighted.then_some(&mut dw),
            biased.then_some(&mut db),
        )
        .unwrap();
        assert_close(&what("dx"), &down(&dev, &dx), &wdx, 1e-5);
        let dw_got = down(&dev, &dw);
        assert_close(&what("dw"), &dw_got, &wdw, 1e-5);
        assert_close(&what("db"), &down(&dev, &db), &wdb, 1e-5);
        if !weighted {
            assert_eq!(dw_got, dw0, "no weight: its gradient buffer is untouched");
            continue;
        }
        // The weight gradient is reduced without atomics: the same input gives the same bits.
        let mut dw2 = up(&dev, &dw0);
        let mut dx2 = up(&dev, &dx0);
        dev.norm_backward(&xd, w_d, norm, &dyd, &mut dx2, Some(&mut dw2), None)
            .unwrap();
        assert_eq!(down(&dev, &dw2), dw_got, "norm dw is deterministic");
    }
}

/// Rows scaled by one value each (a mixture-of-experts expert's output by its routing weight) and the
/// backward (accumulating into non-zero gradients; the scales' gradient a dot product per row, reduced in
/// f64 on both sides): rows of one value to rows wider than a block, one row to many, 1e-5; no rows, and
/// lengths that disagree, an error.
#[test]
fn row_scale_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(22);
    for rows in [1usize, 37, 300] {
        for d in [1usize, 3, 67, 4096] {
            let (x, s, dy) = (
                rand_vec(&mut rng, rows * d, 2.0),
                rand_vec(&mut rng, rows, 1.5),
                rand_vec(&mut rng, rows * d, 1.0),
            );
            let (dx0, ds0) = (
                rand_vec(&mut rng, rows * d, 1.0),
                rand_vec(&mut rng, rows, 1.0),
            );
            let (xd, sd, dyd) = (up(&dev, &x), up(&dev, &s), up(&dev, &dy));
            let what = |part: &str| format!("row scale {part} {rows}x{d}");

            let mut want = vec![0f32; rows * d];
            cpu::row_scale_forward(&x, &s, d, &mut want);
            let mut y = dev.alloc_zeroed(rows * d).unwrap();
            dev.row_scale_forward(&xd, &sd, d, &mut y).unwrap();
            assert_close(&what("forward"), &down(&dev, &y), &want, 1e-5);

            let (mut wdx, mut wds) = (dx0.clone(), ds0.clone());
            cpu::row_scale_backward(&x, &s, &dy, d, &mut wdx, &mut wds);
            let (mut dx, mut ds) = (up(&dev, &dx0), up(&dev, &ds0));
            dev.row_scale_backward(&xd, &sd, &dyd, d, &mut dx, &mut ds)
                .unwrap();
            assert_close(&what("dx"), &down(&dev, &dx), &wdx, 1e-5);
            assert_close(&what("ds"), &down(&dev, &ds), &wds, 1e-5);
        }
    }
    // No rows: nothing to do. Rows of no values: the scales' gradient is untouched. (Where the device
    // holds an empty buffer: the emulator does, a GPU's cuMemAlloc may refuse 0 bytes.)
    if let (Ok(mut empty), Ok(none)) = (dev.alloc_zeroed(0), dev.alloc_zeroed(0)) {
        dev.row_scale_forward(&none, &none, 8, &mut empty).unwrap();
        let sd = up(&dev, &[0.5; 3]);
        let mut ds = up(&dev, &[1.0; 3]);
        dev.row_scale_backward(&none, &sd, &none, 0, &mut empty, &mut ds)
            .unwrap();
        assert_eq!(down(&dev, &ds), [1.0; 3]);
    }
    // Lengths that disagree are errors, not launches.
    let (xd, mut y) = (up(&dev, &[1.0; 7]), dev.alloc_zeroed(8).unwrap());
    let (sd, mut ds) = (up(&dev, &[1.0; 2]), up(&dev, &[1.0; 3]));
    assert!(dev.row_scale_forward(&xd, &sd, 4, &mut y).is_err());
    let (xd, dyd, mut dx) = (
        up(&dev, &[1.0; 8]),
        up(&dev, &[1.0; 8]),
        up(&dev, &[0.0; 8]),
    );
    assert!(dev
        .row_scale_backward(&xd, &sd, &dyd, 4, &mut dx, &mut ds)
        .is_err());
}

/// GPT-NeoX's q, k and v gathered out of the fused projection, and scattered back (accumulating).
#[test]
fn column_blocks_match_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(21);
    for (rows, heads, hd) in [(7usize, 3usize, 8usize), (1, 1, 2), (130, 4, 64)] {
        let width = heads * 3 * hd;
        let x = rand_vec(&mut rng, rows * width, 1.0);
        let dy = rand_vec(&mut rng, rows * heads * hd, 1.0);
        let dx0 = rand_vec(&mut rng, rows * width, 1.0);
        let (xd, dyd) = (up(&dev, &x), up(&dev, &dy));
        for part in 0..3 {
            let cb = ColumnBlocks {
                block: hd,
                stride: 3 * hd,
                offset: part * hd,
            };
            let mut want = vec![0f32; rows * heads * hd];
            cpu::column_blocks_forward(&x, width, cb, &mut want);
            let mut y = dev.alloc_zeroed(rows * heads * hd).unwrap();
            dev.column_blocks_forward(&xd, width, cb, &mut y).unwrap();
            assert_eq!(
                down(&dev, &y),
                want,
                "gather {rows}x{heads}x{hd} part {part}"
            );
            let mut want = dx0.clone();
            cpu::column_blocks_backward(&dy, width, cb, &mut want);
            let mut dx = up(&dev, &dx0);
            dev.column_blocks_backward(&dyd, width, cb, &mut dx)
                .unwrap();
            assert_eq!(
                down(&dev, &dx),
                want,
                "scatter {rows}x{heads}x{hd} part {part}"
            );
        }
    }
}

fn inv_freq(hd: usize) -> Vec<f64> {
    (0..hd / 2)
        .map(|i| (1.0 / 10000f32.powf((2 * i) as f32 / hd as f32)) as f64)
        .collect()
}

#[test]
fn rope_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    // Two tables of the same head_dim and different lengths, and one of another head_dim, share the cache;
    // `rot` < head_dim: partial rotary (Phi-3), the last values pass through; a scale (LongRoPE);
    // Cohere's interleaved pairs, full and partial.
    use RopePairs::{Halves, Interleaved};
    for (seqs, tokens, heads, hd, rot, scale, pairs) in [
        (3usize, 11usize, 3usize, 10usize, 10usize, 1.0, Halves),
        (2, 7, 3, 10, 10, 1.0, Halves),
        (1, 5, 2, 64, 64, 1.0, Halves),
        (2, 7, 3, 10, 6, 1.0, Halves),
        (2, 9, 2, 16, 12, 1.19, Halves),
        (2, 7, 3, 10, 10, 1.0, Interleaved),
        (2, 9, 2, 16, 12, 1.19, Interleaved),
    ] {
        let table = RopeTable::with_pairs(&inv_freq(rot), hd, tokens, scale, pairs);
        let n = seqs * tokens * heads * hd;
        let x = rand_vec(&mut rng, n, 2.0);
        let dx0 = rand_vec(&mut rng, n, 1.0);
        let xd = up(&dev, &x);
        let mut want = vec![0f32; n];
        cpu::rope_forward(&x, heads, &table, &mut want);
        let mut y = dev.alloc_zeroed(n).unwrap();
        dev.rope_forward(&xd, heads, &table, &mut y).unwrap();
        let what = format!("rope forward s{seqs} t{tokens} h{heads} d{hd} rot{rot} {pairs:?}");
        assert_close(&what, &down(&dev, &y), &want, 1e-5);

        let mut want = dx0.clone();
        cpu::rope_backward(&x, heads, &table, &mut want);
        let mut dx = up(&dev, &dx0);
        dev.rope_backward(&xd, heads, &table, &mut dx).unwrap();
        let what = format!("rope backward s{seqs} t{tokens} h{heads} d{hd} rot{rot} {pairs:?}");
        assert_close(&what, &down(&dev, &dx), &want, 1e-5);
    }
    // A table of the same (tokens, head_dim) with other frequencies is not served from the cache.
    let (tokens, heads, hd) = (6, 1, 8);
    let a = RopeTable::new(&inv_freq(hd), hd, tokens, 1.0);
    let b = RopeTable::new(
        &inv_freq(hd).iter().map(|f| f / 4.0).collect::<Vec<_>>(),
        hd,
        tokens,
        1.0,
    );
    let x = rand_vec(&mut rng, tokens * heads * hd, 1.0);
    let xd = up(&dev, &x);
    for t in [&a, &b] {
        let mut want = vec![0f32; x.len()];
        cpu::rope_forward(&x, heads, t, &mut want);
        let mut y = dev.alloc_zeroed(x.len()).unwrap();
        dev.rope_forward(&xd, heads, t, &mut y).unwrap();
        assert_close("rope with another table", &down(&dev, &y), &want, 1e-5);
    }
}

#[test]
fn cross_entropy_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    for (rows, vocab) in [(57usize, 1001usize), (3, 5), (9, 32_003)] {
        let logits = rand_vec(&mut rng, rows * vocab, 8.0);
        let targets: Vec<i64> = (0..rows)
            .map(|r| {
                if r % 4 == 3 {
                    -1
                } else {
                    rng.random_range(0..vocab as i64)
                }
            })
            .collect();
        let tids = dev.ids(&targets).unwrap();
        let ld = up(&dev, &logits);

        let mut want_lse = vec![0f32; rows];
        let (ws, wc) = cpu::cross_entropy_forward(&logits, vocab, &targets, &mut want_lse);
        let mut lse = dev.alloc_zeroed(rows).unwrap();
        let (s, c) = dev
            .cross_entropy_forward(&ld, vocab, &tids, &mut lse)
            .unwrap();
        assert_eq!(c, wc);
        assert!(
            rel(s, ws) < 1e-5,
            "cross-entropy {rows}x{vocab}: {s} vs {ws}"
        );
        assert_close("cross-entropy lse", &down(&dev, &lse), &want_lse, 1e-5);
        assert_eq!(
            down(&dev, &ld),
            logits,
            "the forward leaves the logits alone"
        );

        let mut want = logits.clone();
        let mut want_lse = vec![0f32; rows];
        let (ws, wc) = cpu::cross_entropy_forward_grad(&mut want, vocab, &targets, &mut want_lse);
        let mut g = up(&dev, &logits);
        let mut lse = dev.alloc_zeroed(rows).unwrap();
        let (s, c) = dev
            .cross_entropy_forward_grad(&mut g, vocab, &tids, &mut lse)
            .unwrap();
        assert_eq!(c, wc);
        assert!(
            rel(s, ws) < 1e-5,
            "fused cross-entropy {rows}x{vocab}: {s} vs {ws}"
        );
        assert_close(
            "fused cross-entropy lse",
            &down(&dev, &lse),
            &want_lse,
            1e-5,
        );
        let what = format!("fused cross-entropy gradient {rows}x{vocab}");
        assert_close(&what, &down(&dev, &g), &want, 1e-5);
    }
}

#[test]
fn linear_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    // Shapes off the 64 × 64 × 16 tiles in every dimension, a single row, a wide output (m > k).
    for (n, k, m) in [
        (67usize, 93usize, 130usize),
        (1, 16, 64),
        (130, 300, 45),
        (33, 17, 700),
    ] {
        for bias in [false, true] {
            let x = rand_vec(&mut rng, n * k, 1.0);
            let w = rand_vec(&mut rng, m * k, 1.0);
            let b = rand_vec(&mut rng, m, 1.0);
            let dy = rand_vec(&mut rng, n * m, 1.0);
            let (dx0, dw0, db0) = (
                rand_vec(&mut rng, n * k, 1.0),
                rand_vec(&mut rng, m * k, 1.0),
                rand_vec(&mut rng, m, 1.0),
            );
            let (xd, wd, bd, dyd) = (up(&dev, &x), up(&dev, &w), up(&dev, &b), up(&dev, &dy));
            let what = format!("linear n{n} k{k} m{m} bias {bias}");

            let mut want = vec![0f32; n * m];
            cpu::linear_forward(&x, &w, bias.then_some(&b[..]), n, k, m, &mut want);
            let mut y = dev.alloc_zeroed(n * m).unwrap();
            dev.linear_forward(
                &xd,
                &dev.weight_from(&wd).unwrap(),
                bias.then_some(&*bd),
                n,
                k,
                m,
                &mut y,
            )
            .unwrap();
            assert_close(&format!("{what} forward"), &down(&dev, &y), &want, 1e-5);

            let (mut wdx, mut wdw, mut wdb) = (dx0.clone(), dw0.clone(), db0.clone());
            cpu::linear_backward(
                &x,
                &w,
                &dy,
                n,
                k,
                m,
                Some(&mut wdx[..]),
                &mut wdw,
                bias.then_some(&mut wdb[..]),
            );
            let (mut dx, mut dw, mut db) = (up(&dev, &dx0), up(&dev, &dw0), up(&dev, &db0));
            dev.linear_backward(
                &xd,
                &dev.weight_from(&wd).unwrap(),
                &dyd,
                n,
                k,
                m,
                Some(&mut dx),
                &mut dw,
                bias.then_some(&mut *db),
            )
            .unwrap();
            assert_close(&format!("{what} dx"), &down(&dev, &dx), &wdx, 1e-5);
            assert_close(&format!("{what} dw"), &down(&dev, &dw), &wdw, 1e-5);
            let db_got = down(&dev, &db);
            if bias {
                assert_close(&format!("{what} db"), &db_got, &wdb, 1e-5);
            } else {
                assert_eq!(db_got, db0, "{what}: no bias, db untouched");
            }
        }
    }
    // Mismatched shapes are errors, not out-of-bounds accesses.
    let (xd, wd) = (up(&dev, &[0.0; 6]), up(&dev, &[0.0; 6]));
    let mut y = dev.alloc_zeroed(5).unwrap();
    assert!(dev
        .linear_forward(&xd, &dev.weight_from(&wd).unwrap(), None, 2, 3, 2, &mut y)
        .is_err());
}

/// C[M, N] = Σ_r A(i, r) B(r, j) in f64 (test reference), A(i, r) = a[i·lda + r] or a[r·lda + i].
#[allow(clippy::too_many_arguments)]
fn product_f64(
    a: &[f32],
    a_r: bool,
    b: &[f32],
    b_r: bool,
    m: usize,
    n: usize,
    r: usize,
) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for q in 0..r {
                let av = if a_r { a[i * r + q] } else { a[q * m + i] };
                let bv = if b_r { b[j * r + q] } else { b[q * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s;
        }
    }
    c
}

/// The linear kernel choices this run tests (`SGLP_SKIP_WGMMA=1`: not the Hopper one, which
/// scripts/gpu_checks.sh runs in a process of its own).
fn linear_kernels() -> Vec<LinearKernel> {
    let skip = std::env::var("SGLP_SKIP_WGMMA").as_deref() == Ok("1");
    LinearKernel::ALL
        .into_iter()
        .filter(|&k| !(skip && k == LinearKernel::Wgmma))
        .collect()
}

#[test]
fn linear_on_tensor_cores_matches_f64_products_of_bf16_operands() {
    let Some(dev) = gpu_bf16_or_skip() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    for kernel in linear_kernels() {
        dev.set_linear_kernel(kernel);
        let in_use = dev.linear_kernel_in_use();
        eprintln!("{kernel:?} chosen, {in_use:?} in use");
        // Off the 128 × 128 tiles everywhere; one row; several reduction steps and tiles each way. With k
        // and m multiples of 8 the wgmma path takes them (n padded to 8 for dw's reduction), the others
        // fall back to the mma kernels.
        for (n, k, m) in [
            (130usize, 45usize, 140usize),
            (1, 32, 128),
            (300, 520, 264),
            (33, 17, 700),
            (37, 72, 136),
            (130, 200, 8),
        ] {
            let x = rand_vec(&mut rng, n * k, 1.0);
            let w = rand_vec(&mut rng, m * k, 1.0);
            let b = rand_vec(&mut rng, m, 1.0);
            let dy = rand_vec(&mut rng, n * m, 1.0);
            let (dx0, dw0) = (
                rand_vec(&mut rng, n * k, 1.0),
                rand_vec(&mut rng, m * k, 1.0),
            );
            let (xr, wr, dyr) = (round_to_bf16(&x), round_to_bf16(&w), round_to_bf16(&dy));
            let what = format!("bf16 linear ({kernel:?}) n{n} k{k} m{m}");
            let (xd, wd, bd, dyd) = (up(&dev, &x), up(&dev, &w), up(&dev, &b), up(&dev, &dy));
            let wd = dev.weight_from(&wd).unwrap();
            assert!(
                matches!(wd, CudaWeight::Bf16(_)),
                "bf16 mode holds weights as bf16"
            );

            let mut y = dev.alloc_zeroed(n * m).unwrap();
            let ((), launched) =
                kernel_times::record(|| dev.linear_forward(&xd, &wd, Some(&*bd), n, k, m, &mut y))
                    .unwrap();
            let wgmma_ran = launched.iter().any(|t| t.kernel == "linear_wgmma");
            let wgmma_expected =
                in_use == LinearKernel::Wgmma && k.is_multiple_of(8) && m.is_multiple_of(8);
            assert_eq!(wgmma_ran, wgmma_expected, "{what}: kernels {launched:?}");
            let mut want = product_f64(&xr, true, &wr, true, n, m, k);
            for (i, v) in want.iter_mut().enumerate() {
                *v += b[i % m] as f64;
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let got = down(&dev, &y);
            assert_close(&format!("{what} forward"), &got, &want, 1e-5);
            // The rounding happened: the f32 product of the unrounded operands is measurably different.
            let mut exact = vec![0f32; n * m];
            cpu::linear_forward(&x, &w, Some(&b), n, k, m, &mut exact);
            let off = scale_rel(&got, &exact);
            eprintln!("{what}: bf16 vs f32 product {off:.2e}");
            assert!(
                off > 1e-5 && off < 2e-2,
                "{what}: bf16 vs f32 product {off:.2e}"
            );

            let (mut dx, mut dw) = (up(&dev, &dx0), up(&dev, &dw0));
            dev.linear_backward(&xd, &wd, &dyd, n, k, m, Some(&mut dx), &mut dw, None)
                .unwrap();
            let wdx: Vec<f32> = product_f64(&dyr, true, &wr, false, n, k, m)
                .iter()
                .zip(&dx0)
                .map(|(&p, &d0)| (p + d0 as f64) as f32)
                .collect();
            let wdw: Vec<f32> = product_f64(&dyr, false, &xr, false, m, k, n)
                .iter()
                .zip(&dw0)
                .map(|(&p, &d0)| (p + d0 as f64) as f32)
                .collect();
            assert_close(&format!("{what} dx"), &down(&dev, &dx), &wdx, 1e-5);
            assert_close(&format!("{what} dw"), &down(&dev, &dw), &wdw, 1e-5);
            // Without dx (a first layer): dw alone, the same values.
            let mut dw_only = up(&dev, &dw0);
            dev.linear_backward(&xd, &wd, &dyd, n, k, m, None, &mut dw_only, None)
                .unwrap();
            assert_close(
                &format!("{what} dw alone"),
                &down(&dev, &dw_only),
                &wdw,
                1e-5,
            );
        }
    }
    dev.set_linear_kernel(LinearKernel::Mma);
    // The mode switch takes effect at once: f32 products again.
    dev.set_matmul(Matmul::F32);
    let (n, k, m) = (70, 40, 50);
    let (x, w) = (
        rand_vec(&mut rng, n * k, 1.0),
        rand_vec(&mut rng, m * k, 1.0),
    );
    let mut want = vec![0f32; n * m];
    cpu::linear_forward(&x, &w, None, n, k, m, &mut want);
    let mut y = dev.alloc_zeroed(n * m).unwrap();
    let wd = dev.weight_from(&up(&dev, &w)).unwrap();
    assert!(matches!(wd, CudaWeight::F32(_)));
    dev.linear_forward(&up(&dev, &x), &wd, None, n, k, m, &mut y)
        .unwrap();
    assert_close("f32 after bf16", &down(&dev, &y), &want, 1e-5);
}

fn check_attention(dev: &CudaDevice, sh: AttnShape, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = sh.seqs * sh.tokens;
    let (qn, kn) = (
        rows * sh.heads * sh.head_dim,
        rows * sh.kv_heads * sh.head_dim,
    );
    let ln = sh.seqs * sh.heads * sh.tokens;
    let q = rand_vec(&mut rng, qn, 2.0);
    let k = rand_vec(&mut rng, kn, 2.0);
    let v = rand_vec(&mut rng, kn, 1.0);
    let dout = rand_vec(&mut rng, qn, 1.0);
    let (dq0, dk0, dv0) = (
        rand_vec(&mut rng, qn, 1.0),
        rand_vec(&mut rng, kn, 1.0),
        rand_vec(&mut rng, kn, 1.0),
    );
    let what = format!("attention {sh:?}");

    let (mut want_out, mut want_lse) = (vec![0f32; qn], vec![0f32; ln]);
    cpu::attention_forward(&q, &k, &v, sh, &mut want_out, &mut want_lse);
    let (qd, kd, vd, dod) = (up(dev, &q), up(dev, &k), up(dev, &v), up(dev, &dout));
    let (mut out, mut lse) = (dev.alloc_zeroed(qn).unwrap(), dev.alloc_zeroed(ln).unwrap());
    dev.attention_forward(&qd, &kd, &vd, sh, &mut out, &mut lse)
        .unwrap();
    assert_close(&format!("{what} out"), &down(dev, &out), &want_out, 1e-5);
    assert_close(&format!("{what} lse"), &down(dev, &lse), &want_lse, 1e-5);

    // The backward from the CPU's lse, so that only the backward is compared.
    let (mut wdq, mut wdk, mut wdv) = (dq0.clone(), dk0.clone(), dv0.clone());
    cpu::attention_backward(
        &q, &k, &v, &want_lse, &dout, sh, &mut wdq, &mut wdk, &mut wdv,
    );
    let lse_cpu = up(dev, &want_lse);
    let (mut dq, mut dk, mut dv) = (up(dev, &dq0), up(dev, &dk0), up(dev, &dv0));
    dev.attention_backward(&qd, &kd, &vd, &lse_cpu, &dod, sh, &mut dq, &mut dk, &mut dv)
        .unwrap();
    assert_close(&format!("{what} dq"), &down(dev, &dq), &wdq, 5e-5);
    assert_close(&format!("{what} dk"), &down(dev, &dk), &wdk, 5e-5);
    assert_close(&format!("{what} dv"), &down(dev, &dv), &wdv, 5e-5);
}

#[test]
fn attention_on_tensor_cores_is_the_cpus_on_bf16_inputs() {
    let Some(dev) = gpu_bf16_or_skip() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(31);
    // Head dims 64 and 128 (the tensor-core kernel); tokens off the 64-row blocks; GQA; windows of 37
    // and 1 key, and the largest one (none).
    for (seqs, tokens, heads, kv_heads, head_dim, window) in [
        (2usize, 130usize, 4usize, 2usize, 64usize, None),
        (1, 200, 2, 1, 128, Some(37)),
        (1, 65, 2, 2, 64, Some(1)),
        (1, 70, 2, 1, 64, Some(usize::MAX)),
        (3, 17, 8, 8, 128, None),
    ] {
        let sh = AttnShape {
            seqs,
            tokens,
            heads,
            kv_heads,
            head_dim,
            window,
            // Gemma 3's 1/√query_pre_attn_scalar on one shape, 1/√head_dim on the others; Gemma 2's
            // soft-capped scores on two; ALiBi on the 4- and 8-head ones (Falcon-RW's scaled slopes).
            scale: (tokens == 17).then_some(0.0625),
            softcap: (heads == 2).then_some(1.5),
            alibi: (heads >= 4).then_some(Alibi {
                max_bias: 8.0,
                factor: 0.5,
            }),
        };
        let rows = seqs * tokens;
        let (qn, kn, ln) = (
            rows * heads * head_dim,
            rows * kv_heads * head_dim,
            seqs * heads * tokens,
        );
        let (q, k, v) = (
            rand_vec(&mut rng, qn, 2.0),
            rand_vec(&mut rng, kn, 2.0),
            rand_vec(&mut rng, kn, 1.0),
        );
        // The CPU on the rounded inputs: the scores, hence the lse, agree to f32 rounding; the output
        // differs by P's rounding to bf16 before P V.
        let (mut want_out, mut want_lse) = (vec![0f32; qn], vec![0f32; ln]);
        let (qr, kr, vr) = (round_to_bf16(&q), round_to_bf16(&k), round_to_bf16(&v));
        cpu::attention_forward(&qr, &kr, &vr, sh, &mut want_out, &mut want_lse);
        let (mut out, mut lse) = (dev.alloc_zeroed(qn).unwrap(), dev.alloc_zeroed(ln).unwrap());
        let (qd, kd, vd) = (up(&dev, &q), up(&dev, &k), up(&dev, &v));
        dev.attention_forward(&qd, &kd, &vd, sh, &mut out, &mut lse)
            .unwrap();
        let what = format!("bf16 attention {sh:?}");
        assert_close(&format!("{what} lse"), &down(&dev, &lse), &want_lse, 1e-5);
        assert_close(&format!("{what} out"), &down(&dev, &out), &want_out, 1e-2);
        // Not the f32 kernel: the output is off the unrounded attention by about bf16 rounding.
        let mut exact = vec![0f32; qn];
        cpu::attention_forward(&q, &k, &v, sh, &mut exact, &mut vec![0f32; ln]);
        let off = scale_rel(&down(&dev, &out), &exact);
        assert!(off > 1e-5, "{what}: {off:.2e} off the f32 attention");

        // The backward from the CPU's lse, accumulating into random gradients: the CPU's on the
        // rounded inputs, within P's and dS's rounding to bf16 before the products.
        let dout = rand_vec(&mut rng, qn, 1.0);
        let (dq0, dk0, dv0) = (
            rand_vec(&mut rng, qn, 1.0),
            rand_vec(&mut rng, kn, 1.0),
            rand_vec(&mut rng, kn, 1.0),
        );
        let (mut wdq, mut wdk, mut wdv) = (dq0.clone(), dk0.clone(), dv0.clone());
        cpu::attention_backward(
            &qr,
            &kr,
            &vr,
            &want_lse,
            &round_to_bf16(&dout),
            sh,
            &mut wdq,
            &mut wdk,
            &mut wdv,
        );
        let (mut dq, mut dk, mut dv) = (up(&dev, &dq0), up(&dev, &dk0), up(&dev, &dv0));
        let (lse_cpu, dod) = (up(&dev, &want_lse), up(&dev, &dout));
        dev.attention_backward(&qd, &kd, &vd, &lse_cpu, &dod, sh, &mut dq, &mut dk, &mut dv)
            .unwrap();
        // Relative to the gradient's own size (the accumulated random part excluded).
        for (name, got, want, start) in [
            ("dq", down(&dev, &dq), &wdq, &dq0),
            ("dk", down(&dev, &dk), &wdk, &dk0),
            ("dv", down(&dev, &dv), &wdv, &dv0),
        ] {
            let g: Vec<f32> = got.iter().zip(start).map(|(a, b)| a - b).collect();
            let w: Vec<f32> = want.iter().zip(start).map(|(a, b)| a - b).collect();
            assert_close(&format!("{what} {name}"), &g, &w, 2e-2);
        }
    }
}

#[test]
fn attention_matches_the_cpu_causal_windowed_and_gqa() {
    let Some(dev) = gpu_or_skip() else { return };
    let shape = |seqs, tokens, heads, kv_heads, head_dim, window| AttnShape {
        seqs,
        tokens,
        heads,
        kv_heads,
        head_dim,
        window,
        // A scale other than 1/√head_dim (Gemma 3's query_pre_attn_scalar) on the windowed shapes, Gemma
        // 2's soft-capping on the odd-length ones, ALiBi on the 3- and 6-head ones (slopes past the
        // largest power of two).
        scale: window.map(|_| 0.1),
        softcap: (tokens % 2 == 1).then_some(1.5),
        alibi: (heads % 3 == 0).then_some(Alibi {
            max_bias: 8.0,
            factor: 1.0,
        }),
    };
    for (i, sh) in [
        shape(2, 37, 4, 2, 24, None),             // GQA, head_dim below a warp
        shape(1, 70, 6, 2, 72, Some(9)),          // window, head_dim across lanes (72 = 2·32 + 8)
        shape(2, 5, 2, 1, 128, Some(1)),          // a window of one key: each query sees itself
        shape(1, 130, 3, 3, 64, None), // multi-head (no grouping), more than the CPU's 64-row blocks
        shape(3, 17, 8, 1, 16, Some(40)), // a window longer than the sequence, one kv head
        shape(1, 20, 2, 1, 32, Some(usize::MAX)), // "no window" spelled as the largest one
        shape(1, 9, 2, 2, 256, Some(4)), // the largest head_dim
    ]
    .into_iter()
    .enumerate()
    {
        check_attention(&dev, sh, 100 + i as u64);
    }
    // Shapes the kernels do not take are errors.
    let sh = shape(1, 2, 1, 1, 300, None);
    let b = dev.alloc_zeroed(600).unwrap();
    let (mut o, mut l) = (dev.alloc_zeroed(600).unwrap(), dev.alloc_zeroed(2).unwrap());
    assert!(dev
        .attention_forward(&b, &b, &b, sh, &mut o, &mut l)
        .is_err());
}

/// Attention sinks (GPT-OSS, Granite SWA) on an attention's out and lse: the forward (out scaled, lse
/// with the sink's term) and the sinks' gradient (accumulated into non-zero values, f64 sums on both
/// sides), 1e-5; rows across several warps of the backward's block, a head_dim across lanes; lengths
/// that disagree, an error.
#[test]
fn attention_sinks_match_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(41);
    for (seqs, tokens, heads, head_dim) in [(2, 37, 4, 24), (1, 300, 3, 72), (3, 5, 8, 128)] {
        let sh = AttnShape {
            seqs,
            tokens,
            heads,
            kv_heads: 1,
            head_dim,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
        };
        let (n, rows) = (seqs * tokens * heads * head_dim, seqs * heads * tokens);
        let (out, dout) = (rand_vec(&mut rng, n, 1.0), rand_vec(&mut rng, n, 1.0));
        // Log-sum-exps around those of a few keys, sinks on either side of them.
        let lse: Vec<f32> = rand_vec(&mut rng, rows, 1.0)
            .iter()
            .map(|x| x + 1.5)
            .collect();
        let (sinks, ds0) = (
            rand_vec(&mut rng, heads, 2.0),
            rand_vec(&mut rng, heads, 1.0),
        );
        let what = |part: &str| format!("sinks {part} {seqs}x{tokens}x{heads}x{head_dim}");

        let (mut want_out, mut want_lse) = (out.clone(), lse.clone());
        cpu::attention_sinks_forward(&sinks, sh, &mut want_out, &mut want_lse);
        let (mut od, mut ld, sd) = (up(&dev, &out), up(&dev, &lse), up(&dev, &sinks));
        dev.attention_sinks_forward(&sd, sh, &mut od, &mut ld)
            .unwrap();
        assert_close(&what("out"), &down(&dev, &od), &want_out, 1e-5);
        assert_close(&what("lse"), &down(&dev, &ld), &want_lse, 1e-5);

        let mut want_ds = ds0.clone();
        cpu::attention_sinks_backward(&want_out, &dout, &want_lse, &sinks, sh, &mut want_ds);
        let (dod, mut ds) = (up(&dev, &dout), up(&dev, &ds0));
        dev.attention_sinks_backward(&od, &dod, &ld, &sd, sh, &mut ds)
            .unwrap();
        assert_close(&what("dsinks"), &down(&dev, &ds), &want_ds, 1e-5);
        assert!(
            scale_rel(&down(&dev, &ds), &ds0) > 1e-3,
            "the gradient moved"
        );

        // A sink count that is not the head count is an error, not a launch.
        let short = up(&dev, &sinks[..heads - 1]);
        assert!(dev
            .attention_sinks_forward(&short, sh, &mut od, &mut ld)
            .is_err());
    }
}

// ---------------------------------------------------------------------------------------------------------
// A whole decoder (Model, the fixture qwen2_sliding) on the GPU against the CPU
// ---------------------------------------------------------------------------------------------------------

/// (loss, hidden states, per-group gradient norms) of one forward + backward of `model` on `dev`: the
/// decoder as `Model` builds it, the same code path as `gradnorm`.
fn run_model<D: Device>(dev: &D, model: &Model, tokens: &Tokens) -> (f64, Vec<Vec<f32>>, Vec<f64>) {
    let mut hidden = vec![Vec::new(); model.num_layers() + 1];
    let g = model
        .grad_norms_on(dev, &mut Pool::default(), tokens, &[], &mut |i, h| {
            dev.download(h, &mut hidden[i]).unwrap();
        })
        .unwrap();
    let mut norms = g.per_layer.clone();
    norms.extend([g.embed_tokens, g.norm]);
    norms.extend(g.lm_head);
    (g.loss, hidden, norms)
}

/// Tolerances (loss, hidden states, gradient norms) of a decoder on `dev` against the CPU's f32.
fn model_tolerances(dev: &CudaDevice) -> (f64, f64, f64) {
    match dev.matmul() {
        Matmul::F32 => (1e-5, 1e-5, 1e-4),
        Matmul::Bf16 => (1e-2, 5e-2, 5e-2),
    }
}

fn check_model_against_cpu(dev: &CudaDevice, model: &Model, tokens: &Tokens, what: &str) {
    check_model_against_cpu_with(dev, model, tokens, what, true)
}

/// As [`check_model_against_cpu`]; `hidden` false skips the hidden states' comparison (a mixture of
/// experts with bf16 products: a token whose router logits are closer than bf16's rounding may go to
/// another expert than on the CPU, as it would in PyTorch, which moves that token's hidden state by
/// more than the rounding; the loss averages it out, a layer's gradient norm less so on a fixture of
/// 32-wide tokens: up to 6% measured on FlexOlmo's, whose norm after the mixture rescales the flipped
/// tokens' outputs, so 10% there).
fn check_model_against_cpu_with(
    dev: &CudaDevice,
    model: &Model,
    tokens: &Tokens,
    what: &str,
    hidden: bool,
) {
    let (tol_loss, tol_hidden, tol_norm) = model_tolerances(dev);
    let tol_norm = if hidden { tol_norm } else { tol_norm.max(0.1) };
    let (loss_c, hid_c, gn_c) = run_model(&Cpu, model, tokens);
    let (loss_g, hid_g, gn_g) = run_model(dev, model, tokens);
    eprintln!("{what}: loss {loss_g} vs {loss_c}");
    assert!(
        rel(loss_g, loss_c) < tol_loss,
        "{what}: loss {loss_g} vs {loss_c}"
    );
    for (i, (g, w)) in hid_g.iter().zip(&hid_c).enumerate().filter(|_| hidden) {
        assert_close(&format!("{what}: hidden {i}"), g, w, tol_hidden);
    }
    for (grp, (&g, &w)) in gn_g.iter().zip(&gn_c).enumerate() {
        eprintln!("{what}: group {grp} gradient norm {g:.6e} vs {w:.6e}");
        assert!(
            rel(g, w) < tol_norm,
            "{what}: group {grp} gradient norm {g} vs {w}"
        );
    }
}

/// Fixture `name`'s directory, its model (on the CPU) and its calibration tokens.
fn fixture_model(name: &str) -> (std::path::PathBuf, Model, Tokens) {
    let dir = common::fixture(name);
    let model = Model::load(&dir).unwrap();
    let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
    (dir, model, tokens)
}

/// (name, elements, read as a linear weight) of each tensor of a fixture's checkpoint.
fn linear_weight_shapes(dir: &std::path::Path) -> Vec<(String, usize, bool)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let linear = t.shape().len() == 2 && !name.contains("embed_tokens");
            (name, t.shape().iter().product::<usize>(), linear)
        })
        .collect()
}

/// f32 bytes of each tensor of the fixture's checkpoint (what the device holds once converted).
fn tensor_bytes(dir: &std::path::Path) -> HashMap<String, usize> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, t.shape().iter().product::<usize>() * 4))
        .collect()
}

#[test]
fn a_decoder_on_the_gpu_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    // Qwen2, 3 layers, 4 query heads over 2 KV heads, q/k/v biases, sliding windows of 5 on layers 1–2
    // over 16-token sequences: the decoder as Model builds it, on both devices.
    let (dir, model, tokens) = fixture_model("qwen2_sliding");
    let sizes = tensor_bytes(&dir);
    check_model_against_cpu(&dev, &model, &tokens, "resident weights");
    let (resident, bytes, uploads) = dev.weight_stats().unwrap();
    let total: usize = sizes.values().sum();
    assert_eq!(
        (resident, bytes, uploads),
        (sizes.len(), total, sizes.len()),
        "with room for all, every weight is uploaded once"
    );
    // A second step with the same weights uploads nothing.
    check_model_against_cpu(&dev, &model, &tokens, "cached weights");
    assert_eq!(dev.weight_stats().unwrap().2, sizes.len());

    // A budget of about two layers: the device keeps a window of groups, prefetched one ahead, and
    // evicts the rest; the results do not change.
    let layer_bytes: usize = sizes
        .iter()
        .filter(|(k, _)| k.starts_with("model.layers.0."))
        .map(|(_, &b)| b)
        .sum();
    dev.clear_weights().unwrap();
    dev.set_weight_budget(2 * layer_bytes).unwrap();
    let before = dev.weight_stats().unwrap().2;
    check_model_against_cpu(&dev, &model, &tokens, "windowed weights");
    let (_, bytes, after) = dev.weight_stats().unwrap();
    let uploads = after - before;
    assert!(
        uploads > sizes.len(),
        "the backward re-uploads evicted layers ({uploads} uploads)"
    );
    assert!(
        bytes < total,
        "not every weight stays resident ({bytes} of {total} bytes)"
    );
}

#[test]
fn a_decoder_with_bf16_products_stays_within_bf16_tolerances_and_is_repeatable() {
    let Some(dev) = gpu_bf16_or_skip() else {
        return;
    };
    let (dir, model, tokens) = fixture_model("qwen2_sliding");
    // Every linear of this model (widths 16 to 128, q/k/v biases) has k and m multiples of 8: with
    // LinearKernel::Wgmma on Hopper all its products go through linear_wgmma.
    for kernel in linear_kernels() {
        dev.set_linear_kernel(kernel);
        let what = format!("bf16 products ({:?})", dev.linear_kernel_in_use());
        check_model_against_cpu(&dev, &model, &tokens, &what);
        // Deterministic kernels: the same step twice gives the same bits (all but the embedding's
        // norm, whose backward adds repeated tokens' rows with atomics).
        let (l1, h1, mut g1) = run_model(&dev, &model, &tokens);
        let (l2, h2, mut g2) = run_model(&dev, &model, &tokens);
        assert_eq!(l1.to_bits(), l2.to_bits(), "{what}");
        assert_eq!(h1, h2, "{what}");
        g1.remove(model.num_layers());
        g2.remove(model.num_layers());
        assert_eq!(g1, g2, "{what}");
    }
    dev.set_linear_kernel(LinearKernel::Mma);
    // Linear weights are held once, as bf16 (2 bytes); norms, biases and the embedding as f32.
    let expected: usize = linear_weight_shapes(&dir)
        .iter()
        .map(|(_, elems, linear)| elems * if *linear { 2 } else { 4 })
        .sum();
    let (resident, bytes, _) = dev.weight_stats().unwrap();
    assert_eq!(resident, linear_weight_shapes(&dir).len());
    assert_eq!(bytes, expected, "bf16 linear weights, f32 values");
}

#[test]
fn a_tied_decoder_with_bf16_products_holds_the_embedding_twice() {
    let Some(dev) = gpu_bf16_or_skip() else {
        return;
    };
    // Tied embeddings: the table is read as f32 values by the embedding and as a bf16 weight by the
    // lm_head; both copies are cached, under the same parameter name.
    let (dir, model, tokens) = fixture_model("llama_bf16_tied");
    check_model_against_cpu(&dev, &model, &tokens, "tied, bf16 products");
    let shapes = linear_weight_shapes(&dir);
    let embed = shapes
        .iter()
        .find(|(n, _, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1;
    let expected: usize = shapes
        .iter()
        .map(|(_, e, linear)| e * if *linear { 2 } else { 4 })
        .sum::<usize>()
        + embed * 2;
    assert_eq!(dev.weight_stats().unwrap().0, shapes.len() + 1);
    assert_eq!(dev.weight_stats().unwrap().1, expected);
}

/// The qwen2_sliding fixture with its passes on GPU 0 (f32 products), or None without a GPU.
fn fixture_on_gpu() -> Option<(Model, Model, Tokens)> {
    gpu_or_skip()?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_sliding");
    let cpu = Model::load(&dir).unwrap();
    let mut gpu = Model::load(&dir).unwrap();
    let (runner, note) = sglp_engine::runtime::device::open_runtime(
        sglp_engine::similarity::device::DeviceChoice::Cuda(0),
        Matmul::F32,
    )
    .unwrap();
    assert!(note.is_none());
    gpu.set_device(runner);
    let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
    Some((cpu, gpu, tokens))
}

#[test]
fn layer_outputs_reach_a_device_sink_as_one_batch() {
    let Some((cpu, gpu, tokens)) = fixture_on_gpu() else {
        return;
    };
    let mut want = vec![Vec::new(); cpu.num_layers() + 1];
    let loss = cpu
        .forward(&tokens, &[], Some(&mut |i, h| want[i] = h.to_vec()))
        .unwrap();
    let backend = sglp_engine::similarity::cuda::CudaBackend::open(0).unwrap();
    for grads in [false, true] {
        let mut got = None;
        let pass = gpu
            .pass_to_device(&tokens, grads, 0, &mut |db| {
                // SAFETY: pass_to_device's promise: the outputs on GPU 0, written, valid in the call.
                got = Some(unsafe { backend.download(db) }.unwrap());
                Ok(())
            })
            .unwrap()
            .expect("a model on GPU 0 hands its outputs over");
        assert!(rel(pass.loss, loss) < 1e-5, "{} vs {loss}", pass.loss);
        assert_eq!(pass.grads.is_some(), grads);
        let got = got.expect("the sink ran");
        assert_eq!(got.rows, tokens.sequences * tokens.len);
        assert_eq!(got.layers.len(), cpu.num_layers());
        for (l, layer) in got.layers.iter().enumerate() {
            let vals: Vec<f32> = layer
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_close(&format!("device output {l}"), &vals, &want[l + 1], 1e-5);
        }
    }
    // Another GPU, or the CPU: no device pass (the caller reads the hidden states on the host).
    assert!(gpu
        .pass_to_device(&tokens, false, 7, &mut |_| Ok(()))
        .unwrap()
        .is_none());
    assert!(cpu
        .pass_to_device(&tokens, false, 0, &mut |_| Ok(()))
        .unwrap()
        .is_none());
}

#[test]
fn a_calibration_pass_on_the_gpu_feeds_the_cuda_cka_in_place() {
    use sglp_engine::pruning::calibration::{calibration_pass, Needs, PassOptions};
    use sglp_engine::similarity::{CkaSpec, Estimator};
    let Some((cpu, gpu, tokens)) = fixture_on_gpu() else {
        return;
    };
    // Batches of 12 samples over passes of 2 sequences (32 rows, then 16): the accumulator's head and
    // tail rows go through the host, whole batches straight from the model's memory.
    let opts = PassOptions {
        cka: CkaSpec {
            estimator: Estimator::Unbiased,
            batch_size: 12,
            ..CkaSpec::default()
        },
        forward_batch: 2,
        gradnorm_batches: Some(1),
        prefix_cache: None,
    };
    let needs = Needs {
        cka: true,
        gradnorm: true,
        ..Needs::default()
    };
    let mut cpu_backend = sglp_engine::similarity::cpu::CpuBackend::new(2);
    let want = calibration_pass(&cpu, &tokens, needs, &opts, &mut cpu_backend).unwrap();
    let mut backend = sglp_engine::similarity::cuda::CudaBackend::open(0).unwrap();
    let got = calibration_pass(&gpu, &tokens, needs, &opts, &mut backend).unwrap();
    let (w, g) = (want.cka.unwrap(), got.cka.unwrap());
    assert_eq!((g.n_samples, g.n_batches), (w.n_samples, w.n_batches));
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
    for (rw, rg) in w.cka.iter().zip(&g.cka) {
        for (a, b) in rw.iter().zip(rg) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!((a - b).abs() < 1e-4, "CKA {b} vs cpu {a}");
        }
    }
    let (wg, gg) = (want.gradnorm.unwrap(), got.gradnorm.unwrap());
    for (a, b) in wg.per_layer.iter().zip(&gg.per_layer) {
        assert!(rel(*b, *a) < 1e-4, "gradient norm {b} vs cpu {a}");
    }
}

#[test]
fn cka_of_a_capture_on_the_gpu_reads_the_hidden_states_in_place() {
    use sglp_engine::io::TokenMode;
    use sglp_engine::runtime::CaptureSource;
    use sglp_engine::similarity::{compute_cka, CkaSpec, Estimator};
    let Some((cpu, gpu, tokens)) = fixture_on_gpu() else {
        return;
    };
    let spec = CkaSpec {
        estimator: Estimator::Unbiased,
        batch_size: 12,
        ..CkaSpec::default()
    };
    let mut cpu_backend = sglp_engine::similarity::cpu::CpuBackend::new(2);
    let want = compute_cka(
        &mut CaptureSource::new(&cpu, &tokens, 2, TokenMode::Samples),
        &spec,
        &mut cpu_backend,
    )
    .unwrap();
    let mut backend = sglp_engine::similarity::cuda::CudaBackend::open(0).unwrap();
    let got = compute_cka(
        &mut CaptureSource::new(&gpu, &tokens, 2, TokenMode::Samples),
        &spec,
        &mut backend,
    )
    .unwrap();
    assert_eq!(
        (got.n_samples, got.n_batches),
        (want.n_samples, want.n_batches)
    );
    assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    for (rw, rg) in want.cka.iter().zip(&got.cka) {
        for (a, b) in rw.iter().zip(rg) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!((a - b).abs() < 1e-4, "CKA {b} vs cpu {a}");
        }
    }
}

#[test]
fn opening_without_a_gpu_is_an_error_not_a_panic() {
    // Runs everywhere: without a driver or GPU, `open` returns an error; with one, a missing ordinal does.
    let e = CudaDevice::open(1 << 20).expect_err("no GPU 1048576");
    assert!(!e.to_string().is_empty());
}

/// Every decoder fixture (`common::DECODER_FIXTURES`), each with f32 products, then bf16; among them:
/// * qwen3: RMSNorm over each 16-wide head of q and k (rows of head_dim inside the projections' rows),
///   head_dim ≠ hidden / heads, biases on q/k/v/o, tied embeddings;
/// * phi3: q/k/v and gate/up read as row blocks of the fused tensors (each uploaded under its own name),
///   12 of 16 values of each head rotated with LongRoPE's long factors and attention factor, a window
///   of 5 on every layer, a padding row in the embedding's backward;
/// * gemma: the embedding scaled by √hidden (rounded to bf16), norms × (1 + w), the tanh-GELU gate;
/// * gemma3_text: sandwich norms, per-head q/k norms, 1/√query_pre_attn_scalar on the scores, two
///   rotary tables (by layer kind), windows by sliding_window_pattern;
/// * gemma2: soft-capped attention scores and logits, windows on the even layers;
/// * olmo2: norms after the attention and the MLP only, q/k norms over the whole projections;
/// * mixtral, qwen2_moe, qwen3_moe, olmoe: sparse mixtures of experts (rows gathered per expert by the
///   embedding kernels, weighted by `row_scale`, scattered back; Qwen2-MoE's sigmoid-gated shared
///   expert), dense layers among sparse ones;
/// * gpt2: learned positions (the embedding kernels on position ids), no rotary, Conv1D weights read
///   transposed; opt: learned positions from row 2, the ReLU MLP, a padding row;
/// * olmo3: YaRN on the full-attention layer only; smollm3: NoPE layers, dynamic NTK; stablelm:
///   LayerNorms, partial rotary, the parallel residual; cohere, cohere2: interleaved rotary pairs, the
///   bias-free shared LayerNorm, logit_scale, rotary on the windowed layers only.
#[test]
fn decoder_families_match_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    for name in common::DECODER_FIXTURES {
        let (_, model, tokens) = fixture_model(name);
        for matmul in [Matmul::F32, Matmul::Bf16] {
            dev.set_matmul(matmul);
            let hidden = matmul == Matmul::F32 || model.config.moe.is_none();
            check_model_against_cpu_with(
                &dev,
                &model,
                &tokens,
                &format!("{name}, {matmul:?} products"),
                hidden,
            );
        }
    }
}
