//! Helpers shared by the integration tests: `mod common;` in a test file, then `common::engine(..)` etc.

// Each test crate uses only some of them.
#![allow(dead_code)]

use npyz::WriterBuilder;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The decoder fixtures of `scripts/make_fixtures.py` (`tests/fixtures/NAME`, each with PyTorch's
/// float64 reference): checked against it by `tests/runtime_fixtures.rs`, and on the GPU (or the
/// emulator) against the CPU by `tests/runtime_cuda.rs`.
pub const DECODER_FIXTURES: [&str; 91] = [
    "llama_llama3_rope",
    "llama_bf16_tied",
    "mistral_sharded",
    "llama_torch_bin",
    "mistral_torch_sharded",
    "internlm2_wqkv",
    "falcon_rw_alibi",
    "bloom_alibi",
    "mpt_alibi_clip",
    "gptj_rotary_dim",
    "codegen_shards",
    "gpt_bigcode_mqa",
    "gpt_bigcode_mha",
    "qwen2_f16_bias",
    "qwen2_sliding",
    "qwen3_qk_norm",
    "phi3_longrope",
    "gemma_geglu",
    "gemma3_sandwich",
    "gemma2_softcap",
    "olmo2_post_norm",
    "gemma3_vision",
    "mistral3_vision",
    "neox_parallel",
    "neox_sequential",
    "granite_multipliers",
    "qwen2_5_vl_flat",
    "phi_parallel",
    "starcoder2_window",
    "mixtral_moe",
    "qwen2_moe_shared",
    "qwen3_moe_step",
    "olmoe_experts",
    "glm4_moe_sigmoid",
    "minimax_m2_sigmoid",
    "ernie4_5_moe_biased",
    "cwm_layer_pattern",
    "ministral_layer_types",
    "ministral3_yarn",
    "exaone_hub_names",
    "nemotron_layernorm1p",
    "jais2_layernorm",
    "deepseek_v2_grouped",
    "glm4_moe_lite_mla",
    "youtu_mla",
    "minicpm3_scaled",
    "mistral4_mla",
    "flex_olmo_post_norms",
    "granitemoe_experts",
    "granitemoeshared_shared_mlp",
    "granite_swa_sinks",
    "granitemoe_swa_sinks",
    "gpt_oss_sinks",
    "qwen3_fp8_blocks",
    "hunyuan_dense_ntk_alpha",
    "vaultgemma_pre_norms",
    "hunyuan_moe_shared",
    "gpt_neo_local",
    "llama4_moe_nope",
    "llama4_vision",
    "hyperclovax_peri_norms",
    "exaone_moe_window",
    "afmoe_gated_window",
    "apertus_xielu",
    "hy_v3_moe",
    "minicpm5_moe_gated",
    "dots1_window",
    "deepseek_v3_mla",
    "deepseek_v3_q_proj",
    "gpt2_hub_layout",
    "opt_hub_layout",
    "olmo3_yarn_window",
    "smollm3_nope",
    "stablelm_sequential",
    "stablelm_parallel",
    "stablelm_qk_layernorm",
    "cohere_interleaved",
    "cohere_qk_norm",
    "cohere2_nope_window",
    "internlm3_dynamic",
    "glm_interleaved",
    "glm4_sandwich",
    "exaone4_window",
    "falcon_multi_query",
    "falcon_new_arch",
    "falcon_sequential",
    "olmo_clip_qkv",
    "ernie4_5_bias",
    "helium_interleaved",
    "seed_oss_bias",
    "arcee_relu2",
];

/// Run the `sglp-engine` binary with `args`.
pub fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
        .args(args)
        .output()
        .expect("runs the binary")
}

/// Run the `sglp-engine` binary with `args`, which must succeed (its stderr in the panic otherwise).
pub fn engine_ok(args: &[&str]) -> Output {
    let o = engine(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture checkpoint `name` (made by scripts/make_fixtures.py).
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Relative difference of `a` from the reference `b`.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Tensor `key` of fixture `name`'s PyTorch float64 reference (`reference.safetensors`): shape, values.
pub fn reference_tensor(name: &str, key: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    (t.shape().to_vec(), f64s(t.data()))
}

/// Every tensor of fixture `name`'s reference, and its `batch` metadata (sequences per batch).
pub fn reference(name: &str) -> (HashMap<String, Vec<f64>>, usize) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let batch: usize = meta.metadata().as_ref().unwrap()["batch"].parse().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let map = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, f64s(v.data())))
        .collect();
    (map, batch)
}

/// A tokens file: `.npy` int64 `[seqs, len]`.
pub fn write_tokens(path: &Path, seqs: u64, len: u64, ids: &[i64]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[seqs, len])
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(ids.iter().copied()).unwrap();
    w.finish().unwrap();
}

/// A safetensors file with `layers` tensors [n, width] of f32: three groups of similar layers.
pub fn write_activations(
    path: &Path,
    n: usize,
    layers: usize,
    width: usize,
    seed: u64,
    order_meta: bool,
) {
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, Normal};
    use safetensors::tensor::{Dtype, TensorView};
    let mut rng = StdRng::seed_from_u64(seed);
    let g = Normal::new(0.0f32, 1.0).unwrap();
    let latents: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n * 4).map(|_| g.sample(&mut rng)).collect())
        .collect();
    let mut data: Vec<(String, Vec<u8>)> = Vec::new();
    for l in 0..layers {
        let z = &latents[l * 3 / layers];
        let w: Vec<f32> = (0..4 * width).map(|_| g.sample(&mut rng)).collect();
        let mut x = vec![0f32; n * width];
        for i in 0..n {
            for j in 0..width {
                x[i * width + j] = (0..4).map(|t| z[i * 4 + t] * w[t * width + j]).sum::<f32>()
                    + 0.3 * g.sample(&mut rng);
            }
        }
        data.push((format!("block{l}"), bytemuck::cast_slice(&x).to_vec()));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, vec![n, width], v).unwrap(),
            )
        })
        .collect();
    let meta = order_meta.then(|| {
        HashMap::from([(
            "layers".to_string(),
            (0..layers)
                .map(|l| format!("block{l}"))
                .collect::<Vec<_>>()
                .join(","),
        )])
    });
    safetensors::serialize_to_file(views, meta, path).unwrap();
}
