//! The runtime's CUDA device (`runtime::ops::cuda::CudaDevice`) against its CPU twins (the free functions
//! of `runtime::ops::cpu`) on fresh random inputs of awkward shapes, op by op, then a whole
//! `Tape<CudaDevice>` forward + backward against `Tape<Cpu>` on a tiny random decoder (GQA, q/k/v biases,
//! one sliding-window layer), with the whole model resident and with a weight budget small enough that the
//! device keeps only a window of layers (prefetched one group ahead).
//!
//! Without a usable GPU every test prints why and passes, unless `SGLP_REQUIRE_GPU=1`, where a missing GPU
//! is a failure.
//!
//! Errors are scale-relative, max |gpu − cpu| / max |cpu| over a tensor, as in tests/runtime_fixtures.rs.
//! Tolerances: 1e-5 for the elementwise, row-wise (f64 row sums on both sides), embedding, rotary and
//! cross-entropy ops and the f32 GEMMs of the linear layer (f32 sums in another order); attention
//! forward 1e-5, its backward 5e-5 (the probabilities are recomputed from the f32 log-sum-exp and the
//! scores summed in another order); the decoder's loss and hidden states 1e-5, gradient norms 1e-4.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sglp_engine::runtime::ops::cuda::CudaDevice;
use sglp_engine::runtime::ops::{cpu, AttnShape, Device, RopeTable};
use sglp_engine::runtime::tape::{op, Cpu, ParamStore, Pool, Tape};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

fn gpu_or_skip() -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
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

        let mut want = vec![0f32; n];
        let mut y = dev.alloc_zeroed(n).unwrap();
        cpu::silu_forward(&x, &mut want);
        dev.silu_forward(&xd, &mut y).unwrap();
        assert_close(&format!("silu forward n={n}"), &down(&dev, &y), &want, 1e-5);

        // Backwards accumulate: start from non-zero gradients.
        let mut want = dx0.clone();
        let mut dx = up(&dev, &dx0);
        cpu::silu_backward(&x, &g, &mut want);
        dev.silu_backward(&xd, &gd, &mut dx).unwrap();
        assert_close(
            &format!("silu backward n={n}"),
            &down(&dev, &dx),
            &want,
            1e-5,
        );

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

    let mut want = vec![0f32; rows * dim];
    cpu::embedding_forward(&ids, &table, dim, &mut want);
    let mut out = dev.alloc_zeroed(rows * dim).unwrap();
    dev.embedding_forward(&dids, &td, dim, &mut out).unwrap();
    assert_eq!(down(&dev, &out), want, "a gather is exact");

    let mut want = dt0.clone();
    cpu::embedding_backward(&ids, &dout, dim, &mut want);
    let mut dt = up(&dev, &dt0);
    dev.embedding_backward(&dids, &dd, dim, &mut dt).unwrap();
    assert_close("embedding backward", &down(&dev, &dt), &want, 1e-5);

    // An id outside the table is an error, not an out-of-bounds read.
    let bad = dev.ids(&[0, vocab as i64]).unwrap();
    let mut out2 = dev.alloc_zeroed(2 * dim).unwrap();
    assert!(dev.embedding_forward(&bad, &td, dim, &mut out2).is_err());
}

#[test]
fn rmsnorm_matches_the_cpu() {
    let Some(dev) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, d) in [(133usize, 300usize), (1, 7), (70, 1029)] {
        let x: Vec<f32> = rand_vec(&mut rng, rows * d, 3.0);
        let w = rand_vec(&mut rng, d, 1.5);
        let dy = rand_vec(&mut rng, rows * d, 1.0);
        let (dx0, dw0) = (
            rand_vec(&mut rng, rows * d, 1.0),
            rand_vec(&mut rng, d, 1.0),
        );
        let eps = 1e-6;
        let (xd, wd, dyd) = (up(&dev, &x), up(&dev, &w), up(&dev, &dy));

        let mut want = vec![0f32; rows * d];
        cpu::rmsnorm_forward(&x, &w, d, eps, &mut want);
        let mut y = dev.alloc_zeroed(rows * d).unwrap();
        dev.rmsnorm_forward(&xd, &wd, d, eps, &mut y).unwrap();
        assert_close(
            &format!("rmsnorm forward {rows}x{d}"),
            &down(&dev, &y),
            &want,
            1e-5,
        );

        let (mut wdx, mut wdw) = (dx0.clone(), dw0.clone());
        cpu::rmsnorm_backward(&x, &w, &dy, d, eps, &mut wdx, &mut wdw);
        let (mut dx, mut dw) = (up(&dev, &dx0), up(&dev, &dw0));
        dev.rmsnorm_backward(&xd, &wd, &dyd, d, eps, &mut dx, &mut dw)
            .unwrap();
        assert_close(
            &format!("rmsnorm dx {rows}x{d}"),
            &down(&dev, &dx),
            &wdx,
            1e-5,
        );
        let dw_got = down(&dev, &dw);
        assert_close(&format!("rmsnorm dw {rows}x{d}"), &dw_got, &wdw, 1e-5);
        // The weight gradient is reduced without atomics: the same input gives the same bits.
        let mut dw2 = up(&dev, &dw0);
        let mut dx2 = up(&dev, &dx0);
        dev.rmsnorm_backward(&xd, &wd, &dyd, d, eps, &mut dx2, &mut dw2)
            .unwrap();
        assert_eq!(down(&dev, &dw2), dw_got, "rmsnorm dw is deterministic");
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
    // Two tables of the same head_dim and different lengths, and one of another head_dim, share the cache.
    for (seqs, tokens, heads, hd) in [
        (3usize, 11usize, 3usize, 10usize),
        (2, 7, 3, 10),
        (1, 5, 2, 64),
    ] {
        let table = RopeTable::new(&inv_freq(hd), tokens, 1.0);
        let n = seqs * tokens * heads * hd;
        let x = rand_vec(&mut rng, n, 2.0);
        let dx0 = rand_vec(&mut rng, n, 1.0);
        let xd = up(&dev, &x);
        let mut want = vec![0f32; n];
        cpu::rope_forward(&x, heads, &table, &mut want);
        let mut y = dev.alloc_zeroed(n).unwrap();
        dev.rope_forward(&xd, heads, &table, &mut y).unwrap();
        let what = format!("rope forward s{seqs} t{tokens} h{heads} d{hd}");
        assert_close(&what, &down(&dev, &y), &want, 1e-5);

        let mut want = dx0.clone();
        cpu::rope_backward(&x, heads, &table, &mut want);
        let mut dx = up(&dev, &dx0);
        dev.rope_backward(&xd, heads, &table, &mut dx).unwrap();
        let what = format!("rope backward s{seqs} t{tokens} h{heads} d{hd}");
        assert_close(&what, &down(&dev, &dx), &want, 1e-5);
    }
    // A table of the same (tokens, head_dim) with other frequencies is not served from the cache.
    let (tokens, heads, hd) = (6, 1, 8);
    let a = RopeTable::new(&inv_freq(hd), tokens, 1.0);
    let b = RopeTable::new(
        &inv_freq(hd).iter().map(|f| f / 4.0).collect::<Vec<_>>(),
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
            dev.linear_forward(&xd, &wd, bias.then_some(&*bd), n, k, m, &mut y)
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
                &wd,
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
    assert!(dev.linear_forward(&xd, &wd, None, 2, 3, 2, &mut y).is_err());
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
fn attention_matches_the_cpu_causal_windowed_and_gqa() {
    let Some(dev) = gpu_or_skip() else { return };
    let shape = |seqs, tokens, heads, kv_heads, head_dim, window| AttnShape {
        seqs,
        tokens,
        heads,
        kv_heads,
        head_dim,
        window,
    };
    for (i, sh) in [
        shape(2, 37, 4, 2, 24, None),     // GQA, head_dim below a warp
        shape(1, 70, 6, 2, 72, Some(9)),  // window, head_dim across lanes (72 = 2·32 + 8)
        shape(2, 5, 2, 1, 128, Some(1)),  // a window of one key: each query sees itself
        shape(1, 130, 3, 3, 64, None), // multi-head (no grouping), more than the CPU's 64-row blocks
        shape(3, 17, 8, 1, 16, Some(40)), // a window longer than the sequence, one kv head
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

// ---------------------------------------------------------------------------------------------------------
// A whole tape: a tiny random decoder on the GPU against the same tape on the CPU
// ---------------------------------------------------------------------------------------------------------

struct Store(HashMap<String, Vec<f32>>);

impl ParamStore for Store {
    fn param(&self, name: &str) -> sglp_engine::Result<Cow<'_, [f32]>> {
        self.0
            .get(name)
            .map(|v| Cow::Borrowed(&v[..]))
            .ok_or_else(|| sglp_engine::Error::invalid(format!("no parameter {name}")))
    }
}

/// A llama-style decoder: 3 layers, 4 query heads over 2 kv heads of 12, q/k/v biases, layer 1 with a
/// sliding window of 3 keys.
struct Tiny {
    vocab: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    layers: usize,
    window_layer: usize,
    window: usize,
    seqs: usize,
    tokens: usize,
}

const TINY: Tiny = Tiny {
    vocab: 50,
    hidden: 48,
    heads: 4,
    kv_heads: 2,
    head_dim: 12,
    inter: 80,
    layers: 3,
    window_layer: 1,
    window: 3,
    seqs: 2,
    tokens: 9,
};

fn tiny_store(c: &Tiny, seed: u64) -> Store {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = HashMap::new();
    let (h, qd, kvd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let mut put = |name: String, len: usize, scale: f32, offset: f32| {
        let v = (0..len)
            .map(|_| offset + rng.random_range(-scale..scale))
            .collect();
        m.insert(name, v);
    };
    put("model.embed_tokens.weight".into(), c.vocab * h, 1.0, 0.0);
    put("model.norm.weight".into(), h, 0.2, 1.0);
    put("lm_head.weight".into(), c.vocab * h, 0.2, 0.0);
    for l in 0..c.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        put(p("input_layernorm.weight"), h, 0.2, 1.0);
        put(p("post_attention_layernorm.weight"), h, 0.2, 1.0);
        for (name, out, inp, bias) in [
            ("self_attn.q_proj", qd, h, true),
            ("self_attn.k_proj", kvd, h, true),
            ("self_attn.v_proj", kvd, h, true),
            ("self_attn.o_proj", h, qd, false),
            ("mlp.gate_proj", c.inter, h, false),
            ("mlp.up_proj", c.inter, h, false),
            ("mlp.down_proj", h, c.inter, false),
        ] {
            let s = 1.0 / (inp as f32).sqrt();
            put(p(&format!("{name}.weight")), out * inp, s, 0.0);
            if bias {
                put(p(&format!("{name}.bias")), out, 0.1, 0.0);
            }
        }
    }
    Store(m)
}

/// The decoder's tape on `dev`, as runtime/model.rs builds it (groups: layer l → l, embedding → L,
/// final norm → L + 1, lm_head → L + 2).
fn tiny_tape<D: Device>(dev: D, c: &Tiny, ids: &[i64]) -> Tape<D> {
    let (n, h, t) = (c.seqs * c.tokens, c.hidden, c.tokens);
    let targets = (0..n)
        .map(|r| if r % t + 1 < t { ids[r + 1] } else { -1 })
        .collect();
    let mut tape = Tape::on(dev, ids.to_vec(), targets, Pool::default());
    let rope = Arc::new(RopeTable::new(&inv_freq(c.head_dim), t, 1.0));
    let nl = c.layers;
    let embed = tape.param("model.embed_tokens.weight", nl, c.vocab * h);
    let mut x = tape.buffer("embed", n, h);
    tape.push(op::Embedding {
        table: embed,
        out: x,
    });
    tape.mark(0, x);
    let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    for l in 0..nl {
        let pre = format!("model.layers.{l}");
        let shape = AttnShape {
            seqs: c.seqs,
            tokens: t,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            window: (l == c.window_layer).then_some(c.window),
        };
        let linear = |tape: &mut Tape<D>, x, name: &str, inp: usize, out: usize, bias: bool| {
            let w = tape.param(format!("{pre}.{name}.weight"), l, out * inp);
            let b = bias.then(|| tape.param(format!("{pre}.{name}.bias"), l, out));
            let y = tape.buffer(format!("{pre}.{name}"), n, out);
            tape.push(op::Linear { x, w, b, out: y });
            y
        };
        let rms = |tape: &mut Tape<D>, x, name: &str| {
            let w = tape.param(format!("{pre}.{name}.weight"), l, h);
            let y = tape.buffer(format!("{pre}.{name}"), n, h);
            tape.push(op::RmsNorm {
                x,
                w,
                eps: 1e-6,
                out: y,
            });
            y
        };
        let a = rms(&mut tape, x, "input_layernorm");
        let q = linear(&mut tape, a, "self_attn.q_proj", h, qd, true);
        let k = linear(&mut tape, a, "self_attn.k_proj", h, kvd, true);
        let v = linear(&mut tape, a, "self_attn.v_proj", h, kvd, true);
        let qr = tape.buffer(format!("{pre}.q_rope"), n, qd);
        tape.push(op::Rope {
            x: q,
            heads: c.heads,
            table: rope.clone(),
            out: qr,
        });
        let kr = tape.buffer(format!("{pre}.k_rope"), n, kvd);
        tape.push(op::Rope {
            x: k,
            heads: c.kv_heads,
            table: rope.clone(),
            out: kr,
        });
        let att = tape.buffer(format!("{pre}.attn"), n, qd);
        let lse = tape.buffer(format!("{pre}.attn_lse"), c.seqs * c.heads, t);
        tape.push(op::Attention {
            q: qr,
            k: kr,
            v,
            shape,
            out: att,
            lse,
        });
        let o = linear(&mut tape, att, "self_attn.o_proj", qd, h, false);
        let x1 = tape.buffer(format!("{pre}.resid_attn"), n, h);
        tape.push(op::Add {
            a: x,
            b: o,
            out: x1,
        });
        let b = rms(&mut tape, x1, "post_attention_layernorm");
        let gate = linear(&mut tape, b, "mlp.gate_proj", h, c.inter, false);
        let up = linear(&mut tape, b, "mlp.up_proj", h, c.inter, false);
        let act = tape.buffer(format!("{pre}.mlp.act"), n, c.inter);
        tape.push(op::Silu { x: gate, out: act });
        let mm = tape.buffer(format!("{pre}.mlp.mul"), n, c.inter);
        tape.push(op::Mul {
            a: act,
            b: up,
            out: mm,
        });
        let d = linear(&mut tape, mm, "mlp.down_proj", c.inter, h, false);
        let x2 = tape.buffer(format!("{pre}.out"), n, h);
        tape.push(op::Add {
            a: x1,
            b: d,
            out: x2,
        });
        x = x2;
        tape.mark(l + 1, x);
    }
    let norm = tape.param("model.norm.weight", nl + 1, h);
    let xn = tape.buffer("norm", n, h);
    tape.push(op::RmsNorm {
        x,
        w: norm,
        eps: 1e-6,
        out: xn,
    });
    let head = tape.param("lm_head.weight", nl + 2, c.vocab * h);
    let logits = tape.buffer("logits", n, c.vocab);
    tape.push(op::Linear {
        x: xn,
        w: head,
        b: None,
        out: logits,
    });
    let lse = tape.buffer("logits_lse", n, 1);
    tape.push(op::CrossEntropy { logits, lse });
    tape
}

/// (loss, hidden states, per-group sums of squared gradients) of one forward + backward.
fn run_tiny<D: Device>(
    dev: D,
    c: &Tiny,
    store: &Store,
    ids: &[i64],
) -> (f64, Vec<Vec<f32>>, Vec<f64>) {
    let mut tape = tiny_tape(dev.clone(), c, ids);
    let mut hidden = vec![Vec::new(); c.layers + 1];
    let loss = tape
        .forward(store, true, &mut |i, h| {
            dev.download(h, &mut hidden[i]).unwrap();
        })
        .unwrap();
    let sumsq = tape.backward(store, c.layers + 3).unwrap();
    (loss, hidden, sumsq)
}

fn check_tiny_against_cpu(dev: CudaDevice, c: &Tiny, store: &Store, ids: &[i64], what: &str) {
    let (loss_c, hid_c, sq_c) = run_tiny(Cpu, c, store, ids);
    let (loss_g, hid_g, sq_g) = run_tiny(dev, c, store, ids);
    assert!(
        rel(loss_g, loss_c) < 1e-5,
        "{what}: loss {loss_g} vs {loss_c}"
    );
    for (i, (g, w)) in hid_g.iter().zip(&hid_c).enumerate() {
        assert_close(&format!("{what}: hidden {i}"), g, w, 1e-5);
    }
    for (grp, (&g, &w)) in sq_g.iter().zip(&sq_c).enumerate() {
        let (g, w) = (g.sqrt(), w.sqrt());
        eprintln!("{what}: group {grp} gradient norm {g:.6e} vs {w:.6e}");
        assert!(
            rel(g, w) < 1e-4,
            "{what}: group {grp} gradient norm {g} vs {w}"
        );
    }
}

#[test]
fn a_tiny_decoder_tape_matches_the_cpu_tape() {
    let Some(dev) = gpu_or_skip() else { return };
    let c = &TINY;
    let store = tiny_store(c, 11);
    let mut rng = StdRng::seed_from_u64(12);
    let ids: Vec<i64> = (0..c.seqs * c.tokens)
        .map(|_| rng.random_range(0..c.vocab as i64))
        .collect();
    check_tiny_against_cpu(dev.clone(), c, &store, &ids, "resident weights");
    let (resident, bytes, uploads) = dev.weight_stats().unwrap();
    let total: usize = store.0.values().map(|v| v.len() * 4).sum();
    assert_eq!(
        (resident, bytes, uploads),
        (store.0.len(), total, store.0.len()),
        "with room for all, every weight is uploaded once"
    );
    // A second step with the same store uploads nothing.
    check_tiny_against_cpu(dev.clone(), c, &store, &ids, "cached weights");
    assert_eq!(dev.weight_stats().unwrap().2, store.0.len());

    // A budget of about two layers: the device keeps a window of groups, prefetched one ahead, and
    // evicts the rest; the results do not change.
    let layer_bytes: usize = store
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("model.layers.0."))
        .map(|(_, v)| v.len() * 4)
        .sum();
    dev.clear_weights().unwrap();
    dev.set_weight_budget(2 * layer_bytes).unwrap();
    let before = dev.weight_stats().unwrap().2;
    check_tiny_against_cpu(dev.clone(), c, &store, &ids, "windowed weights");
    let (_, bytes, after) = dev.weight_stats().unwrap();
    let uploads = after - before;
    assert!(
        uploads > store.0.len(),
        "the backward re-uploads evicted layers ({uploads} uploads)"
    );
    assert!(
        bytes < total,
        "not every weight stays resident ({bytes} of {total} bytes)"
    );
}

#[test]
fn opening_without_a_gpu_is_an_error_not_a_panic() {
    // Runs everywhere: without a driver or GPU, `open` returns an error; with one, a missing ordinal does.
    let e = CudaDevice::open(1 << 20).expect_err("no GPU 1048576");
    assert!(!e.to_string().is_empty());
}
