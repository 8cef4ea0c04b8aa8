//! Runtime throughput on a mid-size random LLaMA-shaped checkpoint (hidden 256, 4 layers, intermediate 688,
//! 8 heads / 4 kv heads, vocab 4096; 2 sequences × 128 tokens): forward only, and forward + backward with
//! gradient norms. The ~100M-parameter comparison against PyTorch is scripts/bench_runtime_torch.py.
//!
//!     cargo bench --bench runtime

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use sglp_engine::runtime::{Model, Tokens};
use std::path::Path;

const HIDDEN: usize = 256;
const LAYERS: usize = 4;
const INTER: usize = 688;
const HEADS: usize = 8;
const KV: usize = 4;
const VOCAB: usize = 4096;

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
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
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
        b.iter(|| model.forward(&tokens, &[], &mut |_, _| {}).unwrap())
    });
    g.bench_function("forward_backward_gradnorm", |b| {
        b.iter(|| model.grad_norms(&tokens, &[]).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
