//! Runtime throughput on a mid-size random LLaMA-shaped checkpoint (hidden 256, 4 layers, intermediate 688,
//! 8 heads / 4 kv heads, vocab 4096; 2 sequences × 128 tokens): forward only, and forward + backward with
//! gradient norms. The ~100M-parameter comparison against PyTorch is scripts/bench_runtime_torch.py.
//! And the CNN runtime: CIFAR ResNet-56 (16/32/64 channels, option A, random weights and BN statistics) on
//! 128 images of 3×32×32, forward and forward + backward; PyTorch on the same workload:
//! scripts/bench_cnn_torch.py.
//!
//!     cargo bench --bench runtime

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use sglp_engine::runtime::cnn::{CnnModel, Images};
use sglp_engine::runtime::{Model, Tokens};
use std::path::Path;

const HIDDEN: usize = 256;
const LAYERS: usize = 4;
const INTER: usize = 688;
const HEADS: usize = 8;
const KV: usize = 4;
const VOCAB: usize = 4096;

/// Serialise `(name, shape, values)` f32 tensors as safetensors at `path`.
fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(v),
            )
            .unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Write a random CIFAR ResNet of `n` blocks per stage (16/32/64 channels, option-A shortcuts) as a
/// state_dict at `path`: He-scaled convs, BN statistics near the identity.
fn write_cifar_resnet(path: &Path, n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut conv = |t: &mut Vec<_>, name: String, o: usize, i: usize| {
        let s = (2.0 / (i * 9) as f32).sqrt();
        let v = (0..o * i * 9).map(|_| rng.random_range(-s..s)).collect();
        t.push((format!("{name}.weight"), vec![o, i, 3, 3], v));
    };
    let bn = |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: String, c: usize| {
        for (k, v) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            t.push((format!("{name}.{k}"), vec![c], vec![v; c]));
        }
    };
    conv(&mut t, "conv1".into(), 16, 3);
    bn(&mut t, "bn1".into(), 16);
    let mut c = 16;
    for (s, w) in [16usize, 32, 64].into_iter().enumerate() {
        for i in 0..n {
            let p = format!("layer{}.{i}", s + 1);
            conv(&mut t, format!("{p}.conv1"), w, c);
            bn(&mut t, format!("{p}.bn1"), w);
            conv(&mut t, format!("{p}.conv2"), w, w);
            bn(&mut t, format!("{p}.bn2"), w);
            c = w;
        }
    }
    t.push(("linear.weight".into(), vec![10, 64], vec![0.01; 640]));
    t.push(("linear.bias".into(), vec![10], vec![0.0; 10]));
    write_tensors(path, &t);
}

/// Write a random checkpoint (config.json + model.safetensors, f32) into `dir`.
fn write_checkpoint(dir: &Path) {
    let hd = HIDDEN / HEADS;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| rng.random_range(-std..std)).collect();
        tensors.push((name, shape, v));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.05);
    add("model.norm.weight".into(), vec![HIDDEN], 1.0);
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let s = 1.0 / (HIDDEN as f32).sqrt();
        add(p("input_layernorm.weight"), vec![HIDDEN], 1.0);
        add(p("post_attention_layernorm.weight"), vec![HIDDEN], 1.0);
        add(p("self_attn.q_proj.weight"), vec![HEADS * hd, HIDDEN], s);
        add(p("self_attn.k_proj.weight"), vec![KV * hd, HIDDEN], s);
        add(p("self_attn.v_proj.weight"), vec![KV * hd, HIDDEN], s);
        add(p("self_attn.o_proj.weight"), vec![HIDDEN, HEADS * hd], s);
        add(p("mlp.gate_proj.weight"), vec![INTER, HIDDEN], s);
        add(p("mlp.up_proj.weight"), vec![INTER, HIDDEN], s);
        add(
            p("mlp.down_proj.weight"),
            vec![HIDDEN, INTER],
            1.0 / (INTER as f32).sqrt(),
        );
    }
    write_tensors(&dir.join("model.safetensors"), &tensors);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let model = Model::load(dir.path()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (seqs, len) = (2, 128);
    let tokens = Tokens {
        data: (0..seqs * len)
            .map(|_| rng.random_range(0..VOCAB as i64))
            .collect(),
        sequences: seqs,
        len,
    };
    let mut g = c.benchmark_group("runtime_llama_h256_l4_2x128");
    g.sample_size(10);
    g.bench_function("forward", |b| {
        b.iter(|| model.forward(&tokens, &[], None).unwrap())
    });
    g.bench_function("forward_backward_gradnorm", |b| {
        b.iter(|| model.grad_norms(&tokens, &[]).unwrap())
    });
    g.finish();
}

fn bench_cnn(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet56.safetensors");
    write_cifar_resnet(&path, 9);
    let model = CnnModel::load(&path, "cifar-resnet56").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let n = 128;
    let images = Images {
        data: std::sync::Arc::new(
            (0..n * 3 * 32 * 32)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        ),
        labels: (0..n).map(|_| rng.random_range(0..10)).collect(),
        n,
        c: 3,
        h: 32,
        w: 32,
    };
    let mut g = c.benchmark_group("runtime_cifar_resnet56_128x3x32x32");
    g.sample_size(10);
    g.bench_function("forward", |b| {
        b.iter(|| model.forward(&images, &[], &mut |_, _| {}).unwrap())
    });
    g.bench_function("forward_backward_gradnorm", |b| {
        b.iter(|| model.grad_norms(&images, &[], &mut |_, _| {}).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench, bench_cnn);
criterion_main!(benches);
