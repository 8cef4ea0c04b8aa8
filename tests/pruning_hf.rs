//! The pruned checkpoint against Hugging Face transformers, through the references that
//! scripts/check_pruned_hf.py stored in tests/fixtures/pruned_reference/ (CI has no Python):
//!
//! * `prune` with the stored arguments removes the same layers;
//! * the pruned checkpoint, loaded by the engine's runtime, gives PyTorch's float64 logits of the same
//!   checkpoint (logits = lm_head(RMSNorm(h_L)), soft-capped for Gemma 2, from the runtime's last hidden
//!   state), and its loss;
//! * `eval` gives PyTorch's perplexity before and after within 1e-4 relative.

mod common;

use common::{engine, fixtures, rel};
use sglp_engine::runtime::weights::Weights;
use sglp_engine::runtime::{Model, Tokens};
use std::path::Path;

fn read_npy_f64(path: &Path) -> (Vec<u64>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f64>().unwrap())
}

/// logits[t] = W · (h_t / rms(h_t) · g), in f64 from the runtime's f32 last hidden state (GPT-NeoX:
/// W · ((h_t − mean) / std · g + b)).
fn logits_from_hidden(model_dir: &Path, model: &Model, h: &[f32]) -> Vec<f64> {
    let c = &model.config;
    let (d, v) = (c.hidden_size, c.vocab_size);
    let w = Weights::open(model_dir).unwrap();
    let names = &model.names;
    // OLMo's final LayerNorm has no weight: the gain is norm_offset (1) alone.
    let g = match c.layout.norm_weight() {
        true => w.get_f32(&names.norm()).unwrap().into_owned(),
        false => vec![0.0; d],
    };
    let layer_norm = c.layout.layer_norm();
    let bias = c
        .layout
        .norm_bias()
        .then(|| w.get_f32(&names.norm_bias()).unwrap());
    let head = if c.tie_word_embeddings {
        w.get_f32(&names.embed).unwrap()
    } else {
        w.get_f32(&names.lm_head).unwrap()
    };
    // Phi's lm_head has a bias.
    let head_bias = c
        .lm_head_bias
        .then(|| w.get_f32(&names.lm_head_bias()).unwrap());
    let mut out = Vec::with_capacity(h.len() / d * v);
    let mut x = vec![0f64; d];
    for row in h.chunks_exact(d) {
        let mean = match layer_norm {
            true => row.iter().map(|&a| a as f64).sum::<f64>() / d as f64,
            false => 0.0,
        };
        let ms = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + c.rms_norm_eps).sqrt();
        for (j, (xi, &a)) in x.iter_mut().zip(row).enumerate() {
            // Gemma's final norm multiplies by 1 + w.
            *xi = (a as f64 - mean) * inv * (c.norm_offset + g[j]) as f64
                + bias.as_ref().map_or(0.0, |b| b[j] as f64);
        }
        for r in 0..v {
            let wr = &head[r * d..(r + 1) * d];
            let logit: f64 = x.iter().zip(wr).map(|(a, &b)| a * b as f64).sum::<f64>()
                + head_bias.as_ref().map_or(0.0, |b| b[r] as f64);
            // Granite divides the logits by logits_scaling; Gemma 2 soft-caps them.
            let logit = logit * c.logits_scale.unwrap_or(1.0) as f64;
            out.push(match c.final_softcap {
                Some(cap) => cap as f64 * (logit / cap as f64).tanh(),
                None => logit,
            });
        }
    }
    out
}

fn eval_perplexity(model: &Path, tokens: &Path, dir: &Path) -> f64 {
    let out = dir.join("eval.json");
    // f32 products on a GPU too (bf16 is the GPU's default): held to transformers' f32 at 1e-4.
    let o = engine(&[
        "eval",
        "--matmul",
        "f32",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--batch",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    j["perplexity"].as_f64().unwrap()
}

fn check_case(name: &str) {
    let refdir = fixtures().join("pruned_reference");
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(refdir.join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let model_dir = fixtures().join(name);
    let tokens_path = model_dir.join("tokens.npy");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let mut args: Vec<String> = [
        "prune",
        "--matmul",
        "f32",
        "--model",
        model_dir.to_str().unwrap(),
        "--tokens",
        tokens_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in r["prune_args"].as_array().unwrap() {
        args.push(a.as_str().unwrap().to_string());
    }
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = engine(&argv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sglp-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["removed"], r["removed"], "{name}: removed layers");

    // Logits of the pruned checkpoint, through the runtime.
    let model = Model::load(&out).unwrap();
    assert_eq!(model.num_layers(), r["kept"].as_array().unwrap().len());
    let tokens = Tokens::load_npy(&tokens_path).unwrap();
    let l = model.num_layers();
    let mut last = Vec::new();
    let loss = model
        .forward(
            &tokens,
            &[],
            Some(&mut |i, h| {
                if i == l {
                    last = h.to_vec();
                }
            }),
        )
        .unwrap();
    let ours = logits_from_hidden(&out, &model, &last);
    let (shape, theirs) = read_npy_f64(&refdir.join(format!("{name}.logits.npy")));
    assert_eq!(
        shape,
        vec![
            tokens.sequences as u64,
            tokens.len as u64,
            model.config.vocab_size as u64
        ]
    );
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(&theirs)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-5 * scale,
        "{name}: logits differ by {worst:e} (scale {scale:e})"
    );
    let loss_after = r["loss_after"].as_f64().unwrap();
    assert!(
        rel(loss, loss_after) < 1e-5,
        "{name}: loss {loss} vs {loss_after}"
    );

    // Perplexity from `eval`, before and after, and in the report.
    let before = eval_perplexity(&model_dir, &tokens_path, tmp.path());
    let after = eval_perplexity(&out, &tokens_path, tmp.path());
    let (pb, pa) = (
        r["perplexity_before"].as_f64().unwrap(),
        r["perplexity_after"].as_f64().unwrap(),
    );
    assert!(
        rel(before, pb) < 1e-4,
        "{name}: ppl before {before} vs {pb}"
    );
    assert!(rel(after, pa) < 1e-4, "{name}: ppl after {after} vs {pa}");
}

#[test]
fn llama_llama3_rope_matches_transformers() {
    check_case("llama_llama3_rope");
}

#[test]
fn llama_bf16_tied_matches_transformers() {
    check_case("llama_bf16_tied");
}

#[test]
fn mistral_sharded_subset_selection_matches_transformers() {
    check_case("mistral_sharded");
}

/// The same two models saved with torch.save (`pytorch_model.bin`; `.bin` shards and their index),
/// pruned into safetensors.
#[test]
fn torch_save_checkpoints_match_transformers() {
    check_case("llama_torch_bin");
    check_case("mistral_torch_sharded");
}

/// ALiBi: Falcon-RW (bf16), BLOOM (the hub's layout, its `n_layer` rewritten) and MPT (`n_layers`).
#[test]
fn alibi_models_match_transformers() {
    check_case("falcon_rw_alibi");
    check_case("bloom_alibi");
    check_case("mpt_alibi_clip");
}

/// GPT-J (its `n_layer` rewritten; interleaved partial rotary, parallel block, lm_head bias), and
/// CodeGen (GPT-J's block, q/k/v fused in 4 shards).
#[test]
fn gptj_and_codegen_match_transformers() {
    check_case("gptj_rotary_dim");
    check_case("codegen_shards");
}

/// q/k norms whose weights are per head: Cohere's (Command R+), StableLM 2 12B's (a module per head,
/// renumbered with its layer).
#[test]
fn per_head_qk_norms_match_transformers() {
    check_case("cohere_qk_norm");
    check_case("stablelm_qk_layernorm");
}

/// GPT-BigCode, multi-query and per-head (its `n_layer` rewritten; learned positions kept whole).
#[test]
fn gpt_bigcode_matches_transformers() {
    check_case("gpt_bigcode_mqa");
    check_case("gpt_bigcode_mha");
}

#[test]
fn qwen2_f16_bias_matches_transformers() {
    check_case("qwen2_f16_bias");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check_case("qwen3_qk_norm");
}

#[test]
fn phi3_longrope_fused_projections_match_transformers() {
    check_case("phi3_longrope");
}

#[test]
fn gemma_geglu_matches_transformers() {
    check_case("gemma_geglu");
}

#[test]
fn gemma3_sandwich_pattern_layer_kinds_match_transformers() {
    check_case("gemma3_sandwich");
}

#[test]
fn gemma2_softcap_matches_transformers() {
    check_case("gemma2_softcap");
}

#[test]
fn olmo2_post_norm_matches_transformers() {
    check_case("olmo2_post_norm");
}

/// Granite's multipliers (embeddings, scores, residual branches, logits).
#[test]
fn granite_multipliers_match_transformers() {
    check_case("granite_multipliers");
}

/// Phi-2's block (one shared LayerNorm, parallel attention and MLP) and its lm_head bias.
#[test]
fn phi_parallel_matches_transformers() {
    check_case("phi_parallel");
}

/// StarCoder2: LayerNorms and biases, a window on every layer, tied, bf16.
#[test]
fn starcoder2_window_matches_transformers() {
    check_case("starcoder2_window");
}

/// GPT-NeoX (Pythia) with the parallel residual, the 4.x config names (rotary_pct, rotary_emb_base).
#[test]
fn neox_parallel_matches_transformers() {
    check_case("neox_parallel");
}

/// GPT-NeoX with the sequential residual, bf16.
#[test]
fn neox_sequential_matches_transformers() {
    check_case("neox_sequential");
}

/// Mixtral: every MLP a sparse mixture of experts (block_sparse_moe, w1/w3/w2), a window on every layer.
#[test]
fn mixtral_moe_matches_transformers() {
    check_case("mixtral_moe");
}

/// σ routing with a correction bias: GLM-4.5's (groups, a scale, a shared expert) and MiniMax-M2's.
#[test]
fn sigmoid_routed_moe_match_transformers() {
    check_case("glm4_moe_sigmoid");
    check_case("minimax_m2_sigmoid");
}

/// Ministral's windows by layer_types (sliced), Ministral 3's YaRN and query scaling settings.
#[test]
fn ministral_matches_transformers() {
    check_case("ministral_layer_types");
    check_case("ministral3_yarn");
    check_case("cwm_layer_pattern");
}

/// Mistral Small 4: MLA, Llama 4's query scaling, the softmax router inside groups, experts fused.
#[test]
fn mistral4_matches_transformers() {
    check_case("mistral4_mla");
}

/// EXAONE 3.5 under the hub's tensor and config names.
#[test]
fn exaone_matches_transformers() {
    check_case("exaone_hub_names");
}

/// Nemotron's LayerNorm1P and ReLU² MLP; Jais 2's plain LayerNorms with the same MLP.
#[test]
fn nemotron_matches_transformers() {
    check_case("nemotron_layernorm1p");
    check_case("jais2_layernorm");
}

/// DeepSeek-V3's latent attention, with the query's bottleneck and without; DeepSeek-V2's with its
/// group-limited softmax router.
#[test]
fn deepseek_mla_matches_transformers() {
    check_case("deepseek_v3_mla");
    check_case("deepseek_v3_q_proj");
    check_case("deepseek_v2_grouped");
    check_case("glm4_moe_lite_mla");
    check_case("youtu_mla");
    check_case("minicpm3_scaled");
}

/// dots.llm1: Qwen3's attention with windows past max_window_layers and DeepSeek-V3's router.
#[test]
fn dots1_matches_transformers() {
    check_case("dots1_window");
}

/// ERNIE 4.5 MoE's softmax routing with a correction bias on the choice, its sparse layers restated.
#[test]
fn ernie4_5_moe_matches_transformers() {
    check_case("ernie4_5_moe_biased");
}

/// Qwen2-MoE: experts with a sigmoid-gated shared expert, a dense layer among the sparse ones, bf16.
#[test]
fn qwen2_moe_shared_expert_matches_transformers() {
    check_case("qwen2_moe_shared");
}

/// Qwen3-MoE with decoder_sparse_step 2: both sparse layers removed, so the pruned config lists the two
/// kept dense layers by their new indices (mlp_only_layers [0, 1], step 1), or transformers would build
/// experts the checkpoint lacks.
#[test]
fn qwen3_moe_sparse_step_matches_transformers() {
    check_case("qwen3_moe_step");
}

/// Granite MoE: the hub's fused experts (`input_linear`, `output_linear`, `router.layer`) kept under
/// their names, Granite's multipliers; GraniteMoeShared's fused shared MLP.
#[test]
fn granitemoe_experts_match_transformers() {
    check_case("granitemoe_experts");
    check_case("granitemoeshared_shared_mlp");
}

/// Granite SWA: attention sinks, the class's window pattern written out and the rotary θs per layer
/// kept with their layers (layer 1, without a rotary embedding, removed); Granite MoE SWA: sinks with
/// GraniteMoeShared's mixture under transformers 5's names.
#[test]
fn granite_swa_sinks_match_transformers() {
    check_case("granite_swa_sinks");
    check_case("granitemoe_swa_sinks");
}

/// GPT-Neo: unscaled scores, local windows by attention_types (restated for the kept layers),
/// GPT-2's norms and positions under its own names.
#[test]
fn gpt_neo_matches_transformers() {
    check_case("gpt_neo_local");
}

/// Llama 4: a mixture's layer out; the NoPE layer and the next mixture move up a place (no_rope_layers
/// written out, moe_layers restated), the fused experts copied whole, the MLPs under `feed_forward`;
/// Scout's wrapper: its text_config's stated moe_layers restated, the vision tower copied.
#[test]
fn llama4_matches_transformers() {
    check_case("llama4_moe_nope");
    check_case("llama4_vision");
}

/// HyperCLOVA X: Granite's multipliers with output norms, kept under their own names.
#[test]
fn hyperclovax_matches_transformers() {
    check_case("hyperclovax_peri_norms");
}

/// EXAONE MoE: a windowed layer out, the kept layers' kinds written out, the router bias kept under
/// the hub's name beside the router.
#[test]
fn exaone_moe_matches_transformers() {
    check_case("exaone_moe_window");
}

/// AFMoE: the dense layer and a windowed one out (num_dense_layers and the kinds restated), its
/// norms, router and attention gate kept under their own names.
#[test]
fn afmoe_matches_transformers() {
    check_case("afmoe_gated_window");
}

/// Apertus: xIELU's learned scalars and buffers kept with their layers, the norms under their own
/// names.
#[test]
fn apertus_matches_transformers() {
    check_case("apertus_xielu");
}

/// HY V3: the dense first layer out, the kept layers' kinds written out, the hub's names kept.
#[test]
fn hy_v3_matches_transformers() {
    check_case("hy_v3_moe");
}

/// MiniCPM 5 MoE: the dense first layer out, the kept layers' kinds written out, the fused query and
/// gate kept under the hub's name.
#[test]
fn minicpm5_moe_matches_transformers() {
    check_case("minicpm5_moe_gated");
}

/// VaultGemma: Gemma 2's attention in LLaMA's pre-norm block, its MLP norm kept under its own name.
#[test]
fn vaultgemma_matches_transformers() {
    check_case("vaultgemma_pre_norms");
}

/// HunYuan dense: q/k norms after the rotary embedding (under their own names), NTK-alpha rope;
/// HunYuan MoE: with the mixture (router `mlp.gate.wg`, a shared MLP) and its per-layer lists trimmed.
#[test]
fn hunyuan_matches_transformers() {
    check_case("hunyuan_dense_ntk_alpha");
    check_case("hunyuan_moe_shared");
}

/// Block-scaled FP8 (Qwen3 with e4m3 projections and `_scale_inv` blocks): the pruned checkpoint keeps
/// them and the quantization_config as stored; transformers dequantises it into f64 as the engine reads it.
#[test]
fn qwen3_fp8_blocks_match_transformers() {
    check_case("qwen3_fp8_blocks");
}

/// GPT-OSS: attention sinks, the fused experts stored inputs first with biases kept as stored, the
/// router's bias; layer 0 (windowed) removed, the kept layers' kinds written out.
#[test]
fn gpt_oss_sinks_match_transformers() {
    check_case("gpt_oss_sinks");
}

/// OLMoE: whole-projection q/k norms, experts not renormalised; FlexOlmo: the same mixture in OLMo 2's block.
#[test]
fn olmoe_experts_match_transformers() {
    check_case("olmoe_experts");
    check_case("flex_olmo_post_norms");
}

/// OLMo 3 with its 4.x-form config (YaRN on the full-attention layers, no `layer_types`): the derived
/// layer kinds written out, the full-attention layer renumbered from 3 to 1.
#[test]
fn olmo3_yarn_window_matches_transformers() {
    check_case("olmo3_yarn_window");
}

/// SmolLM3 without `no_rope_layers` (derived from the interval): written out, so that the NoPE,
/// windowed layer 3 stays NoPE as layer 2.
#[test]
fn smollm3_nope_matches_transformers() {
    check_case("smollm3_nope");
}

/// StableLM: LayerNorms with biases, partial rotary; sequential (4.x config) and parallel residual.
#[test]
fn stablelm_matches_transformers() {
    check_case("stablelm_sequential");
    check_case("stablelm_parallel");
}

/// Cohere (interleaved rotary, the shared bias-free LayerNorm, logit_scale) and Cohere 2 (its derived
/// layer pattern written out, so kept layers keep their window and their rotary embedding).
#[test]
fn cohere_matches_transformers() {
    check_case("cohere_interleaved");
    check_case("cohere2_nope_window");
}

/// InternLM3 (the hub's bias names kept), GLM and GLM-4 (a fused gate/up copied as stored), EXAONE 4
/// (its derived layer pattern written out).
#[test]
fn internlm3_glm_and_exaone4_match_transformers() {
    for name in [
        "internlm3_dynamic",
        "glm_interleaved",
        "glm4_sandwich",
        "exaone4_window",
    ] {
        check_case(name);
    }
}

/// Falcon's three blocks (multi-query on one norm, the new architecture's key/value groups on two,
/// the oldest per-head q/k/v one after the other), under `transformer.h.`.
#[test]
fn falcon_matches_transformers() {
    for name in ["falcon_multi_query", "falcon_new_arch", "falcon_sequential"] {
        check_case(name);
    }
}

/// OLMo (1): no norm tensors at all (LayerNorms without parameters), clip_qkv kept in the config.
#[test]
fn olmo_clip_qkv_matches_transformers() {
    check_case("olmo_clip_qkv");
}

/// ERNIE 4.5 (biases everywhere, tied) and Helium (q/k/v biases, untied), both rotating interleaved
/// pairs.
#[test]
fn ernie4_5_and_helium_match_transformers() {
    check_case("ernie4_5_bias");
    check_case("helium_interleaved");
}

/// Seed-OSS: q/k/v biases, o_proj without (`attention_out_bias`); Arcee: the ReLU² MLP, YaRN.
#[test]
fn seed_oss_and_arcee_match_transformers() {
    check_case("seed_oss_bias");
    check_case("arcee_relu2");
}

/// OPT as the hub's facebook/opt-* checkpoints are stored (`decoder.…`, no `model.` prefix, tied), bf16:
/// a kept layer renumbered under that prefix.
#[test]
fn opt_hub_layout_matches_transformers() {
    check_case("opt_hub_layout");
}

/// GPT-2 in the hub's original layout (`h.{l}.…`, no `transformer.` prefix, causal-mask buffers):
/// its Conv1D tensors and buffers copied as stored, `n_layer` updated.
#[test]
fn gpt2_hub_layout_matches_transformers() {
    check_case("gpt2_hub_layout");
}

/// A Gemma 3 vision-language checkpoint (hub layout, hub-style sparse text_config, tied): the language
/// model pruned, the vision tower and projector copied byte for byte.
#[test]
fn gemma3_vision_language_model_pruned_matches_transformers() {
    check_case("gemma3_vision");
    vision_tower_is_copied("gemma3_vision");
}

/// A Mistral 3 vision-language checkpoint in the transformers 4.52-4.57 layout, untied.
#[test]
fn mistral3_vision_language_model_pruned_matches_transformers() {
    check_case("mistral3_vision");
    vision_tower_is_copied("mistral3_vision");
}

/// A Qwen2.5-VL checkpoint with the hub's flat 4.x config (text fields at the top level, M-RoPE) and
/// tensor layout (model.…, visual.…): the top level's layer count is pruned, the vision config's kept.
#[test]
fn qwen2_5_vl_flat_config_language_model_pruned_matches_transformers() {
    check_case("qwen2_5_vl_flat");
    vision_tower_is_copied("qwen2_5_vl_flat");
}

/// Prune fixture `name` by one layer: every tensor outside the language model is in the pruned checkpoint
/// with the same name and bytes; the vision config is unchanged.
fn vision_tower_is_copied(name: &str) {
    let model_dir = fixtures().join(name);
    let model = Model::load(&model_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let kept: Vec<usize> = (1..model.num_layers()).collect();
    sglp_engine::pruning::checkpoint::write_pruned_checkpoint(
        &model_dir,
        out,
        &model.names.layers_prefix(),
        model.num_layers(),
        &kept,
    )
    .unwrap();
    let (a, b) = (
        Weights::open(&model_dir).unwrap(),
        Weights::open(out).unwrap(),
    );
    let others: Vec<&str> = a.names().filter(|n| !model.names.is_decoder(n)).collect();
    assert!(others.len() > 10, "{name}: {} other tensors", others.len());
    for n in &others {
        assert_eq!(a.get_f32(n).unwrap(), b.get_f32(n).unwrap(), "{name}: {n}");
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    let (ca, cb) = (read(&model_dir), read(out));
    assert_eq!(ca["vision_config"], cb["vision_config"]);
    let text = cb.get("text_config").unwrap_or(&cb);
    assert_eq!(text["num_hidden_layers"], model.num_layers() - 1);
    let pruned = Model::load(out).unwrap();
    assert_eq!(pruned.num_layers(), model.num_layers() - 1);
    assert_eq!(pruned.names, model.names);
    assert_eq!(pruned.other_modality_tensors(), others.len());
}
