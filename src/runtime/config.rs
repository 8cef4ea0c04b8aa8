//! `config.json` of a Hugging Face decoder checkpoint: the LLaMA family (model_type llama, mistral, qwen2,
//! qwen3, phi3, gemma, gemma2, gemma3_text, olmo2, olmo3, granite, starcoder2, smollm3, internlm3, glm,
//! glm4, exaone4, ernie4_5, helium, seed_oss, arcee, internlm2 under its own names; with LayerNorms
//! stablelm, cohere, cohere2, olmo), Falcon (falcon; Falcon-RW with ALiBi), BLOOM (bloom) and MPT (mpt)
//! with ALiBi, GPT-NeoX (gpt_neox: Pythia), Phi (phi), GPT-J (gptj) and CodeGen (codegen), GPT-2
//! (gpt2, its `n_*` names read as the others'), GPT-BigCode (gpt_bigcode: StarCoder 1), GPT-Neo (gpt_neo) and
//! OPT (opt),
//! the mixtures of experts (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe, granitemoeshared,
//! llama4_text and others: [`Moe`]), both config generations:
//! transformers 4.x (top-level `rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`).
//! A vision-language checkpoint whose language model is one of these ([`MULTIMODAL`]: gemma3, mistral3,
//! llava, qwen2_vl, qwen2_5_vl, qwen3_vl, llama4) is read through its `text_config` (or a flat Qwen-VL config's
//! top level).

use crate::error::{Error, Result};
use crate::runtime::ops::{Activation, Alibi, RopePairs};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear { factor: f64 },
    /// LongRoPE (Phi-3 128k, Phi-3.5): each frequency divided by its own factor, `short_factor` for
    /// sequences up to `original_max_position_embeddings` tokens and `long_factor` beyond, cos and sin
    /// multiplied by `attention_factor` (transformers' `_compute_longrope_parameters` and its
    /// `longrope_frequency_update`).
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// YaRN (Qwen2.5/Qwen3 long context, OLMo 3, DeepSeek): each frequency blended between itself
    /// (extrapolation) and itself / `factor` (interpolation) by a linear ramp over the frequency index
    /// between the correction dimensions of `beta_fast` and `beta_slow` rotations in
    /// `original_max_position_embeddings` tokens (floored and ceiled with `truncate`), cos and sin
    /// multiplied by `attention_factor` (transformers' `_compute_yarn_parameters`).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// Dynamic NTK: plain RoPE for sequences of up to `max_position_embeddings` tokens; beyond, the base
    /// θ grows to θ · (factor · tokens / max − (factor − 1))^(d / (d − 2)) (transformers'
    /// `_compute_dynamic_ntk_parameters` as `dynamic_rope_update` applies it to a fresh model).
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
}

/// Where a decoder block's RMSNorms sit, by their checkpoint names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockNorms {
    /// LLaMA: `input_layernorm` before the attention, `post_attention_layernorm` before the MLP.
    Pre,
    /// Gemma 2 and 3: `input_layernorm` before the attention, `post_attention_layernorm` on its output
    /// (before the residual add), `pre_feedforward_layernorm` before the MLP, `post_feedforward_layernorm`
    /// on its output.
    Sandwich,
    /// OLMo 2: the inputs unnormalised, `post_attention_layernorm` and `post_feedforward_layernorm` on the
    /// two outputs.
    Post,
    /// GLM-4: as [`BlockNorms::Sandwich`] under other names: `input_layernorm` before the attention,
    /// `post_self_attn_layernorm` on its output, `post_attention_layernorm` before the MLP,
    /// `post_mlp_layernorm` on its output.
    Glm4,
    /// Phi (and StableLM's parallel residual): one `input_layernorm` whose output both the attention
    /// and the MLP read, their outputs both added to the block's input.
    Shared,
}

impl BlockNorms {
    /// The norms' names: [before the attention, before the MLP, on the attention's output, on the MLP's
    /// output]; `None` where there is none.
    pub fn names(self) -> [Option<&'static str>; 4] {
        match self {
            BlockNorms::Pre => [
                Some("input_layernorm"),
                Some("post_attention_layernorm"),
                None,
                None,
            ],
            BlockNorms::Sandwich => [
                Some("input_layernorm"),
                Some("pre_feedforward_layernorm"),
                Some("post_attention_layernorm"),
                Some("post_feedforward_layernorm"),
            ],
            BlockNorms::Post => [
                None,
                None,
                Some("post_attention_layernorm"),
                Some("post_feedforward_layernorm"),
            ],
            BlockNorms::Glm4 => [
                Some("input_layernorm"),
                Some("post_attention_layernorm"),
                Some("post_self_attn_layernorm"),
                Some("post_mlp_layernorm"),
            ],
            BlockNorms::Shared => [Some("input_layernorm"), None, None, None],
        }
    }
}

/// A decoder block's layout: its tensors' names and how its parts connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockLayout {
    /// LLaMA and kin: `self_attn.{q,k,v,o}_proj`, a gated MLP `mlp.{gate,up,down}_proj`, RMSNorms (where
    /// [`BlockNorms`] puts them), the attention and the MLP one after the other.
    Llama,
    /// GPT-NeoX (Pythia): `attention.query_key_value` (q, k and v of each head side by side, with a
    /// bias), `attention.dense`, an MLP `mlp.dense_h_to_4h` → GELU → `mlp.dense_4h_to_h` (biases),
    /// LayerNorms with biases; with `parallel_residual` (`use_parallel_residual`, the default) the
    /// attention and the MLP both read the block's input: x + attn(ln₁(x)) + mlp(ln₂(x)).
    NeoX { parallel_residual: bool },
    /// Phi-1, Phi-1.5, Phi-2: one LayerNorm (with a bias) shared by the attention and the MLP, which run
    /// in parallel (x + attn(ln x) + mlp(ln x)); `self_attn.{q,k,v}_proj` and `self_attn.dense` with
    /// biases, an MLP `mlp.fc1` → GELU → `mlp.fc2`, `model.final_layernorm`, an lm_head with a bias.
    Phi,
    /// StarCoder2: LLaMA's attention names and sequential residual with LayerNorms (with biases), an MLP
    /// `mlp.c_fc` → GELU → `mlp.c_proj`, biases on every projection (`use_bias`).
    Starcoder2,
    /// OPT: LLaMA's attention names but `self_attn.out_proj`, LayerNorms `self_attn_layer_norm`,
    /// `final_layer_norm` (with biases) before the attention and the MLP, `fc1` → ReLU → `fc2`, biases
    /// (`enable_bias`), learned positions (offset 2), no rotary embedding,
    /// `model.decoder.final_layer_norm`.
    Opt,
    /// Arcee (AFM): LLaMA's names and norms with a plain MLP `mlp.up_proj` → ReLU² → `mlp.down_proj`.
    Arcee,
    /// EXAONE 3.0 / 3.5: LLaMA's block under the hub's names, `attn.attention.{q,k,v,out}_proj`, RMSNorms
    /// `ln_1`, `ln_2`, the gated MLP `mlp.c_fc_0` (gate), `mlp.c_fc_1` (up), `mlp.c_proj` (down), in
    /// `transformer.h.…` (transformers renames them at load and back at save).
    Exaone,
    /// Nemotron (Nemotron-4, Minitron, Nemotron-Mini) and Jais 2: Arcee's names and plain MLP with
    /// LayerNorms with biases (Nemotron's gain `1 + w`: LayerNorm1P, `norm_offset` 1).
    Nemotron,
    /// OLMo (1): LLaMA's names and gated MLP with LayerNorms without parameters (no weight, no bias:
    /// the gain is `norm_offset`, 1).
    Olmo,
    /// StableLM (StableLM 2, StableLM-3B-4E1T): LLaMA's names and gated MLP with LayerNorms (with
    /// biases); with `use_parallel_residual` one LayerNorm shared by the attention and the MLP, in
    /// parallel ([`BlockNorms::Shared`]).
    StableLm,
    /// Cohere (Command R, Aya Expanse) and Cohere 2 (Command R7B): LLaMA's names and gated MLP, one
    /// LayerNorm without a bias (`input_layernorm`, `model.norm`) shared by the attention and the MLP in
    /// parallel ([`BlockNorms::Shared`]), the rotary embedding on interleaved pairs
    /// ([`RopePairs::Interleaved`]).
    Cohere,
    /// Falcon: `self_attention.query_key_value` (per key/value group: its queries, its key, its value;
    /// Falcon-7B's multi-query one group, the 40B/180B "new decoder architecture" `num_kv_heads`,
    /// the oldest one head per group), `self_attention.dense`, an MLP `mlp.dense_h_to_4h` → GELU →
    /// `mlp.dense_4h_to_h`, LayerNorms with biases, biases on the projections with `bias`; the
    /// attention and the MLP in parallel on one shared norm ([`BlockNorms::Shared`]), on two
    /// (`ln_pair`: `ln_attn`, `ln_mlp`, both reading the block's input), or one after the other.
    Falcon { ln_pair: bool },
    /// InternLM2 and InternLM2.5 (remote code, `InternLM2ForCausalLM`): LLaMA's block under other names:
    /// `attention_norm`, `attention.wqkv` (per key/value group: its queries, its key, its value, as
    /// Falcon's), `attention.wo`, `ffn_norm`, a gated MLP `feed_forward.{w1,w3,w2}` (gate, up, down);
    /// `model.tok_embeddings`, `output`.
    InternLm2,
    /// MPT (MosaicML): LayerNorms without biases `norm_1`, `norm_2`, q, k and v stacked in one
    /// `attn.Wqkv` (read as row blocks, the runtime's `attn.{q,k,v}_proj`), `attn.out_proj`, an MLP
    /// `ffn.up_proj` → GELU → `ffn.down_proj`, no biases; `transformer.blocks.`, `transformer.wte`,
    /// `transformer.norm_f`; ALiBi.
    Mpt,
    /// GPT-J: one LayerNorm `ln_1` (with a bias) shared by the attention and the MLP in parallel
    /// ([`BlockNorms::Shared`]), `attn.{q,k,v,out}_proj` without biases, an MLP `mlp.fc_in` → GELU →
    /// `mlp.fc_out` (biases), the rotary embedding on interleaved pairs of the first `rotary_dim` values;
    /// `transformer.h.`, `transformer.wte`, `transformer.ln_f`, an lm_head with a bias.
    GptJ,
    /// CodeGen: GPT-J's block with q, k and v fused in `attn.qkv_proj` across the 4 model-parallel shards
    /// it was trained with: 4 groups side by side, each its quarter of the queries, of the values, then
    /// of the keys (read as one projection and gathered: [`BlockLayout::qkv_groups`]).
    CodeGen,
    /// GPT-2: LayerNorms `ln_1`, `ln_2` (with biases), `Conv1D` projections storing `[in, out]`
    /// (`attn.c_attn` fused q, k, v by columns; `attn.c_proj`; `mlp.c_fc` → GELU → `mlp.c_proj`, all with
    /// biases), read as the transposed views `attn.{q,k,v,o}_proj`, `mlp.up_proj`, `mlp.down_proj`
    /// (`Model::load`); learned positions (`wpe`), no rotary embedding; `transformer.ln_f`.
    Gpt2,
    /// GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's block and names with `Linear` projections stored
    /// `[out, in]`; `attn.c_attn` holds q, k and v per key/value group (multi-query: every query, then
    /// the one key and value; else per head), read as Falcon's.
    GptBigCode,
    /// GPT-Neo: GPT-2's norms (`ln_1`, `ln_2`, LayerNorms with biases) and positions, separate
    /// `attn.attention.{q,k,v}_proj` without biases, `attn.attention.out_proj` with one, `Linear`
    /// `mlp.c_fc` → act → `mlp.c_proj`.
    GptNeo,
}

impl BlockLayout {
    /// The norms are LayerNorms (all but LLaMA's and Arcee's), not RMSNorms.
    pub fn layer_norm(self) -> bool {
        !matches!(
            self,
            BlockLayout::Llama | BlockLayout::Arcee | BlockLayout::InternLm2 | BlockLayout::Exaone
        )
    }

    /// The LayerNorms have biases (all but Cohere's, OLMo's and MPT's).
    pub fn norm_bias(self) -> bool {
        self.layer_norm()
            && !matches!(
                self,
                BlockLayout::Cohere | BlockLayout::Olmo | BlockLayout::Mpt
            )
    }

    /// The norms have weights (all but OLMo's).
    pub fn norm_weight(self) -> bool {
        self != BlockLayout::Olmo
    }

    /// The attention's output projection (as the runtime reads it: GPT-2's is a transposed view).
    pub fn o_proj(self) -> &'static str {
        match self {
            BlockLayout::Llama
            | BlockLayout::Arcee
            | BlockLayout::Nemotron
            | BlockLayout::Olmo
            | BlockLayout::StableLm
            | BlockLayout::Cohere => "self_attn.o_proj",
            BlockLayout::NeoX { .. } => "attention.dense",
            BlockLayout::Phi => "self_attn.dense",
            BlockLayout::Starcoder2 => "self_attn.o_proj",
            BlockLayout::Gpt2 => "attn.o_proj",
            BlockLayout::GptBigCode => "attn.c_proj",
            BlockLayout::Falcon { .. } => "self_attention.dense",
            BlockLayout::InternLm2 => "attention.wo",
            BlockLayout::Mpt | BlockLayout::GptJ | BlockLayout::CodeGen => "attn.out_proj",
            BlockLayout::Exaone | BlockLayout::GptNeo => "attn.attention.out_proj",
            BlockLayout::Opt => "self_attn.out_proj",
        }
    }

    /// The projection holding q, k and v in groups side by side (GPT-NeoX, Falcon: one group per
    /// key/value head; CodeGen: 4), which the runtime reads as one `Linear` and gathers columns from.
    pub fn grouped_qkv(self) -> Option<&'static str> {
        match self {
            BlockLayout::NeoX { .. } => Some("attention.query_key_value"),
            BlockLayout::Falcon { .. } => Some("self_attention.query_key_value"),
            BlockLayout::InternLm2 => Some("attention.wqkv"),
            BlockLayout::GptBigCode => Some("attn.c_attn"),
            BlockLayout::CodeGen => Some("attn.qkv_proj"),
            _ => None,
        }
    }

    /// How [`BlockLayout::grouped_qkv`] lays out q, k and v: the groups (each holding an equal share of
    /// the queries, keys and values) and the order of the three within a group (indices into q, k, v).
    /// One group per key/value head in the order q, k, v (its queries, its key, its value), but
    /// CodeGen's 4 shards of q, v, k.
    pub fn qkv_groups(self, kv_heads: usize) -> (usize, [usize; 3]) {
        match self {
            BlockLayout::CodeGen => (4, [0, 2, 1]),
            _ => (kv_heads, [0, 1, 2]),
        }
    }

    /// The MLP reads the block's input through its own norm, in parallel with the attention (GPT-NeoX's
    /// parallel residual, Falcon's `ln_mlp`).
    pub fn mlp_reads_input(self) -> bool {
        matches!(
            self,
            BlockLayout::NeoX {
                parallel_residual: true
            } | BlockLayout::Falcon { ln_pair: true }
        )
    }

    /// The attention's q, k and v projections as the runtime reads them (GPT-NeoX reads its fused one).
    pub fn qkv_proj(self) -> [&'static str; 3] {
        match self {
            BlockLayout::Gpt2 | BlockLayout::Mpt | BlockLayout::GptJ => {
                ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
            }
            BlockLayout::Exaone | BlockLayout::GptNeo => [
                "attn.attention.q_proj",
                "attn.attention.k_proj",
                "attn.attention.v_proj",
            ],
            _ => ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        }
    }

    /// The stored projection of q, k and v one after the other, when `fused_qkv` (Phi-3, MPT).
    pub fn fused_qkv(self) -> &'static str {
        match self {
            BlockLayout::Mpt => "attn.Wqkv",
            _ => "self_attn.qkv_proj",
        }
    }

    /// A plain (ungated) MLP's two projections, up and down; `None` for the gated MLP.
    pub fn plain_mlp(self) -> Option<(&'static str, &'static str)> {
        match self {
            BlockLayout::Llama
            | BlockLayout::Olmo
            | BlockLayout::StableLm
            | BlockLayout::Cohere
            | BlockLayout::InternLm2
            | BlockLayout::Exaone => None,
            BlockLayout::Arcee | BlockLayout::Nemotron => Some(("mlp.up_proj", "mlp.down_proj")),
            BlockLayout::NeoX { .. } => Some(("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
            BlockLayout::Phi => Some(("mlp.fc1", "mlp.fc2")),
            BlockLayout::Starcoder2 | BlockLayout::GptBigCode | BlockLayout::GptNeo => {
                Some(("mlp.c_fc", "mlp.c_proj"))
            }
            BlockLayout::Gpt2 => Some(("mlp.up_proj", "mlp.down_proj")),
            BlockLayout::Opt => Some(("fc1", "fc2")),
            BlockLayout::Falcon { .. } => Some(("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
            BlockLayout::Mpt => Some(("ffn.up_proj", "ffn.down_proj")),
            BlockLayout::GptJ | BlockLayout::CodeGen => Some(("mlp.fc_in", "mlp.fc_out")),
        }
    }

    /// A gated MLP's module and its gate, up and down projections.
    pub fn gated_mlp(self) -> (&'static str, [&'static str; 3]) {
        match self {
            BlockLayout::InternLm2 => ("feed_forward", ["w1", "w3", "w2"]),
            BlockLayout::Exaone => ("mlp", ["c_fc_0", "c_fc_1", "c_proj"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        }
    }

    /// The block's norms' names where `norms` places them (GPT-2 names its two `ln_1`, `ln_2`).
    pub fn norm_names(self, norms: BlockNorms) -> [Option<&'static str>; 4] {
        match self {
            BlockLayout::Falcon { ln_pair: true } => [Some("ln_attn"), Some("ln_mlp"), None, None],
            BlockLayout::Gpt2
            | BlockLayout::GptBigCode
            | BlockLayout::Exaone
            | BlockLayout::GptNeo => [Some("ln_1"), Some("ln_2"), None, None],
            BlockLayout::InternLm2 => [Some("attention_norm"), Some("ffn_norm"), None, None],
            BlockLayout::Mpt => [Some("norm_1"), Some("norm_2"), None, None],
            BlockLayout::GptJ | BlockLayout::CodeGen => [Some("ln_1"), None, None, None],
            BlockLayout::Opt => [
                Some("self_attn_layer_norm"),
                Some("final_layer_norm"),
                None,
                None,
            ],
            _ => norms.names(),
        }
    }
}

/// The norm of the queries and keys (weights `self_attn.q_norm` / `k_norm`; the block's kind of norm:
/// RMSNorm, or Cohere's LayerNorm), after the projections and before the rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    Off,
    /// Over each head, `head_dim` long (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, `heads · head_dim` long (OLMo 2).
    Whole,
    /// Over each head, each head with weights of its own, `[heads, head_dim]` (Cohere's `use_qk_norm`:
    /// Command R+).
    HeadWeights,
    /// Over each head, without weights, in the layers with a rotary embedding only (Llama 4's
    /// `use_qk_norm`, after the rotation).
    Weightless,
}

/// A sparse mixture-of-experts MLP in place of the dense one (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a
/// router (`{prefix}.gate`, `[experts, hidden]`) scores the experts, softmax over all of them, the `top_k`
/// most probable run on the token (each a gated MLP `{prefix}.experts.{e}.{gate,up,down}`), their outputs
/// weighted by those probabilities (renormalised to sum to 1 with `normalise`) and summed.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always; the others' `norm_topk_prob`).
    pub normalise: bool,
    /// An expert's intermediate size (`moe_intermediate_size`; Mixtral's and OLMoE's
    /// `intermediate_size`).
    pub inter: usize,
    /// The shared expert(s) run on every token, added to the routed experts' output.
    pub shared: Option<SharedExpert>,
    /// How the router scores and picks the experts.
    pub router: MoeRouter,
    /// Per decoder layer: sparse, or a dense MLP of `intermediate_size` (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// The MLP's module (`block_sparse_moe` for Mixtral, else `mlp`).
    pub prefix: &'static str,
    /// An expert's gate, up and down projections (Mixtral: `w1`, `w3`, `w2`).
    pub projections: [&'static str; 3],
    /// GPT-OSS's experts: its clamped SwiGLU, biases on the router and on every expert projection,
    /// and the experts stored inputs first, gate and up interleaved (`mlp.experts.gate_up_proj`
    /// `[experts, hidden, 2 inter]`, `down_proj` `[experts, inter, hidden]`, their `_bias`es).
    pub oss: Option<OssSwiglu>,
    /// Llama 4's: each routed token × its routing weight goes into the expert, whose output is summed
    /// unweighted (the others weight the experts' outputs).
    pub input_scaled: bool,
    /// How a checkpoint that stores the experts fused (`experts.gate_up_proj`, `experts.down_proj`)
    /// lays them out.
    pub fused: FusedExperts,
}

/// The layout of a mixture's experts stored fused, all of a layer's in two tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedExperts {
    /// transformers 5's own (Mistral 4, Granite MoE once renamed): `gate_up_proj`
    /// `[experts, 2 inter, hidden]` (each expert's gate rows, then its up rows), `down_proj`
    /// `[experts, hidden, inter]`.
    OutputsFirst,
    /// Inputs first: `gate_up_proj` `[experts, hidden, 2 inter]`, `down_proj` `[experts, inter, hidden]`;
    /// the gate and up columns interleaved (GPT-OSS: 0, 2, … and 1, 3, …) or in halves (Llama 4).
    InputsFirst { interleaved: bool },
}

/// GPT-OSS's expert MLP: `down((clamp(up, −limit, limit) + 1) ⊙ m σ(alpha m))`, `m = min(gate, limit)`
/// (`swiglu_alpha`, `swiglu_limit`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OssSwiglu {
    pub alpha: f32,
    pub limit: f32,
}

/// A mixture's shared expert: a gated MLP (`gate_proj`, `up_proj`, `down_proj`) on every token.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedExpert {
    /// Its module: Qwen2-MoE's `mlp.shared_expert`, GLM-4.5's `mlp.shared_experts` (all of
    /// `n_shared_experts` in one MLP of their summed size).
    pub module: &'static str,
    pub inter: usize,
    /// Qwen2-MoE's output × σ(`mlp.shared_expert_gate` · x).
    pub gated: bool,
}

/// A router's scoring and choice (as `tape::moe::Router`, whose σ router also reads each layer's
/// `{prefix}.gate.e_score_correction_bias`).
#[derive(Clone, Debug, PartialEq)]
pub enum MoeRouter {
    /// Softmax over all the experts (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// ERNIE 4.5's softmax, the choice by probability + the correction bias `bias` (under the layer:
    /// `mlp.moe_statics.e_score_correction_bias`, `[1, experts]`).
    SoftmaxBiased { bias: &'static str },
    /// DeepSeek-V2's and Mistral 4's softmax: the choice among the experts of the best `topk_group` of
    /// `groups` groups by the sum of their `best` highest probabilities (DeepSeek-V2's
    /// `group_limited_greedy` 1, `greedy` one group; Mistral 4's 2), the weights × `scale`
    /// (`routed_scaling_factor`).
    SoftmaxGroups {
        groups: usize,
        topk_group: usize,
        best: usize,
        scale: f64,
    },
    /// GLM-4.5's (DeepSeek-V3's) σ: the choice among the experts of the best `topk_group` of `groups`
    /// groups (`n_group`, `topk_group`), the weights × `scale` (`routed_scaling_factor`); the
    /// correction bias under its layer at `bias` (GLM's `mlp.gate.e_score_correction_bias`,
    /// MiniMax-M2's `block_sparse_moe.e_score_correction_bias`). MiniMax-M2's: one group, scale 1.
    Sigmoid {
        groups: usize,
        topk_group: usize,
        scale: f64,
        bias: &'static str,
    },
    /// Llama 4's: the top k logits, weighted by their σ (no bias, no groups, no renormalisation).
    SigmoidTopK,
}

impl Moe {
    /// Whether decoder layer `l` has the sparse MLP.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.sparse_layers.get(l).copied().unwrap_or(false)
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The values of each head the rotary embedding turns: `head_dim` but for Phi-3's and GPT-NeoX's
    /// `partial_rotary_factor` (e.g. 0.75 in Phi-4-mini, Pythia's `rotary_pct` 0.25); the rest pass
    /// through.
    pub rotary_dim: usize,
    /// The norms' eps (`rms_norm_eps`; GPT-NeoX's LayerNorms: `layer_norm_eps`).
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// `pad_token_id`: the embedding row that takes no gradient from the lookup (transformers builds
    /// `nn.Embedding(vocab, hidden, padding_idx=pad_token_id)`); its lm_head gradient is kept.
    pub pad_token_id: Option<usize>,
    /// q/k/v projections carry a bias (qwen2 always; llama and qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama and qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// The RMSNorm of q and k, if any.
    pub qk_norm: QkNorm,
    /// The q/k norms run on the rotated q and k (HunYuan), not before the rotary embedding.
    pub qk_norm_after_rope: bool,
    /// gate/up/down carry a bias (llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// The checkpoint stores q/k/v as one `self_attn.qkv_proj` (phi3); the runtime reads its rows as
    /// the separate projections (`Weights::split_rows`).
    pub fused_qkv: bool,
    /// The checkpoint stores gate/up as one `mlp.gate_up_proj` (phi3, glm, glm4), read the same way.
    pub fused_gate_up: bool,
    /// The MLP's gate activation (`hidden_act`; Gemma 3's `hidden_activation`).
    pub activation: Activation,
    /// Added to every RMSNorm weight to make its gain: 1 for Gemma (`x̂ (1 + w)`), else 0.
    pub norm_offset: f32,
    /// The embedding's output factor: √hidden_size (as an f32) for Gemma, else 1; `Model::load` rounds it
    /// to the embedding's stored dtype, as transformers does.
    pub embed_scale: f32,
    /// The factor on the attention scores: Gemma 2 and 3's 1/√query_pre_attn_scalar; `None` is
    /// 1/√head_dim.
    pub attn_scale: Option<f32>,
    /// Gemma 2's soft-capping of the attention scores (`attn_logit_softcapping`): s ↦ c · tanh(s / c).
    pub attn_softcap: Option<f32>,
    /// Gemma 2's soft-capping of the logits (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Granite's factor on each block's attention and MLP outputs before their residual adds
    /// (`residual_multiplier`); `None` is 1.
    pub residual_scale: Option<f32>,
    /// Granite's factor on the logits, 1 / `logits_scaling` (applied to the lm_head's input); `None` is 1.
    pub logits_scale: Option<f32>,
    /// Where the block's norms sit.
    pub block_norms: BlockNorms,
    /// The rotary embedding of the sliding-window layers when it differs from the others' (Gemma 3:
    /// `rope_local_base_freq`, no scaling): (theta, scaling).
    pub sliding_rope: Option<(f64, RopeScaling)>,
    /// Sliding-window attention span w, when the config enables one: in a windowed layer query i sees the
    /// keys j with i − w < j ≤ i (transformers' `sliding_window_overlay` on the causal mask).
    pub sliding_window: Option<usize>,
    /// Per decoder layer: whether it uses the window (transformers' `layer_types` "sliding_attention").
    /// All false when `sliding_window` is `None`.
    pub sliding_layers: Vec<bool>,
    /// The wrapper's `model_type` when the decoder is the language model of a vision-language checkpoint
    /// (read from its `text_config`; `model_type` is then the decoder's).
    pub multimodal: Option<String>,
    /// The block's layout (LLaMA's, GPT-NeoX's, Phi's).
    pub layout: BlockLayout,
    /// The lm_head has a bias (Phi).
    pub lm_head_bias: bool,
    /// The sparse mixture-of-experts MLP, if the model has one.
    pub moe: Option<Moe>,
    /// Learned absolute position embeddings added to the token embeddings in place of the rotary
    /// embedding (GPT-2's `wpe`, OPT's `embed_positions`).
    pub learned_positions: Option<LearnedPositions>,
    /// Per decoder layer: whether its q and k get the rotary embedding (all true but for SmolLM3's NoPE
    /// layers, `no_rope_layers`, and Cohere 2's full-attention layers; none is rotated with
    /// `learned_positions`).
    pub rotary_layers: Vec<bool>,
    /// Which values of a head turn together (Cohere's interleaved pairs; the others' halves).
    pub rope_pairs: RopePairs,
    /// q, k and v clamped to ±this after their projections (OLMo's and OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// A learned logit per head (`self_attn.sinks`, `[heads]`) in each query row's softmax, with no
    /// value (Granite SWA; GPT-OSS's).
    pub attention_sinks: bool,
    /// Block-scaled FP8 weights (`quantization_config`, quant_method `fp8`: DeepSeek-V3, Kimi K2,
    /// MiniMax-M2, Qwen3's FP8 releases): the `weight_block_size` [rows, columns] of one scale. Each
    /// e4m3 weight `W` with a `W_scale_inv` reads as its values × their block's scale.
    pub fp8_block: Option<[usize; 2]>,
    /// ALiBi's position biases in place of a rotary embedding (Falcon-RW's `alibi`, BLOOM's).
    pub alibi: Option<Alibi>,
    /// A LayerNorm (with a bias) on the embeddings before the first layer (BLOOM's
    /// `word_embeddings_layernorm`).
    pub embed_norm: bool,
    /// DeepSeek's multi-head latent attention in place of q/k/v projections (`head_dim` is then a query's
    /// and a key's width, `nope + rope`).
    pub mla: Option<Mla>,
    /// Ministral 3's Llama 4 attention scaling (`llama_4_scaling_beta`, the rope settings'
    /// `original_max_position_embeddings`): queries × 1 + beta ln(1 + ⌊position / original⌋), which is
    /// 1 for the first `original` positions, the only ones the runtime runs (longer sequences are
    /// refused).
    pub query_scaling: Option<(f64, usize)>,
    /// The longest sequence the runtime runs, and what happens past it that it does not compute
    /// (Llama 4's chunked attention and its NoPE layers' query temperature, Ministral 3's query
    /// scaling); `None`: no limit.
    pub max_tokens: Option<(usize, String)>,
    /// A gate on the attention's output: × σ(g) per value, before o_proj (AFMoE's, MiniCPM 5 MoE's).
    pub attention_output_gate: Option<OutputGate>,
    /// Apertus's MLP activation: xIELU with two learned scalars per layer (`mlp.act_fn.alpha_p`,
    /// `alpha_n`) and its `beta` and `eps` buffers, in place of `activation`.
    pub mlp_xielu: bool,
}

/// Where an attention's output gate ([`ModelConfig::attention_output_gate`]) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputGate {
    /// A projection of its own, `self_attn.gate_proj` (AFMoE).
    Projection,
    /// The query's projection, `self_attn.q_gate_proj` `[heads · 2 head_dim, hidden]`: each head's query
    /// rows, then its gate's (MiniCPM 5 MoE; the hub names it `q_proj`, renamed at load).
    WithQuery,
}

/// DeepSeek's multi-head latent attention (MLA): the query through an optional low-rank bottleneck
/// (`q_a_proj` → RMSNorm `q_a_layernorm` → `q_b_proj`, else one `q_proj`); keys and values out of one
/// latent per token (`kv_a_proj_with_mqa`: `kv_lora_rank` values, RMSNorm `kv_a_layernorm`, then
/// `kv_b_proj` → per head `nope` key values and `v` values) and one rotary key of `rope` values shared
/// by every head. A head's query and key are [`nope` values | `rope` rotated values]; its value is `v`
/// wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mla {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

/// The eps of MLA's two latent RMSNorms: DeepseekV3RMSNorm's default (the attention builds them without
/// the config's `rms_norm_eps`).
pub const MLA_NORM_EPS: f64 = 1e-6;

/// A table of learned position embeddings: position p (from 0 in each sequence) reads row `p + offset`
/// (OPT's offset 2), for sequences of up to `max_tokens` tokens (the table has `max_tokens + offset`
/// rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedPositions {
    pub max_tokens: usize,
    pub offset: usize,
}

/// A vision-language checkpoint kind whose language model the runtime reads.
pub struct Multimodal {
    /// The wrapper's `model_type`.
    pub wrapper: &'static str,
    /// The decoder's `model_type` (when `text_config` omits it, or names the text class below).
    pub decoder: &'static str,
    /// The text config class's own `model_type`, read as `decoder` (Qwen2.5-VL's "qwen2_5_vl_text").
    pub text_type: Option<&'static str>,
    /// The text config class's defaults (a JSON object) of the fields a hub `text_config` may omit.
    pub defaults: &'static str,
    /// 4.x configs keep the text fields at the top level, beside `vision_config` (Qwen2-VL, Qwen2.5-VL).
    pub flat: bool,
}

/// The vision-language checkpoints whose language model the runtime reads. transformers' `to_diff_dict`
/// once wrote nested configs as their difference from the class defaults (e.g. Gemma 3 4B's `text_config`
/// has no `vocab_size`, llava-1.5's no `hidden_size`), so the defaults are part of the format. Values:
/// `Gemma3TextConfig`, `MistralConfig`, `LlamaConfig`, `Qwen2VLTextConfig`, `Qwen2_5_VLTextConfig`,
/// `Qwen3VLTextConfig`, `Llama4TextConfig` (4.50 – 5.25). With text-only input the Qwen-VL models' M-RoPE is the plain rotary
/// embedding (every position's three components are equal) and their language model is Qwen2's or
/// Qwen3's.
pub const MULTIMODAL: [Multimodal; 7] = [
    Multimodal {
        wrapper: "gemma3",
        decoder: "gemma3_text",
        text_type: None,
        defaults: r#"{"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4}"#,
        flat: false,
    },
    Multimodal {
        wrapper: "mistral3",
        decoder: "mistral",
        text_type: None,
        defaults: r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}"#,
        flat: false,
    },
    Multimodal {
        wrapper: "llava",
        decoder: "llama",
        text_type: None,
        defaults: r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32}"#,
        flat: false,
    },
    Multimodal {
        wrapper: "qwen2_vl",
        decoder: "qwen2",
        text_type: Some("qwen2_vl_text"),
        defaults: QWEN2_VL_TEXT_DEFAULTS,
        flat: true,
    },
    Multimodal {
        wrapper: "qwen2_5_vl",
        decoder: "qwen2",
        text_type: Some("qwen2_5_vl_text"),
        defaults: QWEN2_VL_TEXT_DEFAULTS,
        flat: true,
    },
    Multimodal {
        wrapper: "qwen3_vl",
        decoder: "qwen3",
        text_type: Some("qwen3_vl_text"),
        defaults: r#"{"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 500000.0}"#,
        flat: false,
    },
    Multimodal {
        wrapper: "llama4",
        decoder: "llama4_text",
        text_type: None,
        defaults: r#"{"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128}"#,
        flat: false,
    },
];

/// `Qwen2VLTextConfig`'s and `Qwen2_5_VLTextConfig`'s defaults (eps, θ and the window layers differ from
/// `Qwen2Config`'s).
const QWEN2_VL_TEXT_DEFAULTS: &str = r#"{"vocab_size": 152064, "hidden_size": 8192,
    "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_window_layers": 80}"#;

/// The language model's section of a vision-language config ([`text_config`]).
pub struct TextSection {
    /// The wrapper's `model_type`.
    pub wrapper: &'static str,
    /// The decoder's config: its `model_type` a supported decoder's, the class defaults filled in where
    /// the file omits them, the wrapper's `tie_word_embeddings` where only the wrapper has one.
    pub text: Value,
    /// Where the file keeps it: in `text_config`, or at the top level (a flat 4.x Qwen-VL config).
    pub nested: bool,
}

/// The language model's section of config `v` when `v` is a vision-language wrapper ([`MULTIMODAL`]);
/// `Ok(None)` for a plain decoder config.
pub fn text_config(v: &Value, path: &Path) -> Result<Option<TextSection>> {
    let Some(ty) = v.get("model_type").and_then(Value::as_str) else {
        return Ok(None);
    };
    let Some(m) = MULTIMODAL.iter().find(|m| m.wrapper == ty) else {
        return Ok(None);
    };
    let nested = v.get("text_config").is_some_and(Value::is_object);
    let mut text = match (nested, m.flat) {
        (true, _) => v["text_config"].clone(),
        (false, true) => {
            let mut top = v.clone();
            let obj = top
                .as_object_mut()
                .expect("a config with a model_type is an object");
            obj.remove("vision_config");
            obj.remove("model_type");
            top
        }
        (false, false) => {
            return Err(model_err(
                path,
                format!(
                    "model_type '{}' (vision-language) has no 'text_config' object",
                    m.wrapper
                ),
            ))
        }
    };
    let obj = text.as_object_mut().expect("checked above");
    let stated = obj.get("model_type").and_then(Value::as_str);
    // The defaults belong to the default decoder's class; another decoder inside the wrapper (llava
    // around a Mistral) states its own.
    if stated.is_none_or(|t| t == m.decoder || Some(t) == m.text_type) {
        obj.insert("model_type".into(), m.decoder.into());
        let defaults: Value = serde_json::from_str(m.defaults).expect("valid defaults");
        for (key, value) in defaults.as_object().expect("an object") {
            obj.entry(key).or_insert_with(|| value.clone());
        }
    }
    // Qwen-VL's 4.x `rope_scaling` {"type": "mrope", "mrope_section": …}: on text alone the three
    // position components are equal, which makes M-RoPE the plain rotary embedding.
    if m.text_type.is_some() {
        if let Some(rs) = obj.get_mut("rope_scaling").and_then(Value::as_object_mut) {
            let kind = rs.get("rope_type").or_else(|| rs.get("type"));
            if kind.and_then(Value::as_str) == Some("mrope") {
                rs.remove("type");
                rs.insert("rope_type".into(), "default".into());
            }
        }
    }
    if let Some(tie) = v.get("tie_word_embeddings") {
        obj.entry("tie_word_embeddings")
            .or_insert_with(|| tie.clone());
    }
    Ok(Some(TextSection {
        wrapper: m.wrapper,
        text,
        nested,
    }))
}

/// Upper bounds on a config's sizes, far above any released checkpoint (the largest have ~128 layers,
/// 256k-token vocabularies, 53k-wide MLPs): the config is read before the weights that would bound its
/// numbers, and some tables are sized from it right away (one entry per layer), so an absurd number must
/// not become an allocation; with every size below 2^24 no product of two overflows either.
const MAX_LAYERS: usize = 1 << 16;
const MAX_SIZE: usize = 1 << 24;
/// Released models use head_dim ≤ 256; the RoPE table has head_dim / 2 entries.
const MAX_HEAD_DIM: usize = 1 << 16;

fn model_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("{}: {msg}", path.display()))
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            model_err(
                path,
                format!("field '{key}' is missing or not a non-negative integer"),
            )
        })
}

/// `get_usize`, at most `max`.
fn get_size(v: &Value, key: &str, max: usize, path: &Path) -> Result<usize> {
    let x = get_usize(v, key, path)?;
    check_size(x, key, max, path)
}

fn check_size(x: usize, key: &str, max: usize, path: &Path) -> Result<usize> {
    if x > max {
        return Err(model_err(
            path,
            format!("field '{key}' is {x}, more than this runtime takes ({max})"),
        ));
    }
    Ok(x)
}

fn opt_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| model_err(path, format!("field '{key}' is not a non-negative integer"))),
    }
}

fn opt_f64(v: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| model_err(path, format!("field '{key}' is not a number"))),
    }
}

fn opt_bool(v: &Value, key: &str, path: &Path) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| model_err(path, format!("field '{key}' is not a boolean"))),
    }
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    /// [`Self::load`] of the file's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        if let Some(section) = text_config(v, path)? {
            if text_config(&section.text, path)?.is_some() {
                return Err(model_err(
                    path,
                    "'text_config' is itself a vision-language config",
                ));
            }
            let mut c = Self::from_json(&section.text, path)?;
            c.multimodal = Some(section.wrapper.to_string());
            return Ok(c);
        }
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| model_err(path, "field 'model_type' is missing"))?
            .to_string();
        // VaultGemma is Gemma 2 (its fields and class defaults) with LLaMA's pre-norm block: no norms after
        // the attention and the MLP, the MLP's input norm `pre_feedforward_layernorm` (read as LLaMA's
        // second norm: `model::renamed_tensors`).
        if model_type == "vaultgemma" {
            let mut gemma2 = v.clone();
            gemma2["model_type"] = "gemma2".into();
            let mut c = Self::from_json(&gemma2, path)?;
            c.model_type = model_type;
            c.block_norms = BlockNorms::Pre;
            return Ok(c);
        }
        // EXAONE MoE (K-EXAONE) is EXAONE 4's attention (and config) in a pre-norm block, with DeepSeek-V3's
        // mixture.
        if model_type == "exaone_moe" {
            let mut exaone4 = v.clone();
            exaone4["model_type"] = "exaone4".into();
            // ExaoneMoeConfig pads with 0 by default, Exaone4Config with nothing.
            if v.get("pad_token_id").is_none() {
                exaone4["pad_token_id"] = 0.into();
            }
            let mut c = Self::from_json(&exaone4, path)?;
            c.moe = Some(renamed_grouped_moe(
                v,
                &model_type,
                c.num_hidden_layers,
                path,
            )?);
            c.model_type = model_type;
            c.block_norms = BlockNorms::Pre;
            return Ok(c);
        }
        let fp8_block = parse_quantization(v, path)?;
        const TYPES: &str =
            "llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text, olmo2, olmo3, granite, \
             starcoder2, gpt_neox, phi, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt2, opt, smollm3, \
             stablelm, cohere, cohere2, internlm2, internlm3, glm, glm4, exaone4, falcon, olmo, ernie4_5, \
             helium, seed_oss, arcee, bloom, mpt, gptj, codegen, gpt_bigcode, glm4_moe, minimax_m2, \
             ernie4_5_moe, deepseek_v2, deepseek_v3, nemotron, glm4_moe_lite, youtu, dots1, minicpm3, \
             exaone, ministral, ministral3, mistral4, flex_olmo, jais2, cwm, granitemoe, \
             granitemoeshared, granite_swa, granitemoe_swa, gpt_oss, hunyuan_v1_dense, hunyuan_v1_moe, \
             vaultgemma, gpt_neo, llama4_text, hyperclovax, exaone_moe, afmoe, apertus, hy_v3, \
             minicpm5_moe";
        if !TYPES.split(", ").any(|t| t == model_type) {
            return Err(model_err(
                path,
                format!(
                    "model_type '{model_type}' is not supported ({TYPES}; vision-language: {})",
                    MULTIMODAL.map(|m| m.wrapper).join(", ")
                ),
            ));
        }
        let (gpt2, opt) = (model_type == "gpt2", model_type == "opt");
        // GPT-Neo's embedding, MLP biases and positions are GPT-BigCode's.
        let bigcode = matches!(model_type.as_str(), "gpt_bigcode" | "gpt_neo");
        let falcon = model_type == "falcon";
        let bloom = model_type == "bloom";
        let mpt = model_type == "mpt";
        // CodeGen is GPT-J with a fused, sharded q/k/v projection (and GPT-J's config names).
        let gptj = matches!(model_type.as_str(), "gptj" | "codegen");
        let aliased;
        let v = match model_type.as_str() {
            "gpt2" | "opt" | "falcon" | "bloom" | "mpt" | "gptj" | "codegen" | "gpt_bigcode"
            | "minimax_m2" | "exaone" | "ministral3" | "mistral4" | "cwm" | "gpt_oss"
            | "gpt_neo" | "apertus" => {
                aliased = aliased_config(v, &model_type, path)?;
                &aliased
            }
            _ => v,
        };
        // OPTConfig's `enable_bias` (default true) and FalconConfig's `bias` (default false) put a bias
        // on every projection.
        let enable_bias = opt && opt_bool(v, "enable_bias", path)?.unwrap_or(true)
            || falcon && opt_bool(v, "bias", path)?.unwrap_or(false)
            || bloom;
        let gemma = model_type.starts_with("gemma");
        let gemma3 = model_type == "gemma3_text";
        let olmo3 = model_type == "olmo3";
        let smollm3 = model_type == "smollm3";
        let neox = model_type == "gpt_neox";
        let phi = model_type == "phi";
        let starcoder2 = model_type == "starcoder2";
        // Starcoder2Config's `use_bias` (default true) puts a bias on every projection.
        let use_bias = starcoder2 && opt_bool(v, "use_bias", path)?.unwrap_or(true);
        let stablelm = model_type == "stablelm";
        let cohere = model_type.starts_with("cohere");
        // Phi's q/k LayerNorms (shared by the heads, with biases; no published checkpoint has them).
        if phi && opt_bool(v, "qk_layernorm", path)? == Some(true) {
            return Err(model_err(
                path,
                "field 'qk_layernorm' is true: phi's q/k LayerNorms are not supported",
            ));
        }
        // HyperCLOVA X is Granite with norms on the attention's and the MLP's outputs.
        let hyperclovax = model_type == "hyperclovax";
        let granite = hyperclovax
            || matches!(
                model_type.as_str(),
                "granite" | "granitemoe" | "granitemoeshared" | "granite_swa" | "granitemoe_swa"
            );
        // Granite SWA's windows, rotary θ per layer and attention sinks.
        let granite_swa = matches!(model_type.as_str(), "granite_swa" | "granitemoe_swa");
        let gpt_oss = model_type == "gpt_oss";
        let afmoe = model_type == "afmoe";
        let attention_output_gate = match model_type.as_str() {
            "afmoe" => Some(OutputGate::Projection),
            // MiniCPM5MoeConfig refuses `use_gated_attention` false: its gate is part of the checkpoint.
            "minicpm5_moe" if opt_bool(v, "use_gated_attention", path)? == Some(false) => {
                return Err(model_err(
                    path,
                    "field 'use_gated_attention' is false: minicpm5_moe without its gate is not \
                     supported (transformers refuses it too)",
                ))
            }
            "minicpm5_moe" => Some(OutputGate::WithQuery),
            _ => None,
        };
        // AfmoeConfig's `mup_enabled`: the embeddings × √hidden.
        let mup = afmoe && opt_bool(v, "mup_enabled", path)? == Some(true);
        let stablelm_parallel =
            stablelm && opt_bool(v, "use_parallel_residual", path)?.unwrap_or(false);
        // OLMo's, OLMoE's and MPT's clamping of q, k and v (after OLMoE's q/k norms).
        let clip_qkv = match model_type.as_str() {
            "olmo" | "olmoe" | "mpt" => opt_f64(v, "clip_qkv", path)?,
            _ => None,
        };
        if let Some(c) = clip_qkv.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return Err(model_err(
                path,
                format!("field 'clip_qkv' is {c}, not a positive number"),
            ));
        }
        let olmo = model_type == "olmo";
        // Granite's multipliers (GraniteConfig's defaults 1; attention_multiplier replaces 1/√head_dim).
        let multiplier = |key: &str| -> Result<Option<f32>> {
            if !granite {
                return Ok(None);
            }
            let m = opt_f64(v, key, path)?.unwrap_or(1.0);
            if !(m > 0.0 && m.is_finite()) {
                return Err(model_err(
                    path,
                    format!("field '{key}' is {m}, not a positive number"),
                ));
            }
            Ok(Some(m as f32))
        };
        // HyperCLOVAXConfig's attention_multiplier defaults to 1/√head_dim (the usual scale), Granite's
        // to 1.
        let attention_multiplier = match v.get("attention_multiplier") {
            None | Some(Value::Null) if hyperclovax => None,
            _ => multiplier("attention_multiplier")?,
        };
        let embedding_multiplier = multiplier("embedding_multiplier")?;
        let residual_scale = multiplier("residual_multiplier")?.filter(|&m| m != 1.0);
        let logits_scale = match cohere {
            // CohereConfig's `logit_scale` (default 0.0625) multiplies the logits.
            true => Some(opt_f64(v, "logit_scale", path)?.unwrap_or(0.0625) as f32),
            // Granite divides the logits by `logits_scaling`, HyperCLOVA X multiplies them.
            false if hyperclovax => multiplier("logits_scaling")?,
            false => multiplier("logits_scaling")?.map(|m| 1.0 / m),
        }
        .filter(|&m| m != 1.0);
        // Gemma 2 and 3 share the sandwich norms and the score scale.
        let gemma23 = gemma3 || model_type == "gemma2";
        // ApertusConfig's hidden_act (default xielu): xIELU's learned parameters make it an op of its own.
        let mlp_xielu = model_type == "apertus"
            && v.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("xielu")
                == "xielu";
        let activation = match mlp_xielu {
            // Not read: the MLP runs op::Xielu.
            true => Activation::Silu,
            false => parse_activation(v, &model_type, path)?,
        };
        let (attn_softcap, final_softcap) = parse_softcaps(v, &model_type, path)?;
        let hidden_size = get_size(v, "hidden_size", MAX_SIZE, path)?;
        let num_attention_heads = get_size(v, "num_attention_heads", MAX_SIZE, path)?;
        // MiniCPM5MoeConfig's default is 2 key/value heads (null: one per query head).
        let kv_default = match (model_type.as_str(), v.get("num_key_value_heads")) {
            ("minicpm5_moe", None) => 2,
            _ => num_attention_heads,
        };
        let num_key_value_heads = check_size(
            opt_usize(v, "num_key_value_heads", path)?.unwrap_or(kv_default),
            "num_key_value_heads",
            MAX_SIZE,
            path,
        )?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(model_err(
                path,
                format!(
                    "num_attention_heads ({num_attention_heads}) is not a positive multiple of \
                     num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        // Gemma's config classes default head_dim to 256, InternLM3's and GLM's to 128, the others
        // derive it.
        let default_head_dim = match model_type.as_str() {
            _ if gemma => 256,
            "internlm3" | "glm" | "glm4" | "ernie4_5" | "helium" | "seed_oss" | "minimax_m2"
            | "ministral3" | "cwm" | "llama4_text" | "hy_v3" | "minicpm5_moe" => 128,
            "gpt_oss" => 64,
            _ => hidden_size / num_attention_heads,
        };
        // DeepSeek's multi-head latent attention: DeepSeek-V2's and V3's heads, and those of the families
        // built on them (their configs' `head_dim` is the rotary part's width, or Mistral 4's whole head).
        let latent_attention = matches!(
            model_type.as_str(),
            "deepseek_v2" | "deepseek_v3" | "glm4_moe_lite" | "youtu" | "minicpm3" | "mistral4"
        );
        let mla = match latent_attention {
            true => {
                let defaults = match model_type.as_str() {
                    "glm4_moe_lite" => GLM4_MOE_LITE_MLA,
                    "mistral4" => MISTRAL4_MLA,
                    "minicpm3" => Mla {
                        v: hidden_size / num_attention_heads,
                        ..MINICPM3_MLA
                    },
                    _ => DEEPSEEK_MLA,
                };
                Some(parse_mla(
                    v,
                    [num_attention_heads, num_key_value_heads],
                    defaults,
                    path,
                )?)
            }
            false => None,
        };
        let head_dim = match mla {
            Some(m) => m.nope + m.rope,
            None => check_size(
                opt_usize(v, "head_dim", path)?.unwrap_or(default_head_dim),
                "head_dim",
                MAX_HEAD_DIM,
                path,
            )?,
        };
        if mla.is_none() && (head_dim == 0 || head_dim % 2 != 0) {
            return Err(model_err(
                path,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        // transformers 5.x nests the rope settings in `rope_parameters` (theta included); 4.x has
        // top-level `rope_theta` and an optional `rope_scaling` object. Gemma 3 has one per layer kind.
        let (rope_theta, rope_scaling, rotary_dim, sliding_rope) = if gemma3 || olmo3 {
            let (global, local) = parse_per_kind_rope(v, &model_type, head_dim, path)?;
            (global.0, global.1, head_dim, Some(local))
        } else {
            // Mistral 4 rotates `partial_rotary_factor` (rope / head_dim) of the whole head.
            let rotated = match mla {
                Some(m) if model_type != "mistral4" => m.rope,
                _ => head_dim,
            };
            let (theta, scaling, rotary_dim) = parse_rope(v, &model_type, rotated, path)?;
            (theta, scaling, rotary_dim, None)
        };
        // GPTNeoXConfig defaults attention_bias to true (its MLP always has biases).
        // GLM's config classes default attention_bias to true (q, k and v only); InternLM3's hub configs
        // name the two `qkv_bias` and `bias` (InternLM3Config's attribute_map).
        let internlm3 = model_type == "internlm3";
        let alias = |key: &str, old: &str| -> Result<Option<bool>> {
            match (opt_bool(v, key, path)?, internlm3) {
                (None, true) => opt_bool(v, old, path),
                (b, _) => Ok(b),
            }
        };
        let glm = matches!(model_type.as_str(), "glm" | "glm4");
        // ERNIE 4.5 MoE: ERNIE 4.5's attention and dense MLP.
        let ernie = matches!(model_type.as_str(), "ernie4_5" | "ernie4_5_moe");
        let ernie_bias = ernie && opt_bool(v, "use_bias", path)?.unwrap_or(false);
        // Cohere, GLM, ERNIE 4.5 and Helium rotate interleaved pairs (GLM's rotate_half).
        // DeepSeek-V2 too, and V3 unless `rope_interleave` is false (its de-interleaving permutes q and k
        // alike: the same scores).
        let interleaved = cohere
            || glm
            || gptj
            || ernie
            || matches!(model_type.as_str(), "helium" | "llama4_text")
            || model_type == "deepseek_v2"
            || matches!(
                model_type.as_str(),
                "deepseek_v3" | "glm4_moe_lite" | "youtu" | "mistral4"
            ) && opt_bool(v, "rope_interleave", path)?.unwrap_or(true);
        // How a Falcon block runs its attention and MLP (read once; `None` for the other types).
        let falcon_block = match bloom {
            // BLOOM's block is Falcon's oldest one (Falcon-RW was trained with BLOOM's code).
            true => Some(FalconBlock::Sequential),
            false => falcon.then(|| falcon_block(v, path)).transpose()?,
        };
        // Jais2Config puts biases on every projection by default.
        let jais2 = model_type == "jais2";
        let attention_bias = alias("attention_bias", "qkv_bias")?.unwrap_or(
            neox || glm || jais2 || matches!(model_type.as_str(), "seed_oss" | "gpt_oss"),
        );
        let mlp_bias = alias("mlp_bias", "bias")?.unwrap_or(jais2);
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            // Qwen2MoeConfig's `qkv_bias` (default true; absent from 4.x configs).
            "qwen2_moe" => (opt_bool(v, "qkv_bias", path)?.unwrap_or(true), false),
            "gpt_neox" => (attention_bias, attention_bias),
            "phi" | "gpt2" | "gpt_bigcode" => (true, true),
            // GPT-Neo: q/k/v without biases, out_proj with one.
            "gpt_neo" => (false, true),
            "opt" | "falcon" | "bloom" => (enable_bias, enable_bias),
            "stablelm" => (opt_bool(v, "use_qkv_bias", path)?.unwrap_or(false), false),
            "cohere" | "cohere2" | "internlm3" => (attention_bias, attention_bias),
            // InternLM2Config's `bias` (default true) is on wqkv and wo; its MLP has none.
            "internlm2" => {
                let b = opt_bool(v, "bias", path)?.unwrap_or(true);
                (b, b)
            }
            "glm" | "glm4" | "glm4_moe" | "helium" => (attention_bias, false),
            // Ernie4_5Config's `use_bias` puts a bias on every projection.
            "ernie4_5" | "ernie4_5_moe" => (ernie_bias, ernie_bias),
            // SeedOssConfig: q/k/v biases by default, o_proj's its own `attention_out_bias`.
            "seed_oss" => (
                attention_bias,
                opt_bool(v, "attention_out_bias", path)?.unwrap_or(false),
            ),
            "starcoder2" => (use_bias, use_bias),
            "llama" | "granite" | "qwen3" | "gemma" | "gemma2" | "gemma3_text" | "olmo"
            | "olmo2" | "olmo3" | "qwen3_moe" | "olmoe" | "smollm3" | "arcee" | "deepseek_v2"
            | "deepseek_v3" | "nemotron" | "glm4_moe_lite" | "youtu" | "dots1" | "minicpm3"
            | "exaone" | "mistral4" | "flex_olmo" | "jais2" | "granitemoe" | "granitemoeshared"
            | "granite_swa" | "granitemoe_swa" | "gpt_oss" | "hunyuan_v1_dense"
            | "hunyuan_v1_moe" | "llama4_text" | "hyperclovax" | "afmoe" | "apertus" | "hy_v3"
            | "minicpm5_moe" => (attention_bias, attention_bias),
            _ => (false, false), // mistral, phi3, mixtral
        };
        let num_hidden_layers = get_size(v, "num_hidden_layers", MAX_LAYERS, path)?;
        let query_scaling = match model_type.as_str() {
            "ministral3" | "mistral4" => llama4_query_scaling(v, path)?,
            _ => None,
        };
        let max_tokens = match query_scaling {
            Some((_, unscaled)) => Some((
                unscaled,
                format!(
                    "past {unscaled} tokens {model_type} scales its queries (llama_4_scaling_beta)"
                ),
            )),
            None if model_type == "llama4_text" => llama4_max_tokens(v, num_hidden_layers, path)?,
            None => None,
        };
        let minicpm = match model_type.as_str() {
            "minicpm3" => Some(minicpm3_scales(v, hidden_size, num_hidden_layers, path)?),
            _ => None,
        };
        let (sliding_window, sliding_layers) =
            parse_sliding_window(v, &model_type, num_hidden_layers, path)?;
        let (rope_theta, sliding_rope, layer_rotary) = match granite_swa {
            true => {
                let (theta, sliding, rotary) =
                    layer_rope_theta(v, &sliding_layers, rope_theta, &rope_scaling, path)?;
                (theta, sliding, Some(rotary))
            }
            false => (rope_theta, sliding_rope, None),
        };
        let qk_norm_after_rope = model_type.starts_with("hunyuan") || model_type == "llama4_text";
        let qk_norm = match model_type.as_str() {
            "qwen3" | "gemma3_text" | "qwen3_moe" | "dots1" => QkNorm::PerHead,
            "olmo2" | "olmo3" | "olmoe" | "minimax_m2" | "flex_olmo" => QkNorm::Whole,
            "exaone4" | "hunyuan_v1_dense" | "hunyuan_v1_moe" | "afmoe" | "apertus" | "hy_v3" => {
                QkNorm::PerHead
            }
            // Glm4MoeConfig's `use_qk_norm`: RMSNorms over each head.
            "glm4_moe" if opt_bool(v, "use_qk_norm", path)? == Some(true) => QkNorm::PerHead,
            // CohereConfig's `use_qk_norm` (Command R+): LayerNorms of `[heads, head_dim]`.
            "cohere" if opt_bool(v, "use_qk_norm", path)? == Some(true) => QkNorm::HeadWeights,
            // StableLmConfig's `qk_layernorm` (StableLM 2 12B): a LayerNorm module per head.
            "stablelm" if opt_bool(v, "qk_layernorm", path)? == Some(true) => QkNorm::HeadWeights,
            // Llama4TextConfig's `use_qk_norm` (default true).
            "llama4_text" if opt_bool(v, "use_qk_norm", path)? != Some(false) => QkNorm::Weightless,
            _ => QkNorm::Off,
        };
        // Gemma 2 and 3 scale the scores by 1/√query_pre_attn_scalar (class default 256).
        let attn_scale = if gemma23 {
            let s = opt_f64(v, "query_pre_attn_scalar", path)?.unwrap_or(256.0);
            if !(s > 0.0 && s.is_finite()) {
                return Err(model_err(
                    path,
                    format!("field 'query_pre_attn_scalar' is {s}, not a positive number"),
                ));
            }
            Some(s.powf(-0.5) as f32)
        } else if (gpt2 || bigcode) && opt_bool(v, "scale_attn_weights", path)? == Some(false)
            || model_type == "gpt_neo"
        {
            // GPT-Neo never scales its scores.
            Some(1.0)
        } else if let Some(s) = opt_f64(v, "mpt_softmax_scale", path)?.filter(|_| mpt) {
            // MPT's attn_config.softmax_scale (None: 1/√head_dim).
            if !(s > 0.0 && s.is_finite()) {
                return Err(model_err(
                    path,
                    format!("attn_config.softmax_scale is {s}, not a positive number"),
                ));
            }
            Some(s as f32)
        } else if latent_attention {
            mla_softmax_scale(v, head_dim, path)?
        } else {
            None
        };
        let layout = match model_type.as_str() {
            "gpt_neox" => BlockLayout::NeoX {
                parallel_residual: opt_bool(v, "use_parallel_residual", path)?.unwrap_or(true),
            },
            "phi" => BlockLayout::Phi,
            "starcoder2" => BlockLayout::Starcoder2,
            "gpt2" => BlockLayout::Gpt2,
            "opt" => BlockLayout::Opt,
            "stablelm" => BlockLayout::StableLm,
            "olmo" => BlockLayout::Olmo,
            // Apertus: Arcee's up → act → down MLP (xIELU), its norms renamed at load.
            "arcee" | "apertus" => BlockLayout::Arcee,
            "exaone" => BlockLayout::Exaone,
            "nemotron" | "jais2" => BlockLayout::Nemotron,
            "falcon" | "bloom" => BlockLayout::Falcon {
                ln_pair: falcon_block == Some(FalconBlock::LnPair),
            },
            "cohere" | "cohere2" => BlockLayout::Cohere,
            "internlm2" => BlockLayout::InternLm2,
            "mpt" => BlockLayout::Mpt,
            "gptj" => BlockLayout::GptJ,
            "codegen" => BlockLayout::CodeGen,
            "gpt_bigcode" => BlockLayout::GptBigCode,
            "gpt_neo" => BlockLayout::GptNeo,
            _ => BlockLayout::Llama,
        };
        let learned_positions = match model_type.as_str() {
            "gpt2" | "gpt_bigcode" => Some(LearnedPositions {
                max_tokens: get_size(v, "n_positions", MAX_SIZE, path)?,
                offset: 0,
            }),
            "gpt_neo" => Some(LearnedPositions {
                max_tokens: get_size(v, "max_position_embeddings", MAX_SIZE, path)?,
                offset: 0,
            }),
            "opt" => Some(LearnedPositions {
                max_tokens: get_size(v, "max_position_embeddings", MAX_SIZE, path)?,
                offset: 2,
            }),
            _ => None,
        };
        let vocab_size = get_size(v, "vocab_size", MAX_SIZE, path)?;
        // Llama 4's dense layers' MLP is `intermediate_size_mlp` wide, its experts `intermediate_size`.
        let intermediate_size = match model_type.as_str() {
            "llama4_text" => size_within(v, "intermediate_size_mlp", 16384, path)?,
            _ => get_size(v, "intermediate_size", MAX_SIZE, path)?,
        };
        let moe = parse_moe(v, &model_type, num_hidden_layers, intermediate_size, path)?;
        // GPT-NeoX's, GPT-2's, GPT-BigCode's, BLOOM's, MPT's and GPT-J's embeddings have no padding_idx:
        // every row takes its gradient.
        let pad_token_id = match neox || gpt2 || bigcode || bloom || mpt || gptj {
            true => None,
            false => parse_pad_token_id(v, vocab_size, &model_type, path)?,
        };
        // Falcon-RW: ALiBi, BLOOM's slopes, added to the scores before Falcon scales them by 1/√head_dim
        // (so the slopes are scaled too), and no rotary embedding.
        // BLOOM and MPT: the same slopes added to the scaled scores (MPT's interleaving of the slopes for
        // the next power of two is BLOOM's sequence).
        let alibi = match bloom || mpt {
            true => Some(Alibi {
                max_bias: 8.0,
                factor: 1.0,
            }),
            false => (falcon && opt_bool(v, "alibi", path)? == Some(true)).then(|| Alibi {
                max_bias: 8.0,
                factor: 1.0 / (head_dim as f32).sqrt(),
            }),
        };
        let rotary_layers = match model_type.as_str() {
            _ if alibi.is_some() => vec![false; num_hidden_layers],
            "smollm3" | "llama4_text" => nope_rotary_layers(v, num_hidden_layers, path)?,
            _ if layer_rotary.is_some() => layer_rotary.expect("checked"),
            // Cohere 2 and AFMoE rotate in their sliding-window layers only.
            "cohere2" | "afmoe" => sliding_layers.clone(),
            // EXAONE 4 too, when it has a window.
            "exaone4" if sliding_window.is_some() => sliding_layers.clone(),
            _ => vec![learned_positions.is_none(); num_hidden_layers],
        };
        // The config classes' defaults: 1e-5 for Phi-3, OLMo 2, GPT-NeoX and Phi (`layer_norm_eps`),
        // StarCoder2 (`norm_epsilon`), Mixtral and OLMoE, 1e-6 for the others.
        let rms_norm_eps = match olmo {
            // OlmoLayerNorm's eps is 1e-5 whatever the config says (OlmoConfig has none).
            true => 1e-5,
            false => opt_f64(
                v,
                match model_type.as_str() {
                    "gpt_neox" | "phi" | "stablelm" | "cohere" | "cohere2" | "jais2" => {
                        "layer_norm_eps"
                    }
                    "starcoder2" => "norm_epsilon",
                    "nemotron" => "norm_eps",
                    _ => "rms_norm_eps",
                },
                path,
            )?
            .unwrap_or(
                if matches!(
                    model_type.as_str(),
                    "phi3"
                        | "olmo2"
                        | "olmo3"
                        | "gpt_neox"
                        | "phi"
                        | "starcoder2"
                        | "mixtral"
                        | "olmoe"
                        | "gpt2"
                        | "opt"
                        | "stablelm"
                        | "cohere"
                        | "cohere2"
                        | "internlm3"
                        | "exaone4"
                        | "ernie4_5"
                        | "ernie4_5_moe"
                        | "arcee"
                        | "glm4_moe"
                        | "nemotron"
                        | "glm4_moe_lite"
                        | "minicpm3"
                        | "exaone"
                        | "ministral3"
                        | "jais2"
                        | "cwm"
                        | "granite_swa"
                        | "gpt_oss"
                        | "hunyuan_v1_dense"
                        | "hunyuan_v1_moe"
                        | "llama4_text"
                        | "afmoe"
                        | "apertus"
                        | "hy_v3"
                ) {
                    1e-5
                } else if model_type == "helium" {
                    1e-8
                } else if matches!(model_type.as_str(), "glm" | "glm4") {
                    1.5625e-7
                } else {
                    1e-6
                },
            ),
        };
        Ok(ModelConfig {
            vocab_size,
            pad_token_id,
            intermediate_size,
            num_hidden_layers,
            rms_norm_eps,
            // Gemma's, StarCoder2's, GPT-2's, OPT's, SmolLM3's, Cohere's, Falcon's and ERNIE 4.5's config
            // classes tie by default.
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings", path)?.unwrap_or(
                gemma
                    || starcoder2
                    || gpt2
                    || bigcode
                    || opt
                    || smollm3
                    || cohere
                    || falcon
                    || bloom
                    || mpt
                    || ernie
                    || matches!(model_type.as_str(), "youtu" | "minicpm3" | "granite_swa"),
            ),
            mlp_bias: matches!(
                model_type.as_str(),
                "llama"
                    | "granite"
                    | "hyperclovax"
                    | "granite_swa"
                    | "internlm3"
                    | "helium"
                    | "seed_oss"
                    | "arcee"
                    | "nemotron"
                    | "exaone"
                    | "jais2"
            ) && mlp_bias
                || ernie_bias
                || neox
                || phi
                || gpt2
                || bigcode
                || use_bias
                || enable_bias
                || gptj,
            fused_qkv: matches!(model_type.as_str(), "phi3" | "mpt"),
            fused_gate_up: matches!(model_type.as_str(), "phi3" | "glm" | "glm4"),
            activation,
            // Gemma's and Nemotron's gain is 1 + w; OLMo's LayerNorms have no weight: a gain of 1.
            norm_offset: if gemma || olmo || model_type == "nemotron" {
                1.0
            } else {
                0.0
            },
            embed_scale: match minicpm {
                _ if gemma || mup => (hidden_size as f64).sqrt() as f32,
                Some([scale_emb, ..]) => scale_emb,
                None => embedding_multiplier.unwrap_or(1.0),
            },
            attn_scale: attn_scale.or(attention_multiplier),
            residual_scale: residual_scale.or(minicpm.map(|m| m[1]).filter(|&m| m != 1.0)),
            logits_scale: logits_scale.or(minicpm.map(|m| m[2]).filter(|&m| m != 1.0)),
            attn_softcap,
            final_softcap,
            block_norms: match model_type.as_str() {
                "olmo2" | "olmo3" | "exaone4" | "flex_olmo" => BlockNorms::Post,
                // AFMoE's four norms, renamed at load as GLM-4's.
                "glm4" | "afmoe" => BlockNorms::Glm4,
                // HyperCLOVAXConfig's `use_post_norm` (default true): GLM-4's four norms (the two
                // output norms `post_norm1`, `post_norm2` renamed at load).
                "hyperclovax" if opt_bool(v, "use_post_norm", path)? != Some(false) => {
                    BlockNorms::Glm4
                }
                "phi" => BlockNorms::Shared,
                _ if gptj => BlockNorms::Shared,
                "stablelm" if stablelm_parallel => BlockNorms::Shared,
                "cohere" | "cohere2" => BlockNorms::Shared,
                _ if falcon_block == Some(FalconBlock::SharedNorm) => BlockNorms::Shared,
                _ if gemma23 => BlockNorms::Sandwich,
                _ => BlockNorms::Pre,
            },
            sliding_rope,
            model_type,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            qk_norm,
            qk_norm_after_rope,
            sliding_window,
            sliding_layers,
            multimodal: None,
            layout,
            lm_head_bias: phi || gptj,
            moe,
            rotary_layers,
            alibi,
            embed_norm: bloom,
            clip_qkv: clip_qkv.map(|c| c as f32),
            attention_sinks: granite_swa || gpt_oss,
            fp8_block,
            rope_pairs: match interleaved {
                true => RopePairs::Interleaved,
                false => RopePairs::Halves,
            },
            learned_positions,
            mla,
            query_scaling,
            max_tokens,
            attention_output_gate,
            mlp_xielu,
        })
    }

    /// The q norm's and the k norm's rows: (the values a row normalises, the rows of weights: 1, shared
    /// by every row, or one per head), `None` without them.
    pub fn qk_norm_rows(&self) -> Option<[(usize, usize); 2]> {
        let (hd, heads, kv_heads) = (
            self.head_dim,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        match self.qk_norm {
            QkNorm::Off => None,
            QkNorm::PerHead | QkNorm::Weightless => Some([(hd, 1), (hd, 1)]),
            QkNorm::Whole => Some([(heads * hd, 1), (kv_heads * hd, 1)]),
            QkNorm::HeadWeights => Some([(hd, heads), (hd, kv_heads)]),
        }
    }

    /// The width of the attention's output, the input of its output projection: `heads × head_dim`, or
    /// `heads × v` under MLA.
    pub fn attention_width(&self) -> usize {
        self.num_attention_heads * self.mla.map_or(self.head_dim, |m| m.v)
    }

    /// The attention window of decoder layer `layer`, `None` for full causal attention.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// The rotary embedding of a sequence of `tokens` tokens in a sliding-window layer (`sliding`) or a
    /// full-attention one (they differ in Gemma 3 only): the inverse frequencies (`rotary_dim / 2`),
    /// after the configured scaling (HF's `_compute_default_rope_parameters`, `_compute_llama3_parameters`,
    /// `_compute_longrope_parameters`), and the factor on cos and sin (HF's `attention_scaling`).
    pub fn rope_frequencies(&self, sliding: bool, tokens: usize) -> (Vec<f64>, f64) {
        let (theta, scaling) = match &self.sliding_rope {
            Some((theta, scaling)) if sliding => (*theta, scaling),
            _ => (self.rope_theta, &self.rope_scaling),
        };
        let d = self.rotary_dim;
        // HF computes these in f32; round the same way. `ext` divides a frequency (LongRoPE's factors).
        let freq = |i: usize, ext: f32| -> f64 {
            (1.0 / (ext * (theta as f32).powf((2 * i) as f32 / d as f32))) as f64
        };
        let base = || (0..d / 2).map(|i| freq(i, 1.0)).collect::<Vec<f64>>();
        match scaling {
            RopeScaling::Default => (base(), 1.0),
            &RopeScaling::Dynamic {
                factor,
                max_position_embeddings: max,
            } => {
                if tokens <= max {
                    return (base(), 1.0);
                }
                let grown = theta
                    * (factor * tokens as f64 / max as f64 - (factor - 1.0))
                        .powf(d as f64 / (d as f64 - 2.0));
                let f = (0..d / 2)
                    .map(|i| (1.0 / (grown as f32).powf((2 * i) as f32 / d as f32)) as f64)
                    .collect();
                (f, 1.0)
            }
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                // The dimension (of d) at which a frequency turns `rotations` times in `old` tokens.
                let correction = |rotations: f64| {
                    d as f64 * (old / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let f = (0..d / 2)
                    .map(|i| {
                        // HF: float32 throughout but for the correction range.
                        let pos = (theta as f32).powf((2 * i) as f32 / d as f32);
                        let (extrapolated, interpolated) = (1.0 / pos, 1.0 / (factor as f32 * pos));
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        (interpolated * (1.0 - keep) + extrapolated * keep) as f64
                    })
                    .collect();
                (f, attention_factor)
            }
            RopeScaling::Linear { factor } => (base().iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let ext = if tokens > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let f = (0..d / 2).map(|i| freq(i, ext[i] as f32)).collect();
                (f, *attention_factor)
            }
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let f = base()
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (f, 1.0)
            }
        }
    }
}

/// The window and which layers use it, as transformers 5.x decides (`MistralConfig`, `Qwen2Config`, their
/// `modeling_*.py` and `masking_utils.create_sliding_window_causal_mask`):
/// * mistral: `sliding_window` (absent → the class default 4096, null → none) applies to every layer;
///   MistralModel builds one mask for all layers and ignores any `layer_types`.
/// * phi3, starcoder2: as mistral (Phi3Model is MistralModel's; StarCoder2 picks the sliding-window mask
///   for every layer when `sliding_window` is set), but the class default is no window.
/// * gemma3_text: `sliding_window` (absent → 4096) on the layers `layer_types` names "sliding_attention";
///   without `layer_types`, every layer but each `sliding_window_pattern`-th (absent → 6).
/// * gemma2: as gemma3_text with a pattern of 2 (the even layers windowed).
/// * qwen2: the window is `sliding_window` (absent → 4096) only with `use_sliding_window` true. Layer l is
///   windowed when `layer_types[l]` is "sliding_attention" or, without `layer_types`, when the window is on
///   and l ≥ `max_window_layers` (absent → 28). A sliding layer without a window is an error there too.
/// * llama: never windowed.
fn parse_sliding_window(
    v: &Value,
    model_type: &str,
    layers: usize,
    path: &Path,
) -> Result<(Option<usize>, Vec<bool>)> {
    const CLASS_DEFAULT_WINDOW: usize = 4096;
    const CLASS_DEFAULT_MAX_WINDOW_LAYERS: usize = 28;
    let window = || -> Result<Option<usize>> {
        let w = match v.get("sliding_window") {
            None if matches!(
                model_type,
                "phi3" | "starcoder2" | "mixtral" | "smollm3" | "ministral3"
            ) =>
            {
                None
            }
            None if model_type == "cwm" => Some(8192),
            None if matches!(model_type, "granite_swa" | "granitemoe_swa" | "gpt_oss") => Some(128),
            None if model_type == "afmoe" => Some(1024),
            None => Some(CLASS_DEFAULT_WINDOW),
            Some(_) => opt_usize(v, "sliding_window", path)?,
        };
        if w == Some(0) {
            return Err(model_err(
                path,
                "field 'sliding_window' is 0 (a query would see no key)",
            ));
        }
        Ok(w)
    };
    match model_type {
        "gemma2" | "gemma3_text" | "olmo3" | "cohere2" | "exaone4" | "cwm" | "granite_swa"
        | "granitemoe_swa" | "gpt_oss" | "afmoe" => {
            let w = window()?;
            let derived = || {
                Ok(pattern_layer_kinds(v, model_type, layers, path)?
                    .expect("Gemma 2 and 3, OLMo 3, Cohere 2 and EXAONE 4 have a layer pattern"))
            };
            Ok((w, layer_kinds(v, layers, w, derived, "", path)?))
        }
        "mistral" | "phi3" | "starcoder2" | "mixtral" | "ministral3" => {
            let w = window()?;
            Ok((w, vec![w.is_some(); layers]))
        }
        // Ministral (8B): the window on the layers `layer_types` names, else on every layer (GPT-Neo's
        // are always written, from its `attention_types`).
        "ministral" | "gpt_neo" => {
            let w = window()?;
            let every = || Ok(vec![w.is_some(); layers]);
            Ok((w, layer_kinds(v, layers, w, every, "", path)?))
        }
        // Qwen3 windows its layers as Qwen2 does (use_sliding_window, max_window_layers, layer_types);
        // dots1 too, without the switch (a window is on where `sliding_window` is not null) and with
        // max_window_layers 62 by default.
        "qwen2" | "qwen3" | "dots1" => {
            let dots1 = model_type == "dots1";
            let w = if dots1 || opt_bool(v, "use_sliding_window", path)?.unwrap_or(false) {
                window()?
            } else {
                None
            };
            let derived = || {
                let first = match v.get("max_window_layers") {
                    None if dots1 => 62,
                    None => CLASS_DEFAULT_MAX_WINDOW_LAYERS,
                    Some(_) => get_usize(v, "max_window_layers", path)?,
                };
                Ok((0..layers).map(|l| w.is_some() && l >= first).collect())
            };
            let off = " (or 'use_sliding_window' is false)";
            Ok((w, layer_kinds(v, layers, w, derived, off, path)?))
        }
        // SmolLM3 windows as Qwen2 does, but its layer pattern puts the window on the layers without a
        // rotary embedding (and the class has no default window).
        "smollm3" => {
            let w = if opt_bool(v, "use_sliding_window", path)?.unwrap_or(false) {
                window()?
            } else {
                None
            };
            let derived = || {
                let rotary = nope_rotary_layers(v, layers, path)?;
                Ok(rotary.iter().map(|&r| w.is_some() && !r).collect())
            };
            let off = " (or 'use_sliding_window' is false)";
            Ok((w, layer_kinds(v, layers, w, derived, off, path)?))
        }
        // Qwen2-MoE's and Qwen3-MoE's windows (Qwen2-MoE's on the odd layers below max_window_layers)
        // are off in every released checkpoint and not read here.
        "qwen2_moe" | "qwen3_moe" if opt_bool(v, "use_sliding_window", path)? == Some(true) => {
            Err(model_err(
                path,
                format!("field 'use_sliding_window' is true: {model_type}'s sliding window is not supported"),
            ))
        }
        _ => Ok((None, vec![false; layers])),
    }
}

/// GPT-2's and OPT's configs read under the names the rest of the parser uses, their class defaults
/// filled in (the smallest model's sizes).
///
/// * gpt2: GPT2Config's `n_embd`, `n_layer`, `n_head`, `n_inner` (absent or null: 4 × `n_embd`),
///   `n_positions`, `layer_norm_epsilon`. Refused: scores scaled by the layer's inverse index
///   (`scale_attn_by_inverse_layer_idx`); `scale_attn_weights` false (unscaled scores) is read as a
///   score scale of 1.
/// * gpt_bigcode: GPTBigCodeConfig's, the same, and `multi_query` (default true: one key/value head);
///   `add_cross_attention` refused.
/// * opt: OPTConfig's `ffn_dim`, `max_position_embeddings` (default 2048), `pad_token_id` (default 1),
///   its LayerNorms' eps (PyTorch's 1e-5). Refused: OPT-350m's post-norm blocks
///   (`do_layer_norm_before` false) and its `word_embed_proj_dim` ≠ `hidden_size` projections, norms
///   without weights (`layer_norm_elementwise_affine` false, `_remove_final_layer_norm`).
fn aliased_config(v: &Value, model_type: &str, path: &Path) -> Result<Value> {
    let mut c = v.clone();
    let obj = c
        .as_object_mut()
        .expect("a config with a model_type is an object");
    let get = |key: &str, default: u64| size_or(v, key, default, path);
    if model_type == "falcon" {
        return falcon_config(v, c, path);
    }
    if model_type == "mpt" {
        return mpt_config(v, c, path);
    }
    if model_type == "minimax_m2" {
        return minimax_m2_config(v, c, path);
    }
    if matches!(
        model_type,
        "ministral3" | "mistral4" | "cwm" | "gpt_oss" | "apertus"
    ) {
        if rope_object(v).is_none() {
            obj.insert(
                "rope_parameters".into(),
                class_rope_parameters(v, model_type, path)?,
            );
        }
        return Ok(c);
    }
    if model_type == "gpt_neo" {
        return gpt_neo_config(v, c, path);
    }
    if model_type == "exaone" {
        // ExaoneConfig's attribute_map: the hub's names of three of LLaMA's fields.
        for (hub, name) in [
            ("num_layers", "num_hidden_layers"),
            ("layer_norm_epsilon", "rms_norm_eps"),
            ("activation_function", "hidden_act"),
        ] {
            if let (Some(x), false) = (v.get(hub), obj.contains_key(name)) {
                obj.insert(name.into(), x.clone());
            }
        }
        return Ok(c);
    }
    if matches!(model_type, "gptj" | "codegen") {
        // GPTJConfig (and CodeGenConfig, the same names and defaults): `n_embd`, `n_layer`, `n_head`,
        // `n_inner` (null: 4 × n_embd), `n_positions`, and `rotary_dim` values of each head rotated
        // (null: all), as a partial_rotary_factor.
        let hidden = get("n_embd", 4096)?;
        let heads = get("n_head", 16)?;
        let inner = get("n_inner", 4 * hidden)?;
        let sizes = [
            ("hidden_size", hidden),
            ("num_hidden_layers", get("n_layer", 28)?),
            ("num_attention_heads", heads),
            ("num_key_value_heads", heads),
            ("intermediate_size", inner),
            ("vocab_size", get("vocab_size", 50400)?),
            ("max_position_embeddings", get("n_positions", 2048)?),
        ];
        let eps = opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5);
        set_aliases(obj, &sizes, eps);
        if model_type == "codegen" && hidden % 4 != 0 {
            return Err(model_err(
                path,
                format!(
                    "n_embd {hidden} is not a multiple of 4 (CodeGen's fused q/k/v in 4 shards)"
                ),
            ));
        }
        let head_dim = hidden / heads.max(1);
        // GPTJConfig's default 64; null rotates whole heads.
        let rotary_dim = match v.get("rotary_dim") {
            None => 64,
            Some(Value::Null) => head_dim,
            Some(_) => get("rotary_dim", 64)?,
        };
        if head_dim > 0 {
            obj.insert(
                "partial_rotary_factor".into(),
                (rotary_dim as f64 / head_dim as f64).into(),
            );
        }
        return Ok(c);
    }
    if model_type == "bloom" {
        // BloomConfig: `n_layer`, `n_head` (attribute_map), `n_embed` an old name of hidden_size, an MLP
        // of 4 × hidden, `layer_norm_epsilon`; its class defaults (bloom-560m's shape but 2 layers).
        if opt_bool(v, "apply_residual_connection_post_layernorm", path)? == Some(true) {
            return Err(model_err(
                path,
                "field 'apply_residual_connection_post_layernorm' is true (residuals taken after the \
                 norms): not supported",
            ));
        }
        let hidden = opt_usize(v, "hidden_size", path)?
            .or(opt_usize(v, "n_embed", path)?)
            .unwrap_or(64) as u64;
        let heads = get("n_head", 8)?;
        let sizes = [
            ("hidden_size", hidden),
            ("num_hidden_layers", get("n_layer", 2)?),
            ("num_attention_heads", heads),
            ("num_key_value_heads", heads),
            ("intermediate_size", 4 * hidden),
            ("vocab_size", get("vocab_size", 250880)?),
        ];
        let eps = opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5);
        set_aliases(obj, &sizes, eps);
        return Ok(c);
    }
    if model_type == "opt" {
        let hidden = get("hidden_size", 768)?;
        let sizes = [
            ("hidden_size", hidden),
            ("num_hidden_layers", get("num_hidden_layers", 12)?),
            ("num_attention_heads", get("num_attention_heads", 12)?),
            ("intermediate_size", get("ffn_dim", 3072)?),
            (
                "max_position_embeddings",
                get("max_position_embeddings", 2048)?,
            ),
            ("vocab_size", get("vocab_size", 50272)?),
        ];
        set_aliases(obj, &sizes, 1e-5);
        if !obj.contains_key("pad_token_id") {
            obj.insert("pad_token_id".into(), 1.into());
        }
        let refuse = |what: &str| Err(model_err(path, format!("{what}: not supported")));
        if opt_bool(v, "do_layer_norm_before", path)? == Some(false) {
            return refuse(
                "field 'do_layer_norm_before' is false (OPT-350m's norms after the blocks)",
            );
        }
        if opt_usize(v, "word_embed_proj_dim", path)?.is_some_and(|d| d as u64 != hidden) {
            return refuse(
                "field 'word_embed_proj_dim' differs from 'hidden_size' (OPT-350m's projections)",
            );
        }
        if opt_bool(v, "layer_norm_elementwise_affine", path)? == Some(false)
            || opt_bool(v, "_remove_final_layer_norm", path)? == Some(true)
        {
            return refuse("LayerNorms without weights, or no final LayerNorm");
        }
        return Ok(c);
    }
    // GPT2Config and GPTBigCodeConfig share their names and defaults; GPT-BigCode's `multi_query`
    // (default true) gives every query head one key/value head.
    let hidden = get("n_embd", 768)?;
    let inner = get("n_inner", 4 * hidden)?;
    let heads = get("n_head", 12)?;
    let bigcode = model_type == "gpt_bigcode";
    let kv_heads = match bigcode && opt_bool(v, "multi_query", path)?.unwrap_or(true) {
        true => 1,
        false => heads,
    };
    let sizes = [
        ("hidden_size", hidden),
        ("num_hidden_layers", get("n_layer", 12)?),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size", inner),
        ("n_positions", get("n_positions", 1024)?),
        ("vocab_size", get("vocab_size", 50257)?),
    ];
    let eps = opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5);
    set_aliases(obj, &sizes, eps);
    if bigcode && opt_bool(v, "add_cross_attention", path)? == Some(true) {
        return Err(model_err(
            path,
            "field 'add_cross_attention' is true: cross-attention to an encoder is not supported",
        ));
    }
    if opt_bool(v, "scale_attn_by_inverse_layer_idx", path)? == Some(true) {
        return Err(model_err(
            path,
            "field 'scale_attn_by_inverse_layer_idx' is true: scores scaled by the layer's index are not \
             supported",
        ));
    }
    Ok(c)
}

/// MiniMax-M2's config (MiniMaxM2Config): its hub configs' legacy `rotary_dim` as the
/// partial_rotary_factor (of `head_dim`, default 128). Refused by name:
/// MiniMax-01's linear-attention layers (`attn_type_list` with a 0) and shared experts
/// (`shared_intermediate_size`).
fn minimax_m2_config(v: &Value, mut c: Value, path: &Path) -> Result<Value> {
    if let Some(Value::Array(kinds)) = v.get("attn_type_list") {
        if kinds.iter().any(|k| k.as_u64() == Some(0)) {
            return Err(model_err(
                path,
                "field 'attn_type_list' names linear-attention layers (0): not supported",
            ));
        }
    }
    let scoring = v.get("scoring_func").and_then(Value::as_str);
    if scoring.is_some_and(|f| f != "sigmoid")
        || opt_bool(v, "use_routing_bias", path)? == Some(false)
    {
        return Err(model_err(
            path,
            "fields 'scoring_func' / 'use_routing_bias': only the σ router with its correction bias \
             (what transformers runs) is supported",
        ));
    }
    if opt_usize(v, "shared_intermediate_size", path)?.is_some_and(|s| s > 0) {
        return Err(model_err(
            path,
            "field 'shared_intermediate_size' is not 0: shared experts are not supported",
        ));
    }
    let head_dim = opt_usize(v, "head_dim", path)?.unwrap_or(128);
    let obj = c
        .as_object_mut()
        .expect("a config with a model_type is an object");
    let in_params = |key: &str| {
        v.get("rope_parameters")
            .and_then(|rp| rp.get(key))
            .is_some_and(|x| !x.is_null())
    };
    let stated = |key: &str| in_params(key) || v.get(key).is_some_and(|x| !x.is_null());
    if let (Some(rotary), false) = (
        opt_usize(v, "rotary_dim", path)?,
        stated("partial_rotary_factor"),
    ) {
        let partial = rotary as f64 / head_dim.max(1) as f64;
        match obj.get_mut("rope_parameters") {
            Some(Value::Object(rp)) => rp.insert("partial_rotary_factor".into(), partial.into()),
            _ => obj.insert("partial_rotary_factor".into(), partial.into()),
        };
    }
    Ok(c)
}

/// Write the sizes a config states under its own names, and its LayerNorms' eps, into the config
/// object `obj` under the names the parser reads.
fn set_aliases(obj: &mut serde_json::Map<String, Value>, sizes: &[(&str, u64)], eps: f64) {
    for &(key, value) in sizes {
        obj.insert(key.into(), value.into());
    }
    obj.insert("rms_norm_eps".into(), eps.into());
}

/// GPT-Neo's config (GPTNeoConfig: `num_layers`, `num_heads`, `intermediate_size` null → 4 × hidden,
/// `max_position_embeddings`, `layer_norm_epsilon`) under the parser's names, its `attention_types`
/// ([[kinds, repeat], …]: "global" or "local", the local ones windowed by `window_size`) as
/// `layer_types` and `sliding_window`.
fn gpt_neo_config(v: &Value, mut c: Value, path: &Path) -> Result<Value> {
    let obj = c
        .as_object_mut()
        .expect("a config with a model_type is an object");
    let get = |key: &str, default: u64| size_or(v, key, default, path);
    let hidden = get("hidden_size", 2048)?;
    let heads = get("num_heads", 16)?;
    let layers = get("num_layers", 24)?;
    let sizes = [
        ("hidden_size", hidden),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", heads),
        ("intermediate_size", get("intermediate_size", 4 * hidden)?),
        (
            "max_position_embeddings",
            get("max_position_embeddings", 2048)?,
        ),
        ("vocab_size", get("vocab_size", 50257)?),
    ];
    let eps = opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5);
    set_aliases(obj, &sizes, eps);
    let kinds = gpt_neo_attention_layers(v, path)?;
    if kinds.len() as u64 != layers {
        return Err(model_err(
            path,
            format!(
                "field 'attention_types' gives {} layers, num_layers is {layers}",
                kinds.len()
            ),
        ));
    }
    let names: Vec<Value> = (kinds.iter())
        .map(|&local| Value::from(["full_attention", "sliding_attention"][local as usize]))
        .collect();
    obj.insert("layer_types".into(), names.into());
    obj.insert("sliding_window".into(), get("window_size", 256)?.into());
    Ok(c)
}

/// GPT-Neo's layers, true where local (windowed): GPTNeoConfig's `attention_types` expanded (default
/// [[["global", "local"], 12]]). Read here and by the pruned checkpoint's config, which restates them.
pub fn gpt_neo_attention_layers(v: &Value, path: &Path) -> Result<Vec<bool>> {
    let default = serde_json::json!([[["global", "local"], 12]]);
    let types = match v.get("attention_types") {
        None | Some(Value::Null) => &default,
        Some(t) => t,
    };
    let bad = || {
        model_err(
            path,
            "field 'attention_types' is not a list of [[kinds], repeat]",
        )
    };
    let mut out = Vec::new();
    for item in types.as_array().ok_or_else(bad)? {
        let (kinds, repeat) = match item.as_array().map(Vec::as_slice) {
            Some([k, r]) => (k.as_array().ok_or_else(bad)?, r.as_u64().ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        for _ in 0..repeat.min(MAX_LAYERS as u64) {
            for k in kinds {
                out.push(match k.as_str() {
                    Some("global") => false,
                    Some("local") => true,
                    _ => {
                        return Err(model_err(
                            path,
                            format!("attention type {k} is neither \"global\" nor \"local\""),
                        ))
                    }
                });
            }
        }
    }
    Ok(out)
}

/// Field `key` of `v` as a size up to `MAX_SIZE`, `default` when absent or null.
fn size_within(v: &Value, key: &str, default: usize, path: &Path) -> Result<usize> {
    check_size(
        opt_usize(v, key, path)?.unwrap_or(default),
        key,
        MAX_SIZE,
        path,
    )
}

/// Field `key` of `v` as a size, `default` when absent or null (the config classes' defaults).
fn size_or(v: &Value, key: &str, default: u64, path: &Path) -> Result<u64> {
    Ok(opt_usize(v, key, path)?.map_or(default, |x| x as u64))
}

/// MPT's config (MptConfig; `d_model`, `n_heads`, `n_layers`, `expansion_ratio`, `layer_norm_epsilon`,
/// and its `attn_config`: `softmax_scale`, `clip_qkv`) under the parser's names. Refused by name: what
/// transformers' MptForCausalLM does not run either (learned positions without ALiBi, q/k LayerNorms,
/// prefix-LM masks, biases, slopes for another `alibi_bias_max` than 8).
fn mpt_config(v: &Value, mut c: Value, path: &Path) -> Result<Value> {
    let attn = v.get("attn_config").cloned().unwrap_or(Value::Null);
    let refuse = |what: &str| Err(model_err(path, format!("{what}: not supported")));
    if opt_bool(&attn, "alibi", path)? == Some(false) {
        return refuse("attn_config.alibi is false (learned positions)");
    }
    if opt_bool(&attn, "qk_ln", path)? == Some(true) {
        return refuse("attn_config.qk_ln is true (q/k LayerNorms)");
    }
    if opt_bool(&attn, "prefix_lm", path)? == Some(true) {
        return refuse("attn_config.prefix_lm is true (prefix-LM masks)");
    }
    if opt_bool(v, "no_bias", path)? == Some(false) {
        return refuse("field 'no_bias' is false (biases on the projections and norms)");
    }
    // transformers builds MPT's slopes for 8 whatever the config says (the released models' value).
    if let Some(b) = opt_f64(&attn, "alibi_bias_max", path)?.filter(|&b| b != 8.0) {
        return refuse(&format!(
            "attn_config.alibi_bias_max is {b} (transformers' MptForCausalLM uses 8)"
        ));
    }
    let get = |key: &str, default: u64| size_or(v, key, default, path);
    let hidden = get("d_model", 2048)?;
    let heads = get("n_heads", 16)?;
    let sizes = [
        ("hidden_size", hidden),
        ("num_hidden_layers", get("n_layers", 24)?),
        ("num_attention_heads", heads),
        ("num_key_value_heads", heads),
        ("intermediate_size", get("expansion_ratio", 4)? * hidden),
        ("vocab_size", get("vocab_size", 50368)?),
    ];
    let eps = opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5);
    let obj = c
        .as_object_mut()
        .expect("a config with a model_type is an object");
    set_aliases(obj, &sizes, eps);
    // The attention's settings, where the generic parser reads them.
    if let Some(x) = attn.get("clip_qkv").filter(|x| !x.is_null()) {
        obj.insert("clip_qkv".into(), x.clone());
    }
    if let Some(s) = attn.get("softmax_scale").filter(|x| !x.is_null()) {
        obj.insert("mpt_softmax_scale".into(), s.clone());
    }
    Ok(c)
}

/// How a Falcon block runs its attention and MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FalconBlock {
    /// In parallel on one `input_layernorm` (`parallel_attn`; the new architecture with
    /// `num_ln_in_parallel_attn` 1, Falcon 2 11B).
    SharedNorm,
    /// In parallel, each on its own norm (`ln_attn`, `ln_mlp`: the new architecture, 40B and 180B).
    LnPair,
    /// One after the other (`input_layernorm`, `post_attention_layernorm`).
    Sequential,
}

/// Falcon's block as FalconDecoderLayer builds it from `new_decoder_architecture`, `parallel_attn`
/// (default true) and `num_ln_in_parallel_attn` (default 2 with the new architecture).
fn falcon_block(v: &Value, path: &Path) -> Result<FalconBlock> {
    let new = opt_bool(v, "new_decoder_architecture", path)?.unwrap_or(false);
    let parallel = opt_bool(v, "parallel_attn", path)?.unwrap_or(true);
    match (new, opt_usize(v, "num_ln_in_parallel_attn", path)?.unwrap_or(2)) {
        (true, 2) => Ok(FalconBlock::LnPair),
        (true, 1) if parallel => Ok(FalconBlock::SharedNorm),
        (true, n) => Err(model_err(
            path,
            format!(
                "field 'num_ln_in_parallel_attn' is {n} with 'parallel_attn' {parallel}: Falcon has no \
                 such block"
            ),
        )),
        (false, _) if parallel => Ok(FalconBlock::SharedNorm),
        (false, _) => Ok(FalconBlock::Sequential),
    }
}

/// Falcon's config read under the parser's names, FalconConfig's defaults (Falcon-7B's) filled in: the
/// key/value heads (`num_kv_heads` with the new architecture or without `multi_query`, else 1),
/// `ffn_hidden_size` (default 4 × hidden), `layer_norm_epsilon`, `activation` (GELU). (`alibi`, Falcon-RW's
/// position biases in place of the rotary embedding, is read by [`ModelConfig::from_json`].)
fn falcon_config(v: &Value, mut c: Value, path: &Path) -> Result<Value> {
    let get = |key: &str, default: u64| size_or(v, key, default, path);
    let hidden = get("hidden_size", 4544)?;
    let heads = get("num_attention_heads", 71)?;
    let grouped = opt_bool(v, "new_decoder_architecture", path)?.unwrap_or(false)
        || !opt_bool(v, "multi_query", path)?.unwrap_or(true);
    let kv_heads = match grouped {
        true => get("num_kv_heads", heads)?,
        false => 1,
    };
    let obj = c
        .as_object_mut()
        .expect("a config with a model_type is an object");
    let sizes = [
        ("hidden_size", hidden),
        ("num_hidden_layers", get("num_hidden_layers", 32)?),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size", get("ffn_hidden_size", 4 * hidden)?),
        ("vocab_size", get("vocab_size", 65024)?),
    ];
    set_aliases(
        obj,
        &sizes,
        opt_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5),
    );
    // FalconConfig has no head_dim: hidden / heads.
    obj.remove("head_dim");
    Ok(c)
}

/// Which of the `layers` decoder layers of a Qwen2-MoE / Qwen3-MoE config `v` are sparse: layer l is,
/// unless `mlp_only_layers` lists it or (l + 1) is not a multiple of `decoder_sparse_step` (absent: 1).
/// Read here and by the pruned checkpoint's config, which lists the kept dense layers.
pub fn qwen_moe_sparse_layers(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let step = opt_usize(v, "decoder_sparse_step", path)?.unwrap_or(1);
    if step == 0 {
        return Err(model_err(path, "field 'decoder_sparse_step' is 0"));
    }
    let dense: Vec<usize> = match v.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(x) => serde_json::from_value(x.clone()).map_err(|_| {
            model_err(
                path,
                "field 'mlp_only_layers' is not a list of layer indices",
            )
        })?,
    };
    Ok((0..layers)
        .map(|l| !dense.contains(&l) && (l + 1) % step == 0)
        .collect())
}

/// The sparse MLP of a mixture-of-experts `model_type` (`None` for the others), from the config
/// classes' fields and defaults: the number of experts (`num_local_experts`, or `num_experts`: Qwen's
/// and OLMoE's 4.x name), `num_experts_per_tok`, `norm_topk_prob` (Mixtral renormalises always, the
/// others' classes default to false), the experts' `moe_intermediate_size` (Qwen; Mixtral and OLMoE
/// use `intermediate_size`), Qwen2-MoE's `shared_expert_intermediate_size`, and which layers are sparse:
/// with Qwen's `decoder_sparse_step` s and `mlp_only_layers`, layer l is sparse unless it is listed or
/// (l + 1) is not a multiple of s.
fn parse_moe(
    v: &Value,
    model_type: &str,
    layers: usize,
    intermediate_size: usize,
    path: &Path,
) -> Result<Option<Moe>> {
    let (prefix, projections) = match model_type {
        "mixtral" | "minimax_m2" => ("block_sparse_moe", ["w1", "w3", "w2"]),
        // Granite MoE's experts are stored fused (`input_linear`, renamed at load); these name their
        // row blocks.
        "granitemoe" | "granitemoeshared" | "granitemoe_swa" => {
            ("block_sparse_moe", ["gate_proj", "up_proj", "down_proj"])
        }
        // GPT-OSS's experts are stored fused and transposed (read by `Weights::strided_columns`);
        // these name their parts.
        "gpt_oss" => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        "hunyuan_v1_moe" => return hunyuan_moe(v, layers, intermediate_size, path).map(Some),
        "llama4_text" => return llama4_moe(v, layers, path).map(Some),
        "afmoe" => return afmoe_moe(v, layers, path).map(Some),
        "hy_v3" | "minicpm5_moe" => {
            return renamed_grouped_moe(v, model_type, layers, path).map(Some)
        }
        "qwen2_moe" | "qwen3_moe" | "olmoe" | "flex_olmo" | "glm4_moe" | "ernie4_5_moe"
        | "deepseek_v2" | "deepseek_v3" | "glm4_moe_lite" | "dots1" | "mistral4" => {
            ("mlp", ["gate_proj", "up_proj", "down_proj"])
        }
        _ => return Ok(None),
    };
    match model_type {
        "ernie4_5_moe" => return ernie4_5_moe(v, layers, (prefix, projections), path).map(Some),
        "deepseek_v2" => return deepseek_v2_moe(v, layers, (prefix, projections), path).map(Some),
        "glm4_moe" | "deepseek_v3" | "glm4_moe_lite" | "dots1" | "mistral4" => {
            // The hub's DeepSeek-V3 configs name the router transformers' DeepseekV3 always runs;
            // another would be the original code's and not this one's.
            if model_type == "deepseek_v3" {
                expect_router(
                    v,
                    &[
                        ("scoring_func", &["sigmoid"]),
                        ("topk_method", &["noaux_tc"]),
                    ],
                    path,
                )?;
            }
            let defaults = match model_type {
                "glm4_moe" => &GLM4_MOE_DEFAULTS,
                "glm4_moe_lite" => &GLM4_MOE_LITE_DEFAULTS,
                "dots1" => &DOTS1_DEFAULTS,
                "mistral4" => &MISTRAL4_MOE_DEFAULTS,
                _ => &DEEPSEEK_V3_MOE_DEFAULTS,
            };
            return grouped_moe(v, layers, (prefix, projections), defaults, path).map(Some);
        }
        _ => {}
    }
    let qwen = model_type.starts_with("qwen");
    // FlexOlmoConfig's defaults: 7 experts, top 5 (the others' classes have none worth taking).
    let flex = model_type == "flex_olmo";
    let experts = match (v.get("num_local_experts"), v.get("num_experts")) {
        (Some(x), _) if !x.is_null() => get_size(v, "num_local_experts", MAX_SIZE, path)?,
        _ if flex => size_within(v, "num_experts", 7, path)?,
        _ => get_size(v, "num_experts", MAX_SIZE, path)?,
    };
    let top_k = match flex {
        true => size_within(v, "num_experts_per_tok", 5, path)?,
        false => get_size(v, "num_experts_per_tok", MAX_SIZE, path)?,
    };
    check_top_k("num_experts_per_tok", top_k, experts, path)?;
    // Mixtral and MiniMax-M2 renormalise always; Granite MoE's softmax over the top k logits is the
    // same.
    let mixtral = matches!(
        model_type,
        "mixtral" | "minimax_m2" | "granitemoe" | "granitemoeshared" | "granitemoe_swa" | "gpt_oss"
    );
    let normalise = mixtral || opt_bool(v, "norm_topk_prob", path)?.unwrap_or(false);
    let inter = match qwen {
        true => get_size(v, "moe_intermediate_size", MAX_SIZE, path)?,
        false => intermediate_size,
    };
    let shared = match model_type {
        "qwen2_moe" => Some(SharedExpert {
            module: "mlp.shared_expert",
            inter: get_size(v, "shared_expert_intermediate_size", MAX_SIZE, path)?,
            gated: true,
        }),
        // GraniteMoeSharedConfig's `shared_intermediate_size` (default 0: none).
        "granitemoeshared" | "granitemoe_swa" => {
            match size_within(v, "shared_intermediate_size", 0, path)? {
                0 => None,
                inter => Some(SharedExpert {
                    module: "shared_mlp",
                    inter,
                    gated: false,
                }),
            }
        }
        _ => None,
    };
    let sparse_layers = match qwen {
        true => qwen_moe_sparse_layers(v, layers, path)?,
        false => vec![true; layers],
    };
    Ok(Some(Moe {
        experts,
        top_k,
        normalise,
        inter,
        shared,
        router: match model_type {
            // MiniMax-M2: σ + a correction bias, one group, no scale.
            "minimax_m2" => MoeRouter::Sigmoid {
                groups: 1,
                topk_group: 1,
                scale: 1.0,
                bias: "block_sparse_moe.e_score_correction_bias",
            },
            _ => MoeRouter::Softmax,
        },
        sparse_layers,
        prefix,
        projections,
        oss: match model_type {
            // GptOssConfig's defaults: α 1.702, limit 7.
            "gpt_oss" => {
                let field = |key: &str, default: f64| -> Result<f32> {
                    match opt_f64(v, key, path)?.unwrap_or(default) {
                        x if x > 0.0 && x.is_finite() => Ok(x as f32),
                        x => Err(model_err(
                            path,
                            format!("field '{key}' is {x}, not a positive number"),
                        )),
                    }
                };
                Some(OssSwiglu {
                    alpha: field("swiglu_alpha", 1.702)?,
                    limit: field("swiglu_limit", 7.0)?,
                })
            }
            _ => None,
        },
        input_scaled: false,
        fused: match model_type {
            "gpt_oss" => FusedExperts::InputsFirst { interleaved: true },
            _ => FusedExperts::OutputsFirst,
        },
    }))
}

/// HunYuan MoE (HunYuanMoEV1Config; Hunyuan-A13B): `num_experts` experts of `intermediate_size` (as
/// transformers builds them), the softmax's top `moe_topk` renormalised, one shared MLP of
/// `intermediate_size` (`mlp.shared_mlp`) on every layer; the router `mlp.gate.wg` (renamed at load).
/// Per-layer lists of `num_experts` or `moe_topk` are read when all their entries agree.
fn hunyuan_moe(v: &Value, layers: usize, inter: usize, path: &Path) -> Result<Moe> {
    let uniform = |key: &str, default: usize| -> Result<usize> {
        match v.get(key) {
            Some(Value::Array(items)) => {
                let sizes: Option<Vec<usize>> = items
                    .iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect();
                match sizes.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|x| x == first) => {
                        check_size(*first, key, MAX_SIZE, path)
                    }
                    _ => Err(model_err(
                        path,
                        format!(
                            "field '{key}' is not one size for every layer (per-layer mixtures \
                             are not supported)"
                        ),
                    )),
                }
            }
            _ => size_within(v, key, default, path),
        }
    };
    let (experts, top_k) = (uniform("num_experts", 1)?, uniform("moe_topk", 1)?);
    check_top_k("moe_topk", top_k, experts, path)?;
    Ok(Moe {
        experts,
        top_k,
        normalise: true,
        inter,
        shared: Some(SharedExpert {
            module: "mlp.shared_mlp",
            inter,
            gated: false,
        }),
        router: MoeRouter::Softmax,
        sparse_layers: vec![true; layers],
        prefix: "mlp",
        projections: ["gate_proj", "up_proj", "down_proj"],
        oss: None,
        input_scaled: false,
        fused: FusedExperts::OutputsFirst,
    })
}

/// Llama 4's mixture (Llama4TextConfig's fields and defaults): `num_local_experts` (16) of
/// `intermediate_size` (8192), the top `num_experts_per_tok` (1) logits each weighting its token's
/// input to the expert by their σ, a shared MLP of `intermediate_size` (`feed_forward.shared_expert`,
/// read as `mlp.shared_expert`), on the layers of [`llama4_moe_layers`] (the others a dense MLP of
/// `intermediate_size_mlp`). The experts are stored fused, inputs first, gate and up in halves.
fn llama4_moe(v: &Value, layers: usize, path: &Path) -> Result<Moe> {
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let (experts, top_k, inter) = (
        size("num_local_experts", 16)?,
        size("num_experts_per_tok", 1)?,
        size("intermediate_size", 8192)?,
    );
    check_top_k("num_experts_per_tok", top_k, experts, path)?;
    Ok(Moe {
        experts,
        top_k,
        normalise: false,
        inter,
        shared: Some(SharedExpert {
            module: "mlp.shared_expert",
            inter,
            gated: false,
        }),
        router: MoeRouter::SigmoidTopK,
        sparse_layers: llama4_moe_layers(v, layers, path)?,
        prefix: "mlp",
        projections: ["gate_proj", "up_proj", "down_proj"],
        oss: None,
        input_scaled: true,
        fused: FusedExperts::InputsFirst { interleaved: false },
    })
}

/// AFMoE's mixture (AfmoeConfig's fields and defaults): `num_experts` (64) of `moe_intermediate_size`
/// (1408), σ + the layer's `mlp.expert_bias` choosing the top `num_experts_per_tok` (6), weighted by
/// their σ renormalised × `route_scale` (1), `num_shared_experts` (2) in one shared MLP, sparse from layer
/// `num_dense_layers` (1) on; the router `mlp.router.gate` (renamed at load).
fn afmoe_moe(v: &Value, layers: usize, path: &Path) -> Result<Moe> {
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let (experts, top_k, inter) = (
        size("num_experts", 64)?,
        size("num_experts_per_tok", 6)?,
        size("moe_intermediate_size", 1408)?,
    );
    let scale = opt_f64(v, "route_scale", path)?.unwrap_or(1.0);
    check_groups(top_k, [1, 1, experts], scale, path)?;
    let (shared, dense) = (size("num_shared_experts", 2)?, size("num_dense_layers", 1)?);
    Ok(Moe {
        experts,
        top_k,
        normalise: true,
        inter,
        shared: (shared > 0).then_some(SharedExpert {
            module: "mlp.shared_experts",
            inter: inter * shared,
            gated: false,
        }),
        router: MoeRouter::Sigmoid {
            groups: 1,
            topk_group: 1,
            scale,
            bias: "mlp.expert_bias",
        },
        sparse_layers: (0..layers).map(|l| l >= dense).collect(),
        prefix: "mlp",
        projections: ["gate_proj", "up_proj", "down_proj"],
        oss: None,
        input_scaled: false,
        fused: FusedExperts::OutputsFirst,
    })
}

/// Llama 4's sparse layers: those `moe_layers` lists, or without it every
/// `interleave_moe_layer_step`-th (default 1: all), from layer step − 1, as Llama4TextConfig derives
/// them. Read here and by the pruned checkpoint's config, which restates them for the kept layers.
pub fn llama4_moe_layers(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let listed: Vec<usize> = match v.get("moe_layers") {
        None | Some(Value::Null) => {
            let step = size_within(v, "interleave_moe_layer_step", 1, path)?;
            if step == 0 {
                return Err(model_err(path, "field 'interleave_moe_layer_step' is 0"));
            }
            (step - 1..layers).step_by(step).collect()
        }
        Some(x) => serde_json::from_value(x.clone())
            .ok()
            .filter(|l: &Vec<usize>| l.iter().all(|&l| l < layers))
            .ok_or_else(|| {
                model_err(
                    path,
                    format!("field 'moe_layers' is not a list of layer indices below {layers}"),
                )
            })?,
    };
    Ok((0..layers).map(|l| listed.contains(&l)).collect())
}

/// The longest sequence Llama 4 runs as the runtime computes it: its rotary layers' attention is
/// chunked (`layer_types` "chunked_attention", or derived: the rotary layers when
/// `attention_chunk_size`, default 8192, is not null), a query seeing the keys of its own chunk only,
/// which is plain causal attention up to the chunk's length; its NoPE layers scale the queries at
/// position p by 1 + `attn_scale` ln(1 + ⌊(p + 1) / `floor_scale`⌋) (`attn_temperature_tuning`,
/// defaults true, 0.1, 8192), which is 1 below `floor_scale` − 1.
fn llama4_max_tokens(v: &Value, layers: usize, path: &Path) -> Result<Option<(usize, String)>> {
    let rotary = nope_rotary_layers(v, layers, path)?;
    let chunk = match v.get("attention_chunk_size") {
        Some(Value::Null) => None,
        _ => Some(size_within(v, "attention_chunk_size", 8192, path)?).filter(|&c| c > 0),
    };
    let chunked: Vec<bool> = match v.get("layer_types") {
        None | Some(Value::Null) => rotary.iter().map(|&r| r && chunk.is_some()).collect(),
        Some(lt) => {
            let kinds: Option<Vec<bool>> = lt.as_array().and_then(|a| {
                a.iter()
                    .map(|k| match k.as_str() {
                        Some("chunked_attention") => Some(true),
                        Some("full_attention") => Some(false),
                        _ => None,
                    })
                    .collect()
            });
            kinds.filter(|k| k.len() == layers).ok_or_else(|| {
                model_err(
                    path,
                    format!(
                        "field 'layer_types' must list {layers} entries of \"chunked_attention\" \
                         or \"full_attention\""
                    ),
                )
            })?
        }
    };
    let mut limits = Vec::new();
    if chunked.iter().any(|&c| c) {
        let chunk = chunk.ok_or_else(|| {
            model_err(
                path,
                "layer_types names chunked layers but 'attention_chunk_size' is null",
            )
        })?;
        limits.push((
            chunk,
            format!("Llama 4 attends within chunks of {chunk} tokens"),
        ));
    }
    // Scout's hub config states the switch as a number (4): Python reads it as true.
    let switch = match v.get("attn_temperature_tuning") {
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        _ => opt_bool(v, "attn_temperature_tuning", path)?.unwrap_or(true),
    };
    let tuning = switch && opt_f64(v, "attn_scale", path)?.unwrap_or(0.1) != 0.0;
    if tuning && rotary.iter().any(|&r| !r) {
        let floor = size_within(v, "floor_scale", 8192, path)?;
        if floor < 2 {
            return Err(model_err(
                path,
                format!("field 'floor_scale' is {floor}, below 2"),
            ));
        }
        limits.push((
            floor - 1,
            format!(
                "past {} tokens Llama 4 scales the queries of its layers without a rotary \
                 embedding (attn_temperature_tuning)",
                floor - 1
            ),
        ));
    }
    Ok(limits.into_iter().min_by_key(|&(t, _)| t))
}

/// A mixture's MLP module and an expert's gate, up and down projections ([`Moe::prefix`],
/// [`Moe::projections`]).
type MoeNames = (&'static str, [&'static str; 3]);

/// The experts per token (`key`) must be 1 to `experts`.
fn check_top_k(key: &str, top_k: usize, experts: usize, path: &Path) -> Result<()> {
    if top_k == 0 || top_k > experts {
        return Err(model_err(
            path,
            format!("{key} ({top_k}) must be between 1 and the number of experts ({experts})"),
        ));
    }
    Ok(())
}

/// ERNIE 4.5's mixture (Ernie4_5_MoeConfig's fields and defaults): `moe_num_experts` (64) of
/// `moe_intermediate_size` (1536), the top `moe_k` (6) by probability + the correction bias,
/// renormalised, `moe_num_shared_experts` (2) in one shared MLP, sparse on layer l when
/// (l + 1) is a multiple of `moe_layer_interval` (1) and `moe_layer_start_index` (1) ≤ l ≤
/// `moe_layer_end_index` (−1: the last layer); `names`: the MLP's module and an expert's projections.
fn ernie4_5_moe(v: &Value, layers: usize, names: MoeNames, path: &Path) -> Result<Moe> {
    let (prefix, projections) = names;
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let (experts, top_k, inter) = (
        size("moe_num_experts", 64)?,
        size("moe_k", 6)?,
        size("moe_intermediate_size", 1536)?,
    );
    check_top_k("moe_k", top_k, experts, path)?;
    if opt_bool(v, "use_bias", path)? == Some(true) {
        // transformers' experts have no biases while its use_bias puts them on every other MLP.
        return Err(model_err(
            path,
            "field 'use_bias' is true in a mixture of experts: not supported",
        ));
    }
    let shared = size("moe_num_shared_experts", 2)?;
    Ok(Moe {
        experts,
        top_k,
        normalise: true,
        inter,
        shared: (shared > 0).then_some(SharedExpert {
            module: "mlp.shared_experts",
            inter: inter * shared,
            gated: false,
        }),
        router: MoeRouter::SoftmaxBiased {
            bias: "mlp.moe_statics.e_score_correction_bias",
        },
        sparse_layers: ernie_moe_sparse_layers(v, layers, path)?,
        prefix,
        projections,
        oss: None,
        input_scaled: false,
        fused: FusedExperts::OutputsFirst,
    })
}

/// ERNIE 4.5 MoE's sparse layers: l is sparse when (l + 1) is a multiple of `moe_layer_interval` (1)
/// and `moe_layer_start_index` (1) ≤ l ≤ `moe_layer_end_index` (−1: the last layer). Read here and by
/// the pruned checkpoint's config, which restates them.
pub fn ernie_moe_sparse_layers(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let (interval, start) = (
        size("moe_layer_interval", 1)?,
        size("moe_layer_start_index", 1)?,
    );
    if interval == 0 {
        return Err(model_err(path, "field 'moe_layer_interval' is 0"));
    }
    let end = match v.get("moe_layer_end_index").and_then(Value::as_i64) {
        None | Some(-1) => layers.saturating_sub(1),
        Some(e) => usize::try_from(e)
            .map_err(|_| model_err(path, format!("field 'moe_layer_end_index' is {e}")))?,
    };
    Ok((0..layers)
        .map(|l| (l + 1) % interval == 0 && (start..=end).contains(&l))
        .collect())
}

/// An error unless `top_k` experts can be chosen from `topk_group` of `groups` equal groups of `experts`
/// and `scale` is finite.
fn check_groups(
    top_k: usize,
    [topk_group, groups, experts]: [usize; 3],
    scale: f64,
    path: &Path,
) -> Result<()> {
    let fits = groups > 0 && experts.is_multiple_of(groups) && (1..=groups).contains(&topk_group);
    if !fits || top_k == 0 || top_k > topk_group * (experts / groups) || !scale.is_finite() {
        return Err(model_err(
            path,
            format!(
                "{top_k} experts per token from {topk_group} of {groups} groups of {experts} experts, \
                 × {scale}: not a routing"
            ),
        ));
    }
    Ok(())
}

/// An error unless each `(key, values)`'s field, where present, is one of `values`: the routers
/// transformers runs for the type.
fn expect_router(v: &Value, fields: &[(&str, &[&str])], path: &Path) -> Result<()> {
    for &(key, runs) in fields {
        match v.get(key).and_then(Value::as_str) {
            Some(other) if !runs.contains(&other) => {
                return Err(model_err(
                    path,
                    format!(
                    "field '{key}' is '{other}': transformers routes this model_type with {} only",
                    runs.join(" or ")
                ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// DeepSeek-V2's mixture (DeepseekV2Config, DeepSeek-V2, V2-Lite, V2.5, DeepSeek-Coder-V2):
/// `n_routed_experts` (64) of `moe_intermediate_size` (1407), the softmax's `num_experts_per_tok` most
/// probable by `topk_method` (`greedy`, the default: among all; `group_limited_greedy`: inside the
/// `topk_group` of `n_group` groups whose best expert is most probable), the weights the probabilities ×
/// `routed_scaling_factor` (1), `n_shared_experts` (2) in one shared MLP, sparse from layer
/// `first_k_dense_replace` (0) on. Refused: `norm_topk_prob` true (the original code renormalises,
/// transformers does not) and `mlp_bias`.
fn deepseek_v2_moe(v: &Value, layers: usize, names: MoeNames, path: &Path) -> Result<Moe> {
    let (prefix, projections) = names;
    expect_router(
        v,
        &[
            ("scoring_func", &["softmax"]),
            ("topk_method", &["greedy", "group_limited_greedy"]),
        ],
        path,
    )?;
    for key in ["norm_topk_prob", "mlp_bias"] {
        if opt_bool(v, key, path)? == Some(true) {
            return Err(model_err(
                path,
                format!("field '{key}' is true: not supported for deepseek_v2"),
            ));
        }
    }
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let (experts, inter) = (
        size("n_routed_experts", 64)?,
        size("moe_intermediate_size", 1407)?,
    );
    let top_k = get_size(v, "num_experts_per_tok", MAX_SIZE, path)?;
    let (groups, topk_group) = match v.get("topk_method").and_then(Value::as_str) {
        Some("group_limited_greedy") => (
            get_size(v, "n_group", MAX_SIZE, path)?,
            get_size(v, "topk_group", MAX_SIZE, path)?,
        ),
        _ => (1, 1),
    };
    let scale = opt_f64(v, "routed_scaling_factor", path)?.unwrap_or(1.0);
    check_groups(top_k, [topk_group, groups, experts], scale, path)?;
    let shared = size("n_shared_experts", 2)?;
    let dense = size("first_k_dense_replace", 0)?;
    Ok(Moe {
        experts,
        top_k,
        normalise: false,
        inter,
        shared: (shared > 0).then_some(SharedExpert {
            module: "mlp.shared_experts",
            inter: inter * shared,
            gated: false,
        }),
        router: MoeRouter::SoftmaxGroups {
            groups,
            topk_group,
            best: 1,
            scale,
        },
        sparse_layers: (0..layers).map(|l| l >= dense).collect(),
        prefix,
        projections,
        oss: None,
        input_scaled: false,
        fused: FusedExperts::OutputsFirst,
    })
}

/// The config class's defaults [`grouped_moe`] falls back on.
/// `None` where the class has no usable default (the config must state the field).
struct GroupedMoeDefaults {
    experts: Option<usize>,
    top_k: Option<usize>,
    inter: usize,
    groups: usize,
    topk_group: usize,
    /// `first_k_dense_replace`'s; `None`: the class reads `mlp_layer_types` instead.
    dense: Option<usize>,
    scale: f64,
    shared: Option<usize>,
    normalise: bool,
    /// Mistral 4's softmax router in place of the σ one.
    softmax: bool,
}

/// Glm4MoeConfig's.
const GLM4_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(128),
    top_k: Some(8),
    inter: 1408,
    groups: 1,
    topk_group: 1,
    dense: Some(1),
    scale: 1.0,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// Glm4MoeLiteConfig's (GLM-4.7-Flash).
const GLM4_MOE_LITE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(64),
    top_k: Some(4),
    inter: 1536,
    groups: 1,
    topk_group: 1,
    dense: None,
    scale: 1.8,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// DeepseekV3Config's.
const DEEPSEEK_V3_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(256),
    top_k: Some(8),
    inter: 2048,
    groups: 8,
    topk_group: 4,
    dense: Some(3),
    scale: 2.5,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// Mistral4Config's (Mistral Small 4).
const MISTRAL4_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(128),
    top_k: Some(4),
    inter: 2048,
    groups: 1,
    topk_group: 1,
    dense: Some(0),
    scale: 1.0,
    shared: Some(1),
    normalise: true,
    softmax: true,
};

/// ExaoneMoeConfig's (K-EXAONE), under DeepSeek-V3's names.
const EXAONE_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(64),
    top_k: Some(8),
    inter: 1024,
    groups: 1,
    topk_group: 1,
    dense: Some(1),
    scale: 2.5,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// MiniCPM5MoeConfig's.
const MINICPM5_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(160),
    top_k: Some(16),
    inter: 512,
    groups: 1,
    topk_group: 1,
    dense: Some(1),
    scale: 3.66,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// HYV3Config's.
const HY_V3_MOE_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: Some(192),
    top_k: Some(8),
    inter: 1536,
    groups: 1,
    topk_group: 1,
    dense: None,
    scale: 2.826,
    shared: Some(1),
    normalise: true,
    softmax: false,
};

/// EXAONE MoE's, HY V3's and MiniCPM 5 MoE's mixtures: DeepSeek-V3's ([`grouped_moe`]) under their
/// configs' names (`num_experts`, `num_shared_experts`; HY V3's `router_scaling_factor`) and defaults,
/// sparse on the layers `mlp_layer_types` names, else (EXAONE MoE, MiniCPM 5 MoE) from
/// `first_k_dense_replace` (default 1) on or (HY V3) from layer 1 on.
fn renamed_grouped_moe(v: &Value, model_type: &str, layers: usize, path: &Path) -> Result<Moe> {
    let mut aliased = v.clone();
    for (theirs, ours) in [
        ("num_experts", "n_routed_experts"),
        ("num_shared_experts", "n_shared_experts"),
        ("router_scaling_factor", "routed_scaling_factor"),
    ] {
        if let Some(x) = v.get(theirs) {
            aliased[ours] = x.clone();
        }
    }
    let defaults = match model_type {
        "hy_v3" => &HY_V3_MOE_DEFAULTS,
        "minicpm5_moe" => &MINICPM5_MOE_DEFAULTS,
        _ => &EXAONE_MOE_DEFAULTS,
    };
    let names = ("mlp", ["gate_proj", "up_proj", "down_proj"]);
    let mut m = grouped_moe(&aliased, layers, names, defaults, path)?;
    if v.get("mlp_layer_types").is_some_and(|t| !t.is_null()) {
        m.sparse_layers = mlp_layer_types(v, layers, path)?;
    }
    Ok(m)
}

/// Dots1Config's (dots.llm1).
const DOTS1_DEFAULTS: GroupedMoeDefaults = GroupedMoeDefaults {
    experts: None,
    top_k: None,
    inter: 1408,
    groups: 1,
    topk_group: 1,
    dense: Some(0),
    scale: 1.0,
    shared: None,
    normalise: false,
    softmax: false,
};

/// DeepSeek-V3's mixture (GLM-4.5's too), from the config's fields, absent ones the config class's
/// defaults (`defaults`, in the order below; DeepseekV3Config's or Glm4MoeConfig's): `n_routed_experts`
/// of `moe_intermediate_size`, `num_experts_per_tok` renormalised unless `norm_topk_prob` is false,
/// `n_shared_experts` in one shared MLP, σ routing in `n_group` groups keeping `topk_group`,
/// × `routed_scaling_factor`, sparse from layer `first_k_dense_replace` on; `names`: the MLP's module and
/// an expert's projections.
fn grouped_moe(
    v: &Value,
    layers: usize,
    names: MoeNames,
    defaults: &GroupedMoeDefaults,
    path: &Path,
) -> Result<Moe> {
    let (prefix, projections) = names;
    let size = |key: &str, default: Option<usize>| match default {
        Some(d) => size_within(v, key, d, path),
        None => get_size(v, key, MAX_SIZE, path),
    };
    let (experts, top_k, inter) = (
        size("n_routed_experts", defaults.experts)?,
        size("num_experts_per_tok", defaults.top_k)?,
        size("moe_intermediate_size", Some(defaults.inter))?,
    );
    let (groups, topk_group) = (
        size("n_group", Some(defaults.groups))?,
        size("topk_group", Some(defaults.topk_group))?,
    );
    let scale = opt_f64(v, "routed_scaling_factor", path)?.unwrap_or(defaults.scale);
    check_groups(top_k, [topk_group, groups, experts], scale, path)?;
    let shared = size("n_shared_experts", defaults.shared)?;
    let sparse_layers = match defaults.dense {
        Some(dense) => {
            let dense = size("first_k_dense_replace", Some(dense))?;
            (0..layers).map(|l| l >= dense).collect()
        }
        None => mlp_layer_types(v, layers, path)?,
    };
    Ok(Moe {
        experts,
        top_k,
        normalise: opt_bool(v, "norm_topk_prob", path)?.unwrap_or(defaults.normalise),
        inter,
        shared: (shared > 0).then_some(SharedExpert {
            module: "mlp.shared_experts",
            inter: inter * shared,
            gated: false,
        }),
        router: match defaults.softmax {
            true => MoeRouter::SoftmaxGroups {
                groups,
                topk_group,
                best: 2,
                scale,
            },
            false => MoeRouter::Sigmoid {
                groups,
                topk_group,
                scale,
                bias: "mlp.gate.e_score_correction_bias",
            },
        },
        sparse_layers,
        prefix,
        projections,
        oss: None,
        input_scaled: false,
        fused: FusedExperts::OutputsFirst,
    })
}

/// GLM-4.7-Flash's sparse layers (true: the mixture), as Glm4MoeLiteConfig reads them: `mlp_layer_types`
/// ("dense" or "sparse" per layer), absent: every layer but the first. A `first_k_dense_replace` other
/// than 1 without them is refused: transformers ignores it, the checkpoint's layers would not.
pub fn mlp_layer_types(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let Some(types) = v.get("mlp_layer_types").filter(|t| !t.is_null()) else {
        if let Some(k) = opt_usize(v, "first_k_dense_replace", path)?.filter(|&k| k != 1) {
            return Err(model_err(
                path,
                format!(
                    "field 'first_k_dense_replace' is {k} and there is no 'mlp_layer_types' (which \
                     transformers reads: only the first layer dense); state 'mlp_layer_types'"
                ),
            ));
        }
        return Ok((0..layers).map(|l| l > 0).collect());
    };
    let kinds = types
        .as_array()
        .filter(|a| a.len() == layers)
        .ok_or_else(|| {
            model_err(
                path,
                format!("field 'mlp_layer_types' is not a list of {layers} layer kinds"),
            )
        })?;
    kinds
        .iter()
        .map(|k| match k.as_str() {
            Some("sparse") => Ok(true),
            Some("dense") => Ok(false),
            _ => Err(model_err(
                path,
                format!("field 'mlp_layer_types' holds {k}, not \"dense\" or \"sparse\""),
            )),
        })
        .collect()
}

/// Which layers of config `v` use the window `w`: the kinds `layer_types` names, else the `derived` ones
/// (computed only then). A windowed layer without a window is an error (`off`: what else can turn the
/// window off).
fn layer_kinds(
    v: &Value,
    layers: usize,
    w: Option<usize>,
    derived: impl FnOnce() -> Result<Vec<bool>>,
    off: &str,
    path: &Path,
) -> Result<Vec<bool>> {
    let (sliding, source) = match v.get("layer_types") {
        None | Some(Value::Null) => (derived()?, "the layer pattern makes"),
        Some(lt) => (
            parse_layer_types(lt, layers, path)?,
            "field 'layer_types' names",
        ),
    };
    if w.is_none() && sliding.contains(&true) {
        return Err(model_err(
            path,
            format!("{source} sliding_attention layers but there is no 'sliding_window'{off}"),
        ));
    }
    Ok(sliding)
}

/// Gemma 2 and 3's, OLMo 3's and Cohere 2's layer kinds when config `v` has no `layer_types` (true:
/// sliding window): every layer but each `pattern`-th, the pattern 2 for Gemma 2,
/// `sliding_window_pattern` (absent → 6) for Gemma 3 and (absent → 4) Cohere 2 and EXAONE 4 (none
/// without a window), 4 for OLMo 3, as their config classes derive them. `None` for the other types. Read here and by the
/// pruned checkpoint's config, which writes them out.
pub fn pattern_layer_kinds(
    v: &Value,
    model_type: &str,
    layers: usize,
    path: &Path,
) -> Result<Option<Vec<bool>>> {
    let pattern = match model_type {
        // GptOssConfig: the even layers windowed.
        "gemma2" | "gpt_oss" | "vaultgemma" => 2,
        "gemma3_text" => opt_usize(v, "sliding_window_pattern", path)?.unwrap_or(6),
        "olmo3" => 4,
        // Cohere2Config reads `sliding_window_pattern` (default 4) as a keyword argument only.
        "cohere2" => opt_usize(v, "sliding_window_pattern", path)?.unwrap_or(4),
        // Exaone4Config: no window, no sliding layers; its pattern may be a string ("LLLG"), which the
        // class cannot expand itself (hub configs with one list `layer_types`).
        "exaone4" | "exaone_moe" if v.get("sliding_window").is_some_and(Value::is_null) => {
            return Ok(Some(vec![false; layers]))
        }
        "exaone4" | "exaone_moe" => match v.get("sliding_window_pattern") {
            None | Some(Value::Null) => 4,
            Some(Value::String(p)) => {
                return Err(model_err(
                    path,
                    format!(
                    "field 'sliding_window_pattern' is \"{p}\" and there is no 'layer_types' to \
                         say which layers are windowed"
                ),
                ))
            }
            Some(_) => get_usize(v, "sliding_window_pattern", path)?,
        },
        // AfmoeConfig: every `global_attn_every_n_layers`-th layer full (default 4).
        "afmoe" => opt_usize(v, "global_attn_every_n_layers", path)?.unwrap_or(4),
        // CwmConfig and GraniteSWAConfig: every 4th layer from the first full, the others windowed.
        "cwm" | "granite_swa" | "granitemoe_swa" => {
            return Ok(Some((0..layers).map(|l| l % 4 != 0).collect()))
        }
        _ => return Ok(None),
    };
    if pattern == 0 {
        return Err(model_err(path, "field 'sliding_window_pattern' is 0"));
    }
    Ok(Some((0..layers).map(|l| (l + 1) % pattern != 0).collect()))
}

/// The checkpoint's `quantization_config`: none, or transformers' fine-grained FP8 (`quant_method`
/// `fp8`, `fmt` e4m3, a `weight_block_size` of two sizes: the block of one scale). Other methods
/// (GPTQ, AWQ, bitsandbytes, MXFP4, compressed-tensors) are refused.
fn parse_quantization(v: &Value, path: &Path) -> Result<Option<[usize; 2]>> {
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
    let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
    if method != "fp8" || fmt != "e4m3" {
        return Err(model_err(
            path,
            format!(
                "the checkpoint is quantized (quantization_config, quant_method '{method}'); the \
                 runtime reads f32, f16 and bf16 weights, and block-scaled FP8 (quant_method 'fp8', \
                 fmt 'e4m3'): dequantize it to bf16 first"
            ),
        ));
    }
    let block: Option<[usize; 2]> = q
        .get("weight_block_size")
        .and_then(|b| serde_json::from_value(b.clone()).ok())
        .filter(|b: &[usize; 2]| b[0] > 0 && b[1] > 0);
    match block {
        Some(b) => Ok(Some(b)),
        None => Err(model_err(
            path,
            "quantization_config (fp8): 'weight_block_size' is not two positive sizes (per-tensor \
             FP8 scales are not supported)",
        )),
    }
}

/// A layer kind's rotary embedding: (θ, scaling).
type KindRope = (f64, RopeScaling);

/// Granite SWA's rotary θ per layer (`layer_rope_theta`; absent: `theta` on every layer; 0: no rotary
/// embedding on that layer) as the runtime's rotary settings: the θ of the full-attention layers, the
/// sliding-window layers' where it differs (with the same `scaling`), and which layers rotate. Refused:
/// two θs among the layers of one kind.
fn layer_rope_theta(
    v: &Value,
    sliding: &[bool],
    theta: f64,
    scaling: &RopeScaling,
    path: &Path,
) -> Result<(f64, Option<KindRope>, Vec<bool>)> {
    let layers = sliding.len();
    let thetas: Vec<f64> = match v.get("layer_rope_theta") {
        None | Some(Value::Null) => vec![theta; layers],
        Some(x) => serde_json::from_value(x.clone())
            .ok()
            .filter(|t: &Vec<f64>| {
                t.len() == layers && t.iter().all(|t| t.is_finite() && *t >= 0.0)
            })
            .ok_or_else(|| {
                model_err(
                    path,
                    format!(
                        "field 'layer_rope_theta' is not a list of {layers} non-negative numbers"
                    ),
                )
            })?,
    };
    let kind_theta = |window: bool| -> Result<Option<f64>> {
        let mut found = None;
        for (&t, _) in (thetas.iter().zip(sliding)).filter(|&(&t, &s)| s == window && t != 0.0) {
            match found {
                Some(f) if f != t => {
                    let kind = if window {
                        "sliding-window"
                    } else {
                        "full-attention"
                    };
                    return Err(model_err(
                        path,
                        format!(
                            "field 'layer_rope_theta' gives the {kind} layers two rotary θs ({f} and \
                             {t}); one per layer kind is supported"
                        ),
                    ));
                }
                _ => found = Some(t),
            }
        }
        Ok(found)
    };
    let (full, window) = (kind_theta(false)?, kind_theta(true)?);
    let full = full.or(window).unwrap_or(theta);
    let sliding_rope = window.filter(|&w| w != full).map(|w| (w, scaling.clone()));
    Ok((
        full,
        sliding_rope,
        thetas.iter().map(|&t| t != 0.0).collect(),
    ))
}

/// SmolLM3's and Llama 4's layers with a rotary embedding (true) and without ("NoPE", false):
/// `no_rope_layers` (1: rotary, 0: none) or, without it, every layer but each
/// `no_rope_layer_interval`-th (absent → 4), as SmolLM3Config and Llama4TextConfig derive them (the
/// latter from an empty list too). Read here and by the pruned checkpoint's config, which writes them
/// out.
pub fn nope_rotary_layers(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    // Null, or (with layers) an empty list, states nothing.
    let empty = |x: &Value| x.is_null() || layers > 0 && x.as_array().is_some_and(Vec::is_empty);
    match v.get("no_rope_layers").filter(|x| !empty(x)) {
        None => {
            let interval = opt_usize(v, "no_rope_layer_interval", path)?.unwrap_or(4);
            if interval == 0 {
                return Err(model_err(path, "field 'no_rope_layer_interval' is 0"));
            }
            Ok((0..layers).map(|l| (l + 1) % interval != 0).collect())
        }
        Some(list) => {
            let flags: Option<Vec<bool>> = list.as_array().and_then(|a| {
                a.iter()
                    .map(|x| match x.as_i64() {
                        Some(0) => Some(false),
                        Some(1) => Some(true),
                        _ => x.as_bool(),
                    })
                    .collect()
            });
            match flags {
                Some(f) if f.len() == layers => Ok(f),
                _ => Err(model_err(
                    path,
                    format!(
                        "field 'no_rope_layers' must list {layers} entries of 0 or 1 (one per layer)"
                    ),
                )),
            }
        }
    }
}

/// `layer_types` as a per-layer "is sliding" list; "attention" is transformers' legacy name of
/// "full_attention". Other attention kinds have no mask in Qwen2Model and are refused.
fn parse_layer_types(lt: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let entries = lt
        .as_array()
        .ok_or_else(|| model_err(path, "field 'layer_types' is not a list"))?;
    if entries.len() != layers {
        return Err(model_err(
            path,
            format!(
                "field 'layer_types' has {} entries but num_hidden_layers is {layers}",
                entries.len()
            ),
        ));
    }
    entries
        .iter()
        .enumerate()
        .map(|(l, e)| match e.as_str() {
            Some("full_attention" | "attention") => Ok(false),
            Some("sliding_attention") => Ok(true),
            _ => Err(model_err(
                path,
                format!(
                    "field 'layer_types' entry {l} is {e}; supported: \"full_attention\", \
                     \"sliding_attention\""
                ),
            )),
        })
        .collect()
}

/// The rotary settings of a config with one rotary embedding: (theta, scaling, rotary_dim).
/// transformers 5.x nests them in `rope_parameters` (theta included); 4.x has top-level `rope_theta` and
/// an optional `rope_scaling` object.
fn parse_rope(
    v: &Value,
    model_type: &str,
    head_dim: usize,
    path: &Path,
) -> Result<(f64, RopeScaling, usize)> {
    // GPT-NeoX's 4.x names: `rotary_emb_base` for rope_theta, `rotary_pct` (default 0.25) for
    // partial_rotary_factor.
    let neox = model_type == "gpt_neox";
    // PhiConfig rotates half of each head by default.
    let default_partial = match model_type {
        "gpt_neox" | "stablelm" => 0.25,
        "glm" | "glm4" | "glm4_moe" => 0.5,
        // NemotronConfig's default.
        "phi" | "nemotron" => 0.5,
        _ => 1.0,
    };
    let (theta_key, partial_key) = match neox {
        true => ("rotary_emb_base", "rotary_pct"),
        false => ("rope_theta", "partial_rotary_factor"),
    };
    let top_theta = || -> Result<Option<f64>> {
        Ok(opt_f64(v, "rope_theta", path)?.or(opt_f64(v, theta_key, path)?))
    };
    let scaling = rope_object(v);
    let stated_theta = match v.get("rope_parameters") {
        Some(rp @ Value::Object(_)) => opt_f64(rp, "rope_theta", path)?,
        _ => None,
    };
    let rope_theta = stated_theta
        .or(top_theta()?)
        .unwrap_or(class_rope_theta(model_type));
    // partial_rotary_factor: in rope_parameters (5.x) or at the top level (4.x); only Phi-3's and
    // GPT-NeoX's attention rotates part of a head (the others' rotate_half would not broadcast).
    let partial = match scaling.map(|s| opt_f64(s, "partial_rotary_factor", path)) {
        Some(Ok(Some(f))) => f,
        Some(Err(e)) => return Err(e),
        _ => opt_f64(v, partial_key, path)?.unwrap_or(default_partial),
    };
    // transformers: dim = int(head_dim * partial_rotary_factor), frequencies for arange(0, dim, 2).
    let rotary_dim = (head_dim as f64 * partial) as usize;
    let partial_ok = matches!(
        model_type,
        "phi3"
            | "gpt_neox"
            | "phi"
            | "stablelm"
            | "glm"
            | "glm4"
            | "glm4_moe"
            | "minimax_m2"
            | "gptj"
            | "codegen"
            | "nemotron"
            | "mistral4"
    ) && partial > 0.0
        && partial <= 1.0
        && rotary_dim.is_multiple_of(2)
        && rotary_dim > 0;
    if partial != 1.0 && !partial_ok {
        return Err(model_err(
            path,
            format!(
                "partial_rotary_factor {partial} is not supported for {model_type} with head_dim \
                 {head_dim} (phi3, phi, gpt_neox, stablelm, glm and glm4 only, and head_dim × factor \
                 must be a positive even number)"
            ),
        ));
    }
    // HunYuan's "dynamic" with an `alpha` is NTK-alpha: a fixed θ × alpha^(d / (d − 2)) whatever the
    // sequence length (HunYuanDenseV1RotaryEmbedding's `ntk_alpha`).
    if model_type.starts_with("hunyuan") {
        let kind = scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(Value::as_str);
        let alpha = match scaling.filter(|_| kind == Some("dynamic")) {
            Some(s) => opt_f64(s, "alpha", path)?,
            None => None,
        };
        if let Some(alpha) = alpha {
            let alpha = positive(alpha, "alpha", path)?;
            let d = rotary_dim as f64;
            return Ok((
                rope_theta * alpha.powf(d / (d - 2.0)),
                RopeScaling::Default,
                rotary_dim,
            ));
        }
    }
    let rope_scaling = parse_rope_scaling(scaling, v, model_type, rotary_dim, path)?;
    Ok((rope_theta, rope_scaling, rotary_dim))
}

/// The rope settings the config class of Ministral 3, Mistral 4 or CWM takes when config `v` states
/// none: Ministral 3's YaRN × 16 past 16384 tokens and Mistral 4's × 128 past 8192 (on the rotary part
/// of each head), both with Llama 4's attention scaling (whose beta the runtime reads from them);
/// CWM's llama3 scaling × 16 past 8192.
fn class_rope_parameters(v: &Value, model_type: &str, path: &Path) -> Result<Value> {
    let max = |default: u64| {
        v.get("max_position_embeddings")
            .cloned()
            .unwrap_or(default.into())
    };
    Ok(match model_type {
        "ministral3" => serde_json::json!({"rope_type": "yarn", "rope_theta": 1000000.0,
            "factor": 16.0, "original_max_position_embeddings": 16384,
            "max_position_embeddings": max(262144), "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}),
        "gpt_oss" => {
            serde_json::json!({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false,
            "original_max_position_embeddings": 4096})
        }
        "mistral4" => {
            let size = |key: &str| size_or(v, key, 64, path);
            let (nope, rope) = (size("qk_nope_head_dim")?, size("qk_rope_head_dim")?);
            serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                "original_max_position_embeddings": 8192, "max_position_embeddings": max(1048576),
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
                "partial_rotary_factor": rope as f64 / (nope + rope).max(1) as f64})
        }
        "apertus" => serde_json::json!({"rope_type": "llama3", "rope_theta": 12000000.0,
            "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}),
        _ => serde_json::json!({"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0,
            "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}),
    })
}

/// The rope settings of config `v`: its `rope_parameters` object (5.x), else its `rope_scaling` (4.x).
fn rope_object(v: &Value) -> Option<&Value> {
    match v.get("rope_parameters") {
        Some(rp @ Value::Object(_)) => Some(rp),
        _ => v.get("rope_scaling").filter(|s| !s.is_null()),
    }
}

/// DeepSeek's softmax scale as transformers' `yarn_apply_mscale` folds it: 1/√head_dim ×
/// mscale(factor, `mscale_all_dim`)² (mscale(s, m) = 0.1 m ln s + 1 for s > 1, else 1) when the rope
/// settings are not the default and name a non-zero `mscale_all_dim`; else `None` (1/√head_dim).
fn mla_softmax_scale(v: &Value, head_dim: usize, path: &Path) -> Result<Option<f32>> {
    let Some(s) = rope_object(v) else {
        return Ok(None);
    };
    let kind = s.get("rope_type").or_else(|| s.get("type"));
    let all = opt_f64(s, "mscale_all_dim", path)?.filter(|&m| m != 0.0);
    let (Some(all), false) = (
        all,
        kind.and_then(Value::as_str).unwrap_or("default") == "default",
    ) else {
        return Ok(None);
    };
    let factor = opt_f64(s, "factor", path)?
        .ok_or_else(|| model_err(path, "rope scaling field 'factor' is missing"))?;
    let mscale = match factor > 1.0 {
        true => 0.1 * all * factor.ln() + 1.0,
        false => 1.0,
    };
    Ok(Some(
        ((head_dim as f64).powf(-0.5) * mscale * mscale) as f32,
    ))
}

/// DeepSeek-V2's and V3's MLA config classes' defaults (Youtu's too).
const DEEPSEEK_MLA: Mla = Mla {
    q_lora_rank: Some(1536),
    kv_lora_rank: 512,
    nope: 128,
    rope: 64,
    v: 128,
};

/// Mistral4Config's (Mistral Small 4).
const MISTRAL4_MLA: Mla = Mla {
    q_lora_rank: Some(1024),
    kv_lora_rank: 256,
    nope: 64,
    rope: 64,
    v: 128,
};

/// Glm4MoeLiteConfig's (GLM-4.7-Flash).
const GLM4_MOE_LITE_MLA: Mla = Mla {
    q_lora_rank: Some(768),
    kv_lora_rank: 512,
    nope: 192,
    rope: 64,
    v: 256,
};

/// MiniCPM3Config's (MiniCPM3-4B; `v_head_dim`'s default, hidden / heads, filled in by the caller).
const MINICPM3_MLA: Mla = Mla {
    q_lora_rank: Some(768),
    kv_lora_rank: 256,
    nope: 64,
    rope: 32,
    v: 0,
};

/// MiniCPM3's three scalings as MiniCPM3Config derives them: the embeddings × `scale_emb` (12), each
/// residual branch × `scale_depth` (1.4; null: √layers) / √layers, the lm_head's input ×
/// `dim_model_base` (256; null: hidden) / hidden.
fn minicpm3_scales(v: &Value, hidden: usize, layers: usize, path: &Path) -> Result<[f32; 3]> {
    let field = |key: &str, default: f64, null: f64| -> Result<f64> {
        let x = match v.get(key) {
            None => default,
            Some(Value::Null) => null,
            Some(_) => opt_f64(v, key, path)?.unwrap_or(default),
        };
        if !(x > 0.0 && x.is_finite()) {
            return Err(model_err(
                path,
                format!("field '{key}' is {x}, not a positive number"),
            ));
        }
        Ok(x)
    };
    let depth = (layers as f64).sqrt();
    Ok([
        field("scale_emb", 12.0, 1.0)? as f32,
        (field("scale_depth", 1.4, depth)? / depth) as f32,
        (field("dim_model_base", 256.0, hidden as f64)? / hidden as f64) as f32,
    ])
}

/// Multi-head latent attention from the config's fields, absent ones the config class's `defaults`
/// ([`DEEPSEEK_MLA`]: `q_lora_rank` 1536 (null: one `q_proj`), `kv_lora_rank` 512,
/// `qk_nope_head_dim` 128, `qk_rope_head_dim` 64, `v_head_dim` 128). Refused: `num_key_value_heads` other than `num_attention_heads` (the
/// latent gives every head its key and value; transformers' attention would not run it either), and a
/// value wider than a query.
fn parse_mla(v: &Value, [heads, kv_heads]: [usize; 2], defaults: Mla, path: &Path) -> Result<Mla> {
    let size = |key: &str, default: usize| size_within(v, key, default, path);
    let q_lora_rank = match (v.get("q_lora_rank"), defaults.q_lora_rank) {
        (Some(Value::Null), _) | (None, None) => None,
        (_, default) => Some(size("q_lora_rank", default.unwrap_or(0))?),
    };
    let mla = Mla {
        q_lora_rank,
        kv_lora_rank: size("kv_lora_rank", defaults.kv_lora_rank)?,
        nope: size("qk_nope_head_dim", defaults.nope)?,
        rope: size("qk_rope_head_dim", defaults.rope)?,
        v: size("v_head_dim", defaults.v)?,
    };
    if kv_heads != heads {
        return Err(model_err(
            path,
            format!(
                "num_key_value_heads ({kv_heads}) differs from num_attention_heads ({heads}): not an \
                 MLA attention"
            ),
        ));
    }
    let Mla {
        kv_lora_rank,
        nope,
        rope,
        v: v_dim,
        ..
    } = mla;
    if q_lora_rank == Some(0) || kv_lora_rank == 0 || nope == 0 || v_dim == 0 {
        return Err(model_err(
            path,
            "q_lora_rank, kv_lora_rank, qk_nope_head_dim and v_head_dim must be positive",
        ));
    }
    if rope == 0 || rope % 2 != 0 {
        return Err(model_err(
            path,
            format!("qk_rope_head_dim {rope} must be even and positive"),
        ));
    }
    if nope + rope > MAX_HEAD_DIM || v_dim > nope + rope {
        return Err(model_err(
            path,
            format!(
                "heads of {nope} + {rope} query values and {v_dim} values: not supported (values at \
                 most as wide as queries)"
            ),
        ));
    }
    Ok(mla)
}

/// Ministral 3's `llama_4_scaling_beta` and the positions it leaves unscaled (the rope settings'
/// `original_max_position_embeddings`); `None` without a beta or with 0.
fn llama4_query_scaling(v: &Value, path: &Path) -> Result<Option<(f64, usize)>> {
    let Some(s) = rope_object(v) else {
        return Ok(None);
    };
    let Some(beta) = opt_f64(s, "llama_4_scaling_beta", path)?.filter(|&b| b != 0.0) else {
        return Ok(None);
    };
    let original = opt_usize(s, "original_max_position_embeddings", path)?
        .filter(|&o| o > 0)
        .ok_or_else(|| {
            model_err(
                path,
                "llama_4_scaling_beta needs a positive 'original_max_position_embeddings'",
            )
        })?;
    Ok(Some((beta, original)))
}

/// The rotary θ a config class takes when a config states none (its `default_theta`, transformers 5.25;
/// 10⁴ where the class has none).
fn class_rope_theta(model_type: &str) -> f64 {
    match model_type {
        "cohere" | "ernie4_5" | "ernie4_5_moe" | "exaone" | "flex_olmo" => 500_000.0,
        "cwm" => 1_000_000.0,
        "helium" => 100_000.0,
        "gpt_oss" => 150_000.0,
        "llama4_text" => 500_000.0,
        "apertus" => 12_000_000.0,
        "hy_v3" => 11_158_840.0,
        "minicpm5_moe" => 5_000_000.0,
        "mixtral" => 1_000_000.0,
        "smollm3" => 2_000_000.0,
        "minimax_m2" => 5_000_000.0,
        _ => 10_000.0,
    }
}

/// The two rotary embeddings of Gemma 3 and OLMo 3, ((theta, scaling) of the full-attention layers, that
/// of the sliding-window layers), as their `convert_rope_params_to_dict` read them: 5.x `rope_parameters`
/// keyed by layer kind; 4.x top-level `rope_theta` with `rope_scaling` for the full-attention layers
/// only and, for the others, Gemma 3's `rope_local_base_freq` (unscaled). The class defaults: Gemma 3's
/// θ 10⁶ (full) and 10⁴ (sliding), OLMo 3's 5·10⁵ for both. OLMo 3's sliding layers take the class
/// default in the 4.x form whatever `rope_theta` says: Olmo3Config pops `rope_theta` from its keyword
/// arguments for the full-attention layers, and the second pop finds the default (transformers 5.25;
/// the hub's Olmo 3 checkpoints say 5·10⁵ anyway).
#[allow(clippy::type_complexity)]
fn parse_per_kind_rope(
    v: &Value,
    model_type: &str,
    head_dim: usize,
    path: &Path,
) -> Result<((f64, RopeScaling), (f64, RopeScaling))> {
    let top_theta = opt_f64(v, "rope_theta", path)?;
    let (full_default, local_key, local_default) = match model_type {
        "gemma3_text" => (1e6, "rope_local_base_freq", 1e4),
        _ => (top_theta.unwrap_or(5e5), "", 5e5),
    };
    let per_kind = v
        .get("rope_parameters")
        .filter(|rp| rp.get("full_attention").is_some() || rp.get("sliding_attention").is_some());
    let one = |rp: Option<&Value>, default_theta: f64| -> Result<(f64, RopeScaling)> {
        let rp = rp.filter(|r| !r.is_null());
        let theta = match rp {
            Some(r) => opt_f64(r, "rope_theta", path)?,
            None => None,
        };
        let scaling = parse_rope_scaling(rp, v, model_type, head_dim, path)?;
        Ok((theta.unwrap_or(default_theta), scaling))
    };
    match per_kind {
        Some(rp) => Ok((
            one(rp.get("full_attention"), full_default)?,
            one(rp.get("sliding_attention"), local_default)?,
        )),
        None => {
            let full = one(v.get("rope_scaling"), full_default)?;
            let global = top_theta.unwrap_or(full_default);
            let local = match local_key {
                "" => None,
                key => opt_f64(v, key, path)?,
            };
            let local = local.unwrap_or(local_default);
            Ok(((global, full.1), (local, RopeScaling::Default)))
        }
    }
}

/// The MLP's gate activation. LLaMA-family types: `hidden_act` silu. Gemma: `hidden_act`, where "gelu" is
/// the legacy name of the tanh approximation (GemmaConfig rewrites it); Gemma 2 and 3:
/// `hidden_activation`.
fn parse_activation(v: &Value, model_type: &str, path: &Path) -> Result<Activation> {
    let (key, default) = match model_type {
        "gemma" => ("hidden_act", "gelu_pytorch_tanh"),
        "gemma2" | "gemma3_text" => ("hidden_activation", "gelu_pytorch_tanh"),
        "gpt_neox" => ("hidden_act", "gelu"),
        "phi" => ("hidden_act", "gelu_new"),
        "starcoder2" => ("hidden_act", "gelu_pytorch_tanh"),
        "gpt2" => ("activation_function", "gelu_new"),
        "opt" => ("activation_function", "relu"),
        "falcon" => ("activation", "gelu"),
        // MptMLP's exact GELU and BloomGelu, the tanh approximation, has no config key.
        "bloom" => ("", "gelu_new"),
        "gptj" | "codegen" | "gpt_neo" => ("activation_function", "gelu_new"),
        "gpt_bigcode" => ("activation_function", "gelu_pytorch_tanh"),
        "mpt" => ("", "gelu"),
        "arcee" | "nemotron" | "jais2" => ("hidden_act", "relu2"),
        // EXAONE's hub configs name it activation_function (ExaoneConfig's attribute_map; read under
        // that name so that an error names the field the file has).
        "exaone" if v.get("activation_function").is_some() => ("activation_function", "silu"),
        _ => ("hidden_act", "silu"),
    };
    let name = v.get(key).and_then(Value::as_str).unwrap_or(default);
    match name {
        "silu" if !model_type.starts_with("gemma") => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" if model_type.starts_with("gemma") => {
            Ok(Activation::GeluTanh)
        }
        "gelu" if model_type == "gemma" => Ok(Activation::GeluTanh),
        "gelu" if model_type == "gpt_neox" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"
            if matches!(model_type, "gpt_neox" | "phi") =>
        {
            Ok(Activation::GeluTanh)
        }
        "gelu" if model_type == "phi" => Ok(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" if model_type == "starcoder2" => Ok(Activation::GeluTanh),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"
            if matches!(
                model_type,
                "gpt2" | "bloom" | "gptj" | "codegen" | "gpt_bigcode" | "gpt_neo"
            ) =>
        {
            Ok(Activation::GeluTanh)
        }
        "gelu" if matches!(model_type, "gpt2" | "opt" | "gpt_bigcode") => Ok(Activation::Gelu),
        "relu" if model_type == "opt" => Ok(Activation::Relu),
        "gelu" if matches!(model_type, "falcon" | "mpt") => Ok(Activation::Gelu),
        "relu2" if matches!(model_type, "arcee" | "nemotron" | "jais2") => Ok(Activation::Relu2),
        _ => Err(model_err(
            path,
            format!(
                "{key} '{name}' is not supported for {model_type} (llama family: silu; gemma: \
                 gelu_pytorch_tanh; gpt_neox, phi: gelu, gelu_new; starcoder2: gelu_pytorch_tanh)"
            ),
        )),
    }
}

/// Gemma 2 and 3's soft-capping of the attention scores and of the logits: (attn, final), `None` when
/// off. The config classes' defaults: Gemma 2 50 and 30, Gemma 3 none; null turns one off. Other types
/// have none. Bidirectional attention (EmbeddingGemma) is refused by name.
fn parse_softcaps(v: &Value, model_type: &str, path: &Path) -> Result<(Option<f32>, Option<f32>)> {
    if !matches!(model_type, "gemma2" | "gemma3_text") {
        return Ok((None, None));
    }
    if opt_bool(v, "use_bidirectional_attention", path)? == Some(true) {
        return Err(model_err(
            path,
            "field 'use_bidirectional_attention' is true: only causal decoders are supported",
        ));
    }
    let cap = |key: &str, class_default: Option<f64>| -> Result<Option<f32>> {
        let c = match v.get(key) {
            None => class_default,
            Some(_) => opt_f64(v, key, path)?,
        };
        match c {
            Some(c) if !(c > 0.0 && c.is_finite()) => Err(model_err(
                path,
                format!("field '{key}' is {c}, not a positive number"),
            )),
            c => Ok(c.map(|c| c as f32)),
        }
    };
    let gemma2 = model_type == "gemma2";
    Ok((
        cap("attn_logit_softcapping", gemma2.then_some(50.0))?,
        cap("final_logit_softcapping", gemma2.then_some(30.0))?,
    ))
}

/// `pad_token_id` as nn.Embedding takes its `padding_idx`: null → none, absent → the config class's
/// default (0 for Gemma and Cohere, 1 for OLMo 2 and 3, 128004 for SmolLM3, none for the others), negative → counted from the end of the
/// vocabulary, outside it → an error (PyTorch refuses it too).
fn parse_pad_token_id(
    v: &Value,
    vocab: usize,
    model_type: &str,
    path: &Path,
) -> Result<Option<usize>> {
    let id = match v.get("pad_token_id") {
        None if model_type.starts_with("gemma") => 0,
        None if matches!(model_type, "olmo" | "olmo2" | "olmo3") => 1,
        None if model_type == "flex_olmo" => 100277,
        None if model_type.starts_with("cohere") || model_type == "exaone" => 0,
        None if model_type == "internlm3" => 2,
        // InternLM2Config (remote code) defaults it to 0; its embedding takes it as padding_idx.
        None if matches!(
            model_type,
            "ernie4_5" | "ernie4_5_moe" | "internlm2" | "hunyuan_v1_dense" | "hunyuan_v1_moe"
        ) =>
        {
            0
        }
        None if matches!(model_type, "helium" | "apertus") => 3,
        None if matches!(model_type, "seed_oss" | "minicpm5_moe") => 1,
        None if matches!(model_type, "ministral3" | "mistral4") => 11,
        None if matches!(model_type, "glm" | "glm4") => 151329,
        None if model_type == "smollm3" => 128004,
        None | Some(Value::Null) => return Ok(None),
        Some(x) => x
            .as_i64()
            .ok_or_else(|| model_err(path, "field 'pad_token_id' is not an integer"))?,
    };
    let resolved = if id < 0 { vocab as i64 + id } else { id };
    if resolved < 0 || resolved >= vocab as i64 {
        return Err(model_err(
            path,
            format!("field 'pad_token_id' is {id}, outside the vocabulary of {vocab}"),
        ));
    }
    Ok(Some(resolved as usize))
}

/// The rope scaling object (`rope_parameters` or `rope_scaling`) of config `v`; `rotary_dim` sizes
/// LongRoPE's factor lists.
fn parse_rope_scaling(
    s: Option<&Value>,
    v: &Value,
    model_type: &str,
    rotary_dim: usize,
    path: &Path,
) -> Result<RopeScaling> {
    let Some(s) = s else {
        return Ok(RopeScaling::Default);
    };
    let mut kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    // Phi3Config reads the older names of LongRoPE as LongRoPE.
    if model_type == "phi3" && matches!(kind, "su" | "yarn") {
        kind = "longrope";
    }
    let need = |key: &str| -> Result<f64> {
        opt_f64(s, key, path)?
            .ok_or_else(|| model_err(path, format!("rope scaling field '{key}' is missing")))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        }),
        "longrope" => parse_longrope(s, v, rotary_dim, path),
        "yarn" => parse_yarn(s, v, path),
        "dynamic" => {
            if rotary_dim <= 2 {
                return Err(model_err(
                    path,
                    "dynamic rope scaling needs more than 2 rotary dimensions",
                ));
            }
            Ok(RopeScaling::Dynamic {
                factor: positive(need("factor")?, "factor", path)?,
                max_position_embeddings: opt_usize(v, "max_position_embeddings", path)?
                    .filter(|&m| m > 0)
                    .ok_or_else(|| {
                        model_err(
                            path,
                            "dynamic rope scaling needs a positive 'max_position_embeddings'",
                        )
                    })?,
            })
        }
        other => Err(model_err(
            path,
            format!(
                "rope_scaling rope_type '{other}' is not supported (default, linear, llama3, longrope, \
                 yarn, dynamic)"
            ),
        )),
    }
}

/// `x` when it is a positive finite number, else an error naming the rope scaling field `key`.
fn positive(x: f64, key: &str, path: &Path) -> Result<f64> {
    if x > 0.0 && x.is_finite() {
        Ok(x)
    } else {
        Err(model_err(
            path,
            format!("rope scaling field '{key}' is {x}, not a positive number"),
        ))
    }
}

/// YaRN's settings as `_compute_yarn_parameters` (transformers 5.x) reads them:
/// `original_max_position_embeddings` from the rope object, else the config's top level, else
/// `max_position_embeddings`; `factor` (absent: `max_position_embeddings / original`); `beta_fast`,
/// `beta_slow` (absent or 0: 32 and 1); `truncate` (default true); `attention_factor` (absent:
/// mscale(factor, `mscale`) / mscale(factor, `mscale_all_dim`) when both are set and non-zero, else
/// mscale(factor), where mscale(s, m) = 0.1 m ln s + 1 for s > 1, else 1).
fn parse_yarn(s: &Value, v: &Value, path: &Path) -> Result<RopeScaling> {
    let max_pos = opt_f64(v, "max_position_embeddings", path)?;
    let original = match opt_f64(s, "original_max_position_embeddings", path)? {
        Some(o) => Some(o),
        None => opt_f64(v, "original_max_position_embeddings", path)?,
    }
    .or(max_pos)
    .ok_or_else(|| {
        model_err(
            path,
            "YaRN needs 'original_max_position_embeddings' (or 'max_position_embeddings')",
        )
    })?;
    let original = positive(original, "original_max_position_embeddings", path)?;
    let factor = match opt_f64(s, "factor", path)? {
        Some(f) => f,
        None => max_pos.unwrap_or(original) / original,
    };
    let factor = positive(factor, "factor", path)?;
    let mscale = |m: f64| match factor > 1.0 {
        true => 0.1 * m * factor.ln() + 1.0,
        false => 1.0,
    };
    let nonzero =
        |key: &str| -> Result<Option<f64>> { Ok(opt_f64(s, key, path)?.filter(|&x| x != 0.0)) };
    let attention_factor = match opt_f64(s, "attention_factor", path)? {
        Some(a) => a,
        None => match (nonzero("mscale")?, nonzero("mscale_all_dim")?) {
            (Some(m), Some(all)) => mscale(m) / mscale(all),
            _ => mscale(1.0),
        },
    };
    let beta = |key: &str, default: f64| -> Result<f64> {
        positive(nonzero(key)?.unwrap_or(default), key, path)
    };
    Ok(RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: beta("beta_fast", 32.0)?,
        beta_slow: beta("beta_slow", 1.0)?,
        truncate: opt_bool(s, "truncate", path)?.unwrap_or(true),
        attention_factor: positive(attention_factor, "attention_factor", path)?,
    })
}

/// LongRoPE's settings as `_compute_longrope_parameters` (transformers 5.x) reads them: the factor lists
/// (`rotary_dim / 2` each); `original_max_position_embeddings` from the rope object, else the config's
/// top level (4.x), else `max_position_embeddings`; `factor` (absent: `max_position_embeddings /
/// original_max_position_embeddings`) sets the default `attention_factor`, √(1 + ln factor / ln original)
/// (1 when factor ≤ 1).
fn parse_longrope(s: &Value, v: &Value, rotary_dim: usize, path: &Path) -> Result<RopeScaling> {
    let factors = |key: &str| -> Result<Vec<f64>> {
        let list = s.get(key).and_then(Value::as_array).ok_or_else(|| {
            model_err(
                path,
                format!("rope scaling field '{key}' is missing or not a list"),
            )
        })?;
        let f: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
        match f {
            Some(f) if f.len() == rotary_dim / 2 && f.iter().all(|x| x.is_finite() && *x > 0.0) => {
                Ok(f)
            }
            _ => Err(model_err(
                path,
                format!(
                    "rope scaling field '{key}' must hold {} positive numbers (one per rotary \
                     frequency), it has {} entries",
                    rotary_dim / 2,
                    list.len()
                ),
            )),
        }
    };
    let (short_factor, long_factor) = (factors("short_factor")?, factors("long_factor")?);
    let max_pos = opt_usize(v, "max_position_embeddings", path)?;
    let original = match opt_usize(s, "original_max_position_embeddings", path)? {
        Some(o) => Some(o),
        None => opt_usize(v, "original_max_position_embeddings", path)?,
    }
    .or(max_pos)
    .filter(|&o| o >= 2)
    .ok_or_else(|| {
        model_err(
            path,
            "LongRoPE needs 'original_max_position_embeddings' (or 'max_position_embeddings') of at \
             least 2",
        )
    })?;
    let factor = match opt_f64(s, "factor", path)? {
        Some(f) => f,
        None => max_pos.unwrap_or(original) as f64 / original as f64,
    };
    let attention_factor = match opt_f64(s, "attention_factor", path)? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0
        })
    }

    /// YaRN's and dynamic NTK's frequencies and cos/sin factor are transformers 5.25's
    /// (`ROPE_INIT_FUNCTIONS["yarn"]`, `["dynamic"](config, seq_len=16)` on these settings), to f32
    /// rounding; dynamic NTK is plain RoPE up to max_position_embeddings tokens.
    #[test]
    fn yarn_and_dynamic_ntk_frequencies_match_transformers() {
        let p = Path::new("config.json");
        let config = |rope: Value, head_dim: usize, max_pos: usize| {
            let mut v = base();
            v["hidden_size"] = (4 * head_dim).into();
            v["head_dim"] = head_dim.into();
            v["max_position_embeddings"] = max_pos.into();
            v["rope_parameters"] = rope;
            ModelConfig::from_json(&v, p).unwrap()
        };
        let close = |got: &[f64], want: &[f64]| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{got:?} vs {want:?}");
            }
        };
        // (rope parameters, head_dim, max_position_embeddings, frequencies, cos/sin factor) at 16 tokens.
        let cases = [
            (
                serde_json::json!({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                    "original_max_position_embeddings": 64}),
                16,
                256,
                vec![
                    1.0,
                    0.12120172381401062,
                    0.009401507675647736,
                    0.001823166268877685,
                    0.0003535533614922315,
                    6.856204709038138e-05,
                    1.3295739336172119e-05,
                    2.578346311565838e-06,
                ],
                1.138629436111989,
            ),
            // Untruncated correction range, other betas, the factor from mscale / mscale_all_dim.
            (
                serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                    "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
                    "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": false}),
                16,
                256,
                vec![
                    1.0,
                    0.03952847048640251,
                    0.012500000186264515,
                    0.0039528473280370235,
                    0.0012499999720603228,
                    0.00039528473280370235,
                    0.0001250000059371814,
                    3.9528473280370235e-05,
                ],
                1.0356570849393496,
            ),
            (
                serde_json::json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                8,
                8,
                vec![
                    1.0,
                    0.06933612376451492,
                    0.0048074983060359955,
                    0.00033333332976326346,
                ],
                1.0,
            ),
        ];
        for (rope, head_dim, max_pos, want, want_factor) in cases {
            let (f, a) = config(rope, head_dim, max_pos).rope_frequencies(false, 16);
            close(&f, &want);
            assert!((a - want_factor).abs() < 1e-12, "{a} vs {want_factor}");
        }
        let dynamic = config(
            serde_json::json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
            8,
            8,
        );
        let (short, _) = dynamic.rope_frequencies(false, 8);
        close(&short, &[1.0, 0.1, 0.01, 0.001]);
        // A factor that is no number, and dynamic scaling without a maximum length, are named.
        for (rope, max_pos, want) in [
            (
                serde_json::json!({"rope_type": "yarn", "factor": -1.0}),
                Some(64),
                "'factor' is -1",
            ),
            (
                serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
                None,
                "positive 'max_position_embeddings'",
            ),
        ] {
            let mut v = base();
            v["rope_scaling"] = rope;
            if let Some(m) = max_pos {
                v["max_position_embeddings"] = m.into();
            }
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn reads_both_rope_generations() {
        let p = Path::new("config.json");
        let mut v4 = base();
        v4["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c4 = ModelConfig::from_json(&v4, p).unwrap();
        let mut v5 = base();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let c5 = ModelConfig::from_json(&v5, p).unwrap();
        assert_eq!(c4.rope_scaling, c5.rope_scaling);
        assert_eq!(c4.rope_theta, c5.rope_theta);
        assert_eq!(c4.head_dim, 8);
        assert!(matches!(c4.rope_scaling, RopeScaling::Llama3 { .. }));
    }

    /// Which projections carry biases and whether q and k are normalised per head, per model type (as
    /// transformers' modelling files build them).
    #[test]
    fn biases_and_qk_norms_per_model_type() {
        let p = Path::new("config.json");
        let parts = |model_type: &str, attention_bias: bool| {
            let mut v = base();
            v["model_type"] = model_type.into();
            v["attention_bias"] = attention_bias.into();
            let c = ModelConfig::from_json(&v, p).unwrap();
            (c.qkv_bias, c.o_bias, c.qk_norm, c.block_norms)
        };
        use {BlockNorms::*, QkNorm::*};
        assert_eq!(parts("llama", false), (false, false, Off, Pre));
        assert_eq!(parts("llama", true), (true, true, Off, Pre));
        assert_eq!(parts("mistral", true), (false, false, Off, Pre));
        assert_eq!(parts("qwen2", false), (true, false, Off, Pre));
        assert_eq!(parts("qwen3", false), (false, false, PerHead, Pre));
        assert_eq!(parts("qwen3", true), (true, true, PerHead, Pre));
        assert_eq!(parts("olmo2", false), (false, false, Whole, Post));
        assert_eq!(parts("gemma2", true), (true, true, Off, Sandwich));
    }

    /// Expected values from transformers 5.23's MistralConfig / Qwen2Config (`sliding_window`,
    /// `layer_types`) on the same 4-layer configs.
    #[test]
    fn sliding_layers_follow_transformers() {
        let p = Path::new("config.json");
        let cfg = |model_type: &str, extra: Value| {
            let mut v = base();
            v["model_type"] = model_type.into();
            v["num_hidden_layers"] = 4.into();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            ModelConfig::from_json(&v, p)
        };
        let windows = |c: &ModelConfig| (0..4).map(|l| c.layer_window(l)).collect::<Vec<_>>();
        let (s, f) = (Some(5), None);
        let cases = [
            ("mistral", serde_json::json!({}), vec![Some(4096); 4]),
            (
                "mistral",
                serde_json::json!({"sliding_window": null}),
                vec![f; 4],
            ),
            // MistralModel ignores layer_types: one sliding mask for every layer.
            (
                "mistral",
                serde_json::json!({"sliding_window": 5, "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention"]}),
                vec![s; 4],
            ),
            (
                "llama",
                serde_json::json!({"sliding_window": 5}),
                vec![f; 4],
            ),
            (
                "qwen2",
                serde_json::json!({"sliding_window": 5}),
                vec![f; 4],
            ),
            (
                "qwen2",
                serde_json::json!({"use_sliding_window": true}),
                vec![f; 4], // max_window_layers defaults to 28
            ),
            (
                "qwen2",
                serde_json::json!({"use_sliding_window": true, "sliding_window": 5,
                    "max_window_layers": 2}),
                vec![f, f, s, s],
            ),
            (
                "qwen2",
                serde_json::json!({"use_sliding_window": true, "sliding_window": null,
                    "max_window_layers": 2}),
                vec![f; 4],
            ),
            (
                "qwen2",
                serde_json::json!({"use_sliding_window": true, "sliding_window": 5,
                    "max_window_layers": 1, "layer_types": ["full_attention",
                    "sliding_attention", "attention", "sliding_attention"]}),
                vec![f, s, f, s],
            ),
            // Qwen3Config (transformers 5.25) derives its layer kinds exactly as Qwen2Config does.
            (
                "qwen3",
                serde_json::json!({"sliding_window": 5, "max_window_layers": 2}),
                vec![f; 4],
            ),
            (
                "qwen3",
                serde_json::json!({"use_sliding_window": true, "sliding_window": 5,
                    "max_window_layers": 2}),
                vec![f, f, s, s],
            ),
        ];
        for (mt, extra, want) in cases {
            let c = cfg(mt, extra.clone()).unwrap();
            assert_eq!(windows(&c), want, "{mt} {extra}");
        }
        // Sliding layers without a window, a wrong layer count, an unknown kind, a zero window.
        for (extra, field) in [
            (
                serde_json::json!({"sliding_window": 5, "layer_types": ["full_attention",
                    "sliding_attention", "full_attention", "full_attention"]}),
                "layer_types",
            ),
            (
                serde_json::json!({"use_sliding_window": true,
                    "layer_types": ["full_attention", "full_attention", "full_attention"]}),
                "layer_types",
            ),
            (
                serde_json::json!({"use_sliding_window": true,
                    "layer_types": ["full_attention", "chunked_attention", "full_attention",
                    "full_attention"]}),
                "chunked_attention",
            ),
            (
                serde_json::json!({"use_sliding_window": true, "sliding_window": 0}),
                "sliding_window",
            ),
        ] {
            let e = cfg("qwen2", extra).unwrap_err().to_string();
            assert!(e.contains(field) && e.starts_with("config.json"), "{e}");
        }
    }

    /// Phi-3.5-mini's LongRoPE as both config generations spell it: short factors up to 4096 tokens, long
    /// beyond, attention factor √(1 + ln 32 / ln 4096) = √(17/12) from max_position_embeddings 131072;
    /// partial rotary; the window's class default (none); pad_token_id as nn.Embedding takes it.
    #[test]
    fn phi3_longrope_partial_rotary_and_padding() {
        let p = Path::new("config.json");
        let short: Vec<f64> = (0..6).map(|i| 1.0 + 0.1 * i as f64).collect();
        let long: Vec<f64> = (0..6).map(|i| 2.0 + i as f64).collect();
        let mut v4 = base();
        v4["model_type"] = "phi3".into();
        v4["hidden_size"] = 64.into(); // head_dim 16
        v4["partial_rotary_factor"] = 0.75.into(); // 12 rotary values, 6 frequencies
        v4["max_position_embeddings"] = 131072.into();
        v4["original_max_position_embeddings"] = 4096.into();
        v4["rope_scaling"] =
            serde_json::json!({"type": "su", "short_factor": short, "long_factor": long});
        let mut v5 = v4.clone();
        for k in ["rope_scaling", "rope_theta", "partial_rotary_factor"] {
            v5.as_object_mut().unwrap().remove(k);
        }
        v5["rope_parameters"] = serde_json::json!({"rope_type": "longrope", "rope_theta": 500000.0,
            "partial_rotary_factor": 0.75, "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": 4096});
        for v in [&v4, &v5] {
            let c = ModelConfig::from_json(v, p).unwrap();
            assert!(c.fused_qkv && c.fused_gate_up);
            assert_eq!((c.head_dim, c.rotary_dim), (16, 12));
            assert_eq!(c.layer_window(0), None, "phi3 has no default window");
            let (f_short, a) = c.rope_frequencies(false, 4096);
            let (f_long, a_long) = c.rope_frequencies(false, 4097);
            assert_eq!(a, a_long);
            assert!((a - (17.0f64 / 12.0).sqrt()).abs() < 1e-12, "{a}");
            for i in 0..6 {
                let plain = 1.0 / 500000f64.powf(2.0 * i as f64 / 12.0);
                assert!((f_short[i] * short[i] / plain - 1.0).abs() < 1e-6);
                assert!((f_long[i] * long[i] / plain - 1.0).abs() < 1e-6);
            }
        }
        // Factor lists of the wrong length; partial rotary on a model whose attention has none.
        let mut v = v5.clone();
        v["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(
            e.contains("long_factor") && e.contains("6 positive numbers"),
            "{e}"
        );
        let mut v = base();
        v["partial_rotary_factor"] = 0.5.into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
        // pad_token_id: absent, in range, counted from the end, outside.
        let pad = |id: Value| {
            let mut v = base();
            v["pad_token_id"] = id;
            ModelConfig::from_json(&v, p).map(|c| c.pad_token_id)
        };
        assert_eq!(pad(Value::Null).unwrap(), None);
        assert_eq!(pad(7.into()).unwrap(), Some(7));
        assert_eq!(pad((-1).into()).unwrap(), Some(99));
        let e = pad(100.into()).unwrap_err().to_string();
        assert!(e.contains("pad_token_id") && e.contains("100"), "{e}");
        // Absent: the config class's default (OLMo 2: 1, and its rms_norm_eps 1e-5).
        let mut v = base();
        v["model_type"] = "olmo2".into();
        v.as_object_mut().unwrap().remove("rms_norm_eps");
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!((c.pad_token_id, c.rms_norm_eps), (Some(1), 1e-5));
    }

    /// Gemma and Gemma 3 as their config classes read them (transformers 5.25): class defaults (head_dim
    /// 256, tied embeddings, pad 0), the activation names, Gemma 3's two rotary embeddings in both config
    /// generations, its pattern of windowed layers, its score scale, and the options it refuses.
    #[test]
    fn gemma_configs() {
        let p = Path::new("config.json");
        let mut g = base();
        g["model_type"] = "gemma".into();
        g["hidden_act"] = "gelu".into(); // the legacy name of the tanh approximation
        let c = ModelConfig::from_json(&g, p).unwrap();
        assert_eq!(
            (c.head_dim, c.tie_word_embeddings, c.pad_token_id),
            (256, true, Some(0))
        );
        assert_eq!((c.activation, c.norm_offset), (Activation::GeluTanh, 1.0));
        assert_eq!(c.embed_scale, 32f32.sqrt());
        assert_eq!((c.qk_norm, c.block_norms), (QkNorm::Off, BlockNorms::Pre));
        assert!(c.attn_scale.is_none());
        g["hidden_act"] = "silu".into();
        let e = ModelConfig::from_json(&g, p).unwrap_err().to_string();
        assert!(e.contains("hidden_act 'silu'"), "{e}");
        let mut l = base();
        l["hidden_act"] = "gelu_pytorch_tanh".into();
        assert!(ModelConfig::from_json(&l, p).is_err());

        // Gemma 3, 4.x form: rope_theta + rope_scaling for the full layers, rope_local_base_freq for
        // the sliding ones, sliding_window_pattern.
        let mut v4 = base();
        v4["model_type"] = "gemma3_text".into();
        v4["num_hidden_layers"] = 7.into();
        v4["head_dim"] = 16.into();
        v4["query_pre_attn_scalar"] = 64.into();
        v4["sliding_window_pattern"] = 3.into();
        v4["sliding_window"] = 512.into();
        v4["rope_local_base_freq"] = 10000.0.into();
        v4["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 8.0});
        let mut v5 = v4.clone();
        for k in [
            "rope_theta",
            "rope_scaling",
            "rope_local_base_freq",
            "sliding_window_pattern",
        ] {
            v5.as_object_mut().unwrap().remove(k);
        }
        v5["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}});
        v5["layer_types"] = serde_json::json!([
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]);
        for v in [&v4, &v5] {
            let c = ModelConfig::from_json(v, p).unwrap();
            assert_eq!(
                (c.qk_norm, c.block_norms),
                (QkNorm::PerHead, BlockNorms::Sandwich)
            );
            assert_eq!(c.attn_scale, Some(0.125));
            let w: Vec<_> = (0..7).map(|l| c.layer_window(l).is_some()).collect();
            assert_eq!(w, [true, true, false, true, true, false, true]);
            let (full, a) = c.rope_frequencies(false, 16);
            let (local, b) = c.rope_frequencies(true, 16);
            assert_eq!((a, b), (1.0, 1.0));
            for i in 0..8 {
                let plain = |theta: f64| 1.0 / theta.powf(2.0 * i as f64 / 16.0);
                assert!((full[i] * 8.0 / plain(500000.0) - 1.0).abs() < 1e-6);
                assert!((local[i] / plain(10000.0) - 1.0).abs() < 1e-6);
            }
        }
        // Soft-capping: none in Gemma 3 unless set; Gemma 2's class defaults 50 and 30, null turns one
        // off, a non-positive cap is refused. Bidirectional attention is refused by name.
        let caps = |model_type: &str, extra: Value| {
            let mut v = v5.clone();
            v["model_type"] = model_type.into();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            ModelConfig::from_json(&v, p).map(|c| (c.attn_softcap, c.final_softcap))
        };
        let none = serde_json::json!({});
        assert_eq!(caps("gemma3_text", none.clone()).unwrap(), (None, None));
        assert_eq!(caps("gemma2", none).unwrap(), (Some(50.0), Some(30.0)));
        let some = serde_json::json!({"attn_logit_softcapping": 20.0,
            "final_logit_softcapping": null});
        assert_eq!(caps("gemma2", some).unwrap(), (Some(20.0), None));
        for (key, value) in [
            ("final_logit_softcapping", serde_json::json!(0.0)),
            ("use_bidirectional_attention", serde_json::json!(true)),
        ] {
            let e = caps("gemma2", serde_json::json!({ key: value }))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
        // Gemma 2 windows every second layer, starting with the first (v4 has no layer_types).
        let mut g2 = v4.clone();
        g2["model_type"] = "gemma2".into();
        let c = ModelConfig::from_json(&g2, p).unwrap();
        let w: Vec<_> = (0..7).map(|l| c.layer_window(l).is_some()).collect();
        assert_eq!(w, [true, false, true, false, true, false, true]);
    }

    /// A size no checkpoint has is refused by name before anything is sized from it (a mistral config
    /// with 2^40 layers would otherwise ask for a 1 TB per-layer window table).
    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        let p = Path::new("config.json");
        for (key, value) in [
            ("num_hidden_layers", 1u64 << 40),
            ("hidden_size", 1 << 40),
            ("vocab_size", u64::MAX),
            ("head_dim", 1 << 30),
        ] {
            let mut v = base();
            v["model_type"] = "mistral".into();
            v[key] = value.into();
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("more than"), "{e}");
        }
    }

    /// ERNIE-4.5-21B-A3B's hub config (ernie4_5_moe): 64 experts of 1536, top 6 by probability + the
    /// correction bias, two shared experts in one MLP of 3072, layer 0 dense, interleaved rotary pairs,
    /// tied, pad 0.
    #[test]
    fn ernie4_5_moe_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288,
            "max_position_embeddings": 131072, "model_type": "ernie4_5_moe",
            "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28,
            "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 103424, "rope_theta": 500000,
            "use_bias": false, "tie_word_embeddings": true, "moe_num_experts": 64,
            "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_intermediate_size": 1536,
            "moe_capacity": [64, 64, 64], "moe_gate": "topk", "moe_k": 6, "moe_layer_interval": 1,
            "moe_use_aux_free": true, "num_nextn_predict_layers": 1
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.head_dim, c.rope_pairs, c.rope_theta),
            (128, RopePairs::Interleaved, 5e5)
        );
        assert!(c.tie_word_embeddings && !c.qkv_bias && c.pad_token_id == Some(0));
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (64, 6, 1536, true)
        );
        assert_eq!(
            m.shared.map(|s| (s.module, s.inter)),
            Some(("mlp.shared_experts", 3072))
        );
        assert_eq!(
            m.router,
            MoeRouter::SoftmaxBiased {
                bias: "mlp.moe_statics.e_score_correction_bias"
            }
        );
        assert_eq!(m.sparse_layers.iter().filter(|&&s| s).count(), 27);
        assert!(!m.sparse_layers[0]);
        let mut biased = hub.clone();
        biased["use_bias"] = true.into();
        let e = ModelConfig::from_json(&biased, p).unwrap_err().to_string();
        assert!(e.contains("use_bias"), "{e}");
    }

    /// DeepSeek-V3's hub config (4.x form, its FP8 quantization_config dropped): MLA with the query's
    /// bottleneck, YaRN × 40 with mscale_all_dim 1 (the scores × mscale² / √192), 256 experts in 8
    /// groups, σ routing, layers 0–2 dense; Moonlight's (no q bottleneck, 64 experts in one group, two
    /// shared). Refused: the FP8 checkpoint itself, another router, GQA, values wider than queries.
    #[test]
    fn deepseek_v3_hub_configs() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
            "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
            "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
            "max_position_embeddings": 163840, "model_type": "deepseek_v3",
            "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
            "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true,
            "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
            "num_key_value_heads": 128
        });
        let rest = serde_json::json!({
            "num_nextn_predict_layers": 1, "pretraining_tp": 1,
            "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid", "seq_aux": true, "tie_word_embeddings": false,
            "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
            "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128,
            "vocab_size": 129280
        });
        let mut hub = hub;
        hub.as_object_mut()
            .unwrap()
            .extend(rest.as_object().unwrap().clone());
        let c = ModelConfig::from_json(&hub, p).unwrap();
        let mla = Mla {
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            nope: 128,
            rope: 64,
            v: 128,
        };
        assert_eq!(c.mla, Some(mla));
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.attention_width()),
            (192, 64, 16384)
        );
        assert_eq!(c.rope_pairs, RopePairs::Interleaved);
        let mscale = 0.1 * 40f64.ln() + 1.0;
        assert_eq!(c.attn_scale, Some((mscale * mscale / 192f64.sqrt()) as f32));
        assert!(
            matches!(c.rope_scaling, RopeScaling::Yarn { factor: 40.0, attention_factor, .. }
                         if attention_factor == 1.0)
        );
        let m = c.moe.as_ref().unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (256, 8, 2048, true)
        );
        assert_eq!(
            m.router,
            MoeRouter::Sigmoid {
                groups: 8,
                topk_group: 4,
                scale: 2.5,
                bias: "mlp.gate.e_score_correction_bias"
            }
        );
        assert_eq!(m.sparse_layers.iter().position(|&s| s), Some(3));
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(2048));

        let mut moonlight = hub.clone();
        for (key, value) in [
            ("q_lora_rank", Value::Null),
            ("n_group", 1.into()),
            ("topk_group", 1.into()),
            ("n_routed_experts", 64.into()),
            ("num_experts_per_tok", 6.into()),
            ("n_shared_experts", 2.into()),
            ("moe_intermediate_size", 1408.into()),
            ("first_k_dense_replace", 1.into()),
            ("rope_scaling", Value::Null),
            ("rope_theta", 50000.into()),
        ] {
            moonlight[key] = value;
        }
        let c = ModelConfig::from_json(&moonlight, p).unwrap();
        assert_eq!(c.mla.map(|m| m.q_lora_rank), Some(None));
        assert_eq!((c.attn_scale, c.rope_theta), (None, 50000.0));
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(2816));
        assert_eq!(m.sparse_layers.iter().position(|&s| s), Some(1));

        let refused = |edit: &dyn Fn(&mut Value), what: &str| {
            let mut v = hub.clone();
            edit(&mut v);
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        // DeepSeek-V3's hub FP8: read (its blocks of 128 × 128); per-tensor scales refused.
        let mut fp8 = hub.clone();
        fp8["quantization_config"] = serde_json::json!({"activation_scheme": "dynamic",
            "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
        let c = ModelConfig::from_json(&fp8, p).unwrap();
        assert_eq!(c.fp8_block, Some([128, 128]));
        refused(
            &|v| v["quantization_config"] = serde_json::json!({"quant_method": "fp8"}),
            "per-tensor FP8 scales are not supported",
        );
        refused(
            &|v| v["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}),
            "quant_method 'fp8'",
        );
        refused(&|v| v["scoring_func"] = "softmax".into(), "scoring_func");
        refused(&|v| v["topk_method"] = "greedy".into(), "topk_method");
        refused(
            &|v| v["num_key_value_heads"] = 16.into(),
            "num_key_value_heads",
        );
        refused(&|v| v["v_head_dim"] = 256.into(), "values at most as wide");
        refused(
            &|v| v["qk_rope_head_dim"] = 63.into(),
            "qk_rope_head_dim 63",
        );
    }

    /// DeepSeek-V2-Lite's hub config: MLA without the query's bottleneck, YaRN × 40 with mscale =
    /// mscale_all_dim = 0.707, 64 experts of 1408 by greedy softmax, two shared, layer 0 dense;
    /// DeepSeek-V2's: the query's bottleneck, 160 experts in 8 groups (group_limited_greedy, 3 kept),
    /// weights × 16. Refused: renormalisation (transformers' DeepseekV2 ignores it), σ scores, V3's
    /// noaux_tc, group-limited routing without groups.
    #[test]
    fn deepseek_v2_hub_configs() {
        let p = Path::new("config.json");
        let lite = serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
            "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
            "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
            "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
            "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
            "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27
        });
        let rest = serde_json::json!({
            "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
            "seq_aux": true, "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy",
            "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": true,
            "v_head_dim": 128, "vocab_size": 102400
        });
        let mut lite = lite;
        lite.as_object_mut()
            .unwrap()
            .extend(rest.as_object().unwrap().clone());
        let c = ModelConfig::from_json(&lite, p).unwrap();
        assert_eq!(c.mla.map(|m| (m.q_lora_rank, m.v)), Some((None, 128)));
        assert_eq!((c.head_dim, c.rope_pairs), (192, RopePairs::Interleaved));
        let mscale = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert_eq!(c.attn_scale, Some((mscale * mscale / 192f64.sqrt()) as f32));
        let m = c.moe.as_ref().unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (64, 6, 1408, false)
        );
        assert_eq!(
            m.router,
            MoeRouter::SoftmaxGroups {
                groups: 1,
                topk_group: 1,
                best: 1,
                scale: 1.0
            }
        );
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(2816));
        assert_eq!(m.sparse_layers.iter().position(|&s| s), Some(1));

        let mut full = lite.clone();
        for (key, value) in [
            ("q_lora_rank", 1536.into()),
            ("n_group", 8.into()),
            ("topk_group", 3.into()),
            ("topk_method", "group_limited_greedy".into()),
            ("routed_scaling_factor", 16.0.into()),
            ("n_routed_experts", 160.into()),
            ("num_attention_heads", 128.into()),
            ("num_key_value_heads", 128.into()),
            ("hidden_size", 5120.into()),
        ] {
            full[key] = value;
        }
        let c = ModelConfig::from_json(&full, p).unwrap();
        assert_eq!(c.mla.map(|m| m.q_lora_rank), Some(Some(1536)));
        assert_eq!(
            c.moe.unwrap().router,
            MoeRouter::SoftmaxGroups {
                groups: 8,
                topk_group: 3,
                best: 1,
                scale: 16.0
            }
        );

        for (key, value, what) in [
            ("norm_topk_prob", Value::Bool(true), "norm_topk_prob"),
            ("scoring_func", "sigmoid".into(), "scoring_func"),
            ("topk_method", "noaux_tc".into(), "topk_method"),
            ("n_group", 7.into(), "not a routing"),
        ] {
            let mut v = full.clone();
            v[key] = value;
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(what), "{key}: {e}");
        }
    }

    /// Minitron-4B's hub config (nemotron, 4.x form): LayerNorm1P, ReLU², half of each 128-value head
    /// rotary, no biases; the class defaults (ReLU², half rotary, eps 1e-5) when the config is silent.
    #[test]
    fn nemotron_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["NemotronForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 3, "head_dim": 128,
            "hidden_act": "relu2", "hidden_size": 3072, "initializer_range": 0.0134,
            "intermediate_size": 9216, "max_position_embeddings": 4096, "mlp_bias": false,
            "model_type": "nemotron", "norm_eps": 1e-05, "num_attention_heads": 24,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "partial_rotary_factor": 0.5,
            "rope_theta": 10000, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "vocab_size": 256000
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(c.layout, BlockLayout::Nemotron);
        assert!(c.layout.layer_norm() && c.layout.norm_bias());
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.norm_offset, c.rms_norm_eps),
            (128, 64, 1.0, 1e-5)
        );
        assert_eq!(c.activation, Activation::Relu2);
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.tie_word_embeddings);
        let mut bare = hub.clone();
        for key in [
            "hidden_act",
            "partial_rotary_factor",
            "norm_eps",
            "head_dim",
        ] {
            bare.as_object_mut().unwrap().remove(key);
        }
        let c = ModelConfig::from_json(&bare, p).unwrap();
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.rms_norm_eps, c.activation),
            (128, 64, 1e-5, Activation::Relu2)
        );
    }

    /// GLM-4.7-Flash (glm4_moe_lite), Youtu-LLM and dots.llm1 configs stating little: their config
    /// classes' defaults (GLM-4.7-Flash's MLA and router, every layer but the first sparse; Youtu's
    /// DeepSeek MLA, dense, tied; dots1's required expert counts, windows past max_window_layers).
    #[test]
    fn glm4_moe_lite_youtu_and_dots1_defaults() {
        let p = Path::new("config.json");
        let base = |model_type: &str| {
            serde_json::json!({"model_type": model_type, "vocab_size": 1000, "hidden_size": 64,
                               "intermediate_size": 128, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 4})
        };
        let c = ModelConfig::from_json(&base("glm4_moe_lite"), p).unwrap();
        assert_eq!(c.mla, Some(GLM4_MOE_LITE_MLA));
        assert_eq!(
            (c.head_dim, c.attention_width(), c.rms_norm_eps),
            (256, 1024, 1e-5)
        );
        let m = c.moe.as_ref().unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (64, 4, 1536, true)
        );
        assert!(matches!(m.router, MoeRouter::Sigmoid { groups: 1, scale, .. } if scale == 1.8));
        assert_eq!(m.sparse_layers, [false, true, true, true]);
        let mut listed = base("glm4_moe_lite");
        listed["mlp_layer_types"] = serde_json::json!(["sparse", "dense", "sparse", "dense"]);
        let c = ModelConfig::from_json(&listed, p).unwrap();
        assert_eq!(c.moe.unwrap().sparse_layers, [true, false, true, false]);
        for (key, value, what) in [
            (
                "first_k_dense_replace",
                serde_json::json!(3),
                "state 'mlp_layer_types'",
            ),
            (
                "mlp_layer_types",
                serde_json::json!(["dense"]),
                "not a list of 4",
            ),
            (
                "mlp_layer_types",
                serde_json::json!(["dense", "moe", "dense", "dense"]),
                "\"moe\"",
            ),
        ] {
            let mut v = base("glm4_moe_lite");
            v[key] = value;
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(what), "{key}: {e}");
        }

        let c = ModelConfig::from_json(&base("youtu"), p).unwrap();
        assert_eq!(c.mla, Some(DEEPSEEK_MLA));
        assert!(c.moe.is_none() && c.tie_word_embeddings);
        assert_eq!(c.rope_pairs, RopePairs::Interleaved);

        let e = ModelConfig::from_json(&base("dots1"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_routed_experts"), "{e}");
        let mut dots = base("dots1");
        for (key, value) in [
            ("n_routed_experts", 8),
            ("num_experts_per_tok", 2),
            ("n_shared_experts", 2),
            ("first_k_dense_replace", 1),
            ("max_window_layers", 2),
            ("head_dim", 16),
        ] {
            dots[key] = value.into();
        }
        let c = ModelConfig::from_json(&dots, p).unwrap();
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        assert_eq!(c.sliding_window, Some(4096), "the class default window");
        assert_eq!(c.sliding_layers, [false, false, true, true]);
        let m = c.moe.as_ref().unwrap();
        assert_eq!(
            (m.normalise, m.sparse_layers.as_slice()),
            (false, &[false, true, true, true][..])
        );
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(2816));
        dots["sliding_window"] = Value::Null;
        let c = ModelConfig::from_json(&dots, p).unwrap();
        assert_eq!((c.sliding_window, c.sliding_layers), (None, vec![false; 4]));
    }

    /// MiniCPM3-4B's shape (MiniCPM3Config's defaults, the hub's LongRoPE): MLA with rotate_half pairs on
    /// 32 of 96 query values, values 2560 / 40 = 64 wide, LongRoPE's 16 factors, the embeddings × 12,
    /// residual branches × 1.4 / √62, the lm_head's input × 256 / 2560; null scalings are the identity.
    #[test]
    fn minicpm3_config() {
        let p = Path::new("config.json");
        let factors: Vec<f64> = (0..16).map(|i| 1.0 + i as f64 / 8.0).collect();
        let hub = serde_json::json!({
            "model_type": "minicpm3", "vocab_size": 73448, "hidden_size": 2560,
            "intermediate_size": 6400, "num_hidden_layers": 62, "num_attention_heads": 40,
            "num_key_value_heads": 40, "max_position_embeddings": 32768, "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": factors, "short_factor": factors,
                             "original_max_position_embeddings": 32768}
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            c.mla,
            Some(Mla {
                q_lora_rank: Some(768),
                kv_lora_rank: 256,
                nope: 64,
                rope: 32,
                v: 64
            })
        );
        assert_eq!((c.head_dim, c.rotary_dim), (96, 32));
        assert_eq!(c.rope_pairs, RopePairs::Halves);
        assert!(matches!(c.rope_scaling, RopeScaling::LongRope { .. }));
        assert_eq!(c.embed_scale, 12.0);
        assert_eq!(c.residual_scale, Some((1.4 / 62f64.sqrt()) as f32));
        assert_eq!(c.logits_scale, Some(0.1));
        assert!(c.tie_word_embeddings && c.attn_scale.is_none());
        let mut identity = hub.clone();
        for key in ["scale_emb", "scale_depth", "dim_model_base"] {
            identity[key] = Value::Null;
        }
        let c = ModelConfig::from_json(&identity, p).unwrap();
        assert_eq!(
            (c.embed_scale, c.residual_scale, c.logits_scale),
            (1.0, None, None)
        );
        let mut bad = hub.clone();
        bad["scale_depth"] = (-1.0).into();
        let e = ModelConfig::from_json(&bad, p).unwrap_err().to_string();
        assert!(e.contains("scale_depth"), "{e}");
    }

    /// EXAONE-3.5-2.4B-Instruct's hub config (remote-code names: num_layers, layer_norm_epsilon,
    /// activation_function): LLaMA's block under EXAONE's names, llama3 rope scaling, tied, pad 0.
    #[test]
    fn exaone_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "activation_function": "silu", "architectures": ["ExaoneForCausalLM"],
            "attention_dropout": 0.0, "bos_token_id": 1, "embed_dropout": 0.0, "eos_token_id": 361,
            "head_dim": 80, "hidden_size": 2560, "initializer_range": 0.02,
            "intermediate_size": 7168, "layer_norm_epsilon": 1e-05,
            "max_position_embeddings": 32768, "model_type": "exaone", "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_layers": 30, "pad_token_id": 0,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 102400
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(c.layout, BlockLayout::Exaone);
        assert_eq!(
            (
                c.num_hidden_layers,
                c.head_dim,
                c.rms_norm_eps,
                c.pad_token_id
            ),
            (30, 80, 1e-5, Some(0))
        );
        assert!(c.tie_word_embeddings && !c.layout.layer_norm());
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
        assert_eq!(c.layout.qkv_proj()[0], "attn.attention.q_proj");
        assert_eq!(
            c.layout.gated_mlp(),
            ("mlp", ["c_fc_0", "c_fc_1", "c_proj"])
        );
        let mut gelu = hub.clone();
        gelu["activation_function"] = "gelu".into();
        let e = ModelConfig::from_json(&gelu, p).unwrap_err().to_string();
        assert!(e.contains("activation_function 'gelu'"), "{e}");
    }

    /// Ministral 3 inside Mistral 3's vision-language wrapper (the hub's form): Mistral's block with
    /// YaRN and Llama 4's query scaling settings, and Ministral3Config's rope settings where the text
    /// config states none; Ministral (8B) windows every layer unless `layer_types` says otherwise.
    #[test]
    fn ministral_configs() {
        let p = Path::new("config.json");
        let wrapped = serde_json::json!({"model_type": "mistral3", "text_config": {
            "model_type": "ministral3", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 262144,
            "rope_parameters": {"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.1}}});
        let c = ModelConfig::from_json(&wrapped, p).unwrap();
        assert_eq!(
            (c.model_type.as_str(), c.multimodal.as_deref()),
            ("ministral3", Some("mistral3"))
        );
        assert_eq!(c.query_scaling, Some((0.1, 16384)));
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn { factor: 16.0, .. }
        ));
        assert_eq!(
            (c.rope_theta, c.pad_token_id, c.sliding_window),
            (1e6, Some(11), None)
        );
        let mut bare = wrapped["text_config"].clone();
        bare.as_object_mut().unwrap().remove("rope_parameters");
        let c = ModelConfig::from_json(&bare, p).unwrap();
        assert_eq!(
            c.query_scaling,
            Some((0.1, 16384)),
            "Ministral3Config's default"
        );
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn { factor: 16.0, .. }
        ));

        let ministral = serde_json::json!({"model_type": "ministral", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "sliding_window": 32});
        let c = ModelConfig::from_json(&ministral, p).unwrap();
        assert_eq!(
            (c.sliding_window, c.sliding_layers.clone()),
            (Some(32), vec![true; 3])
        );
        assert!(c.query_scaling.is_none());
    }

    /// Mistral Small 4 (mistral4) in Mistral 3's wrapper, stating little: Mistral4Config's MLA (heads of
    /// 64 + 64 query values, 128 values), its rope settings (YaRN × 128 on half of each head, Llama 4's
    /// query scaling, the softmax scale × mscale²), the softmax router inside groups by their best two,
    /// renormalised; pad 11.
    #[test]
    fn mistral4_config() {
        let p = Path::new("config.json");
        let wrapped = serde_json::json!({"model_type": "mistral3", "text_config": {
            "model_type": "mistral4", "hidden_size": 4096, "num_hidden_layers": 36,
            "num_attention_heads": 32, "vocab_size": 131072, "intermediate_size": 12288,
            "n_group": 4, "topk_group": 2}});
        let c = ModelConfig::from_json(&wrapped, p).unwrap();
        assert_eq!(c.mla, Some(MISTRAL4_MLA));
        assert_eq!((c.head_dim, c.rotary_dim), (128, 64));
        assert_eq!(c.rope_pairs, RopePairs::Interleaved);
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn { factor: 128.0, .. }
        ));
        assert_eq!(
            (c.query_scaling, c.pad_token_id),
            (Some((0.1, 8192)), Some(11))
        );
        let mscale = 0.1 * 128f64.ln() + 1.0;
        assert_eq!(c.attn_scale, Some((mscale * mscale / 128f64.sqrt()) as f32));
        let m = c.moe.as_ref().unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (128, 4, 2048, true)
        );
        assert_eq!(
            m.router,
            MoeRouter::SoftmaxGroups {
                groups: 4,
                topk_group: 2,
                best: 2,
                scale: 1.0
            }
        );
        assert!(
            m.sparse_layers.iter().all(|&s| s),
            "first_k_dense_replace 0"
        );
    }

    /// FlexOlmo-7x7B-1T's shape (FlexOlmoConfig's defaults): OLMo 2's norms after the attention and the
    /// MLP and whole-projection q/k norms, 7 experts of intermediate_size, top 5 not renormalised,
    /// θ 5·10⁵, pad 100277.
    #[test]
    fn flex_olmo_defaults() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"model_type": "flex_olmo", "vocab_size": 100352,
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.block_norms, c.qk_norm),
            (BlockNorms::Post, QkNorm::Whole)
        );
        assert_eq!(
            (c.rope_theta, c.pad_token_id, c.rms_norm_eps),
            (5e5, Some(100277), 1e-6)
        );
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (7, 5, 11008, false)
        );
        assert_eq!(m.router, MoeRouter::Softmax);
    }

    /// Granite 3.0 1B-A400M's config.json (granitemoe, 4.x form): Granite's multipliers, 32 experts of
    /// `intermediate_size`, top 8 renormalised; GraniteMoeShared's `shared_intermediate_size` gives the
    /// shared MLP, 0 none.
    #[test]
    fn granitemoe_hub_configs() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"architectures": ["GraniteMoeForCausalLM"],
            "attention_bias": false, "attention_dropout": 0.1, "attention_multiplier": 0.015625,
            "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 512,
            "logits_scaling": 6.0, "max_position_embeddings": 4096, "model_type": "granitemoe",
            "num_attention_heads": 16, "num_experts_per_tok": 8, "num_hidden_layers": 24,
            "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": false,
            "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-06,
            "rope_scaling": null, "rope_theta": 10000, "router_aux_loss_coef": 0.01,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 49155});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.attn_scale, c.residual_scale, c.logits_scale),
            (Some(0.015625), Some(0.22), Some(1.0 / 6.0))
        );
        assert_eq!((c.embed_scale, c.head_dim, c.rope_theta), (12.0, 64, 1e4));
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise, m.prefix),
            (32, 8, 512, true, "block_sparse_moe")
        );
        assert_eq!((m.router, m.shared), (MoeRouter::Softmax, None));
        assert!(m.sparse_layers.iter().all(|&s| s));
        let mut shared = v.clone();
        shared["model_type"] = "granitemoeshared".into();
        shared["shared_intermediate_size"] = 1024.into();
        let s = ModelConfig::from_json(&shared, p)
            .unwrap()
            .moe
            .unwrap()
            .shared;
        assert_eq!(
            s,
            Some(SharedExpert {
                module: "shared_mlp",
                inter: 1024,
                gated: false
            })
        );
        shared["shared_intermediate_size"] = 0.into();
        let none = ModelConfig::from_json(&shared, p)
            .unwrap()
            .moe
            .unwrap()
            .shared;
        assert_eq!(none, None);
    }

    /// Jais-2-8B's shape (Jais2Config's defaults): Nemotron's layout with plain LayerNorms (gains w),
    /// ReLU², biases on every projection, eps `layer_norm_eps`; a partial rotary embedding refused
    /// (Jais 2's attention rotates whole heads).
    #[test]
    fn jais2_defaults() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"model_type": "jais2", "vocab_size": 150272,
            "hidden_size": 3328, "intermediate_size": 26624, "num_hidden_layers": 32,
            "num_attention_heads": 26});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.layout, BlockLayout::Nemotron);
        assert_eq!(
            (c.norm_offset, c.rms_norm_eps, c.activation),
            (0.0, 1e-5, Activation::Relu2)
        );
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        assert_eq!((c.head_dim, c.rotary_dim), (128, 128));
        let mut partial = v.clone();
        partial["partial_rotary_factor"] = 0.5.into();
        assert!(ModelConfig::from_json(&partial, p).is_err());
    }

    /// CWM's shape (CwmConfig's defaults): a window of 8192 on all but every 4th layer from the first,
    /// llama3 rope scaling ×16 past 8192 tokens at θ 10⁶, heads of 128, no biases.
    #[test]
    fn cwm_defaults() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"model_type": "cwm", "vocab_size": 128256, "hidden_size": 6144,
            "intermediate_size": 21504, "num_hidden_layers": 8, "num_attention_heads": 48,
            "num_key_value_heads": 8});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.sliding_window, c.head_dim, c.rope_theta),
            (Some(8192), 128, 1e6)
        );
        assert_eq!(
            c.sliding_layers,
            [false, true, true, true, false, true, true, true]
        );
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 { factor: 16.0, .. }
        ));
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
    }

    /// Granite SWA (GraniteSWAConfig's defaults): a window of 128 on every layer but each 4th, attention
    /// sinks, MLP biases by `mlp_bias`, tied, eps 1e-5; `layer_rope_theta` as the θ of each layer kind
    /// and the layers without a rotary embedding (0), refused where one kind has two θs. Granite MoE
    /// SWA: the same attention, GraniteMoeShared's mixture, untied.
    #[test]
    fn granite_swa_defaults_and_layer_thetas() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"model_type": "granite_swa", "vocab_size": 100352,
            "hidden_size": 2560, "intermediate_size": 8192, "num_hidden_layers": 8,
            "num_attention_heads": 20, "num_key_value_heads": 4, "mlp_bias": true});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.sliding_window, c.rms_norm_eps, c.tie_word_embeddings),
            (Some(128), 1e-5, true)
        );
        assert_eq!(
            c.sliding_layers,
            [false, true, true, true, false, true, true, true]
        );
        assert!(c.attention_sinks && c.mlp_bias && c.rotary_layers.iter().all(|&r| r));
        assert_eq!((c.rope_theta, &c.sliding_rope), (1e4, &None));
        v["layer_rope_theta"] = serde_json::json!([1e6, 0, 1e4, 1e4, 1e6, 1e4, 0, 1e4]);
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_rope, Some((1e4, RopeScaling::Default)));
        assert_eq!(
            c.rotary_layers,
            [true, false, true, true, true, true, false, true]
        );
        let (global, local) = (
            c.rope_frequencies(false, 16).0,
            c.rope_frequencies(true, 16).0,
        );
        assert!(global[1] < local[1], "the full layers' θ is the larger");
        v["layer_rope_theta"] = serde_json::json!([1e6, 5e5, 1e4, 1e4, 1e6, 1e4, 0, 1e4]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("sliding-window layers two rotary θs"), "{e}");
        v["layer_rope_theta"] = serde_json::json!([1e6, 0]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("not a list of 8 non-negative numbers"), "{e}");
        let moe = serde_json::json!({"model_type": "granitemoe_swa", "vocab_size": 100352,
            "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 12, "num_key_value_heads": 4, "num_local_experts": 40,
            "num_experts_per_tok": 8, "shared_intermediate_size": 1024});
        let c = ModelConfig::from_json(&moe, p).unwrap();
        assert!(c.attention_sinks && !c.tie_word_embeddings);
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (40, 8, 512, true)
        );
        assert_eq!(
            m.shared.map(|s| (s.module, s.inter)),
            Some(("shared_mlp", 1024))
        );
        assert_eq!(c.sliding_layers, [false, true, true, true]);
    }

    /// gpt-oss-20b's config.json (a bf16 copy: the hub's own is MXFP4, refused): attention sinks, q/k/v/o
    /// biases, heads of 64, windows of 128 on the even layers, YaRN × 32 without truncation at θ
    /// 1.5·10⁵; 32 experts, top 4 renormalised, GPT-OSS's clamped SwiGLU (α the class's 1.702).
    #[test]
    fn gpt_oss_hub_config() {
        let p = Path::new("config.json");
        let kinds: Vec<&str> = (0..24)
            .map(|l| ["sliding_attention", "full_attention"][l % 2])
            .collect();
        let mut v = serde_json::json!({"architectures": ["GptOssForCausalLM"],
            "attention_bias": true, "attention_dropout": 0.0, "eos_token_id": 200002,
            "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
            "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
            "layer_types": kinds, "max_position_embeddings": 131072, "model_type": "gpt_oss",
            "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
            "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": false,
            "pad_token_id": 199999, "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0,
            "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
            "rope_type": "yarn", "truncate": false}, "rope_theta": 150000,
            "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
            "vocab_size": 201088});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert!(c.attention_sinks && c.qkv_bias && c.o_bias && !c.tie_word_embeddings);
        assert_eq!(
            (c.head_dim, c.sliding_window, c.rope_theta),
            (64, Some(128), 1.5e5)
        );
        assert!((0..24).all(|l| c.sliding_layers[l] == (l % 2 == 0)));
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 32.0,
                truncate: false,
                ..
            }
        ));
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (32, 4, 2880, true)
        );
        assert_eq!(
            m.oss,
            Some(OssSwiglu {
                alpha: 1.702,
                limit: 7.0
            })
        );
        // The hub's MXFP4 checkpoint: refused, with what to do.
        v["quantization_config"] = serde_json::json!({"quant_method": "mxfp4"});
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("'mxfp4'") && e.contains("dequantize"), "{e}");
        v.as_object_mut().unwrap().remove("quantization_config");
        v["swiglu_limit"] = (-1.0).into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("'swiglu_limit' is -1"), "{e}");
    }

    /// Llama 4 Scout's config.json (the vision-language wrapper, 4.51's text_config; the vision tower's
    /// section cut): a mixture on every layer of 16 experts of 8192, the top 1, a shared expert; dense
    /// MLPs of 16384 where there are any; interleaved llama3 × 16 rope, no rotary embedding on every
    /// 4th layer, weightless q/k norms on the others; sequences up to 8191 tokens (the NoPE layers'
    /// temperature, stated as 4, departs from 1 at 8192). Maverick's: a mixture on the odd layers of
    /// 128 experts, no q/k norms.
    #[test]
    fn llama4_hub_config() {
        let p = Path::new("config.json");
        let nope: Vec<u8> = (0..48).map(|l| u8::from((l + 1) % 4 != 0)).collect();
        let text = serde_json::json!({"attention_bias": false, "attention_chunk_size": 8192,
            "attention_dropout": 0.0, "attn_scale": 0.1, "attn_temperature_tuning": 4,
            "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192,
            "for_llm_compressor": false, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
            "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
            "model_type": "llama4_text", "moe_layers": (0..48).collect::<Vec<_>>(),
            "no_rope_layers": nope, "num_attention_heads": 40, "num_experts_per_tok": 1,
            "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
            "output_router_logits": false, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
            "torch_dtype": "bfloat16", "use_cache": true, "use_qk_norm": true, "vocab_size": 202048});
        let mut v = serde_json::json!({"architectures": ["Llama4ForConditionalGeneration"],
            "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092,
            "model_type": "llama4", "text_config": text, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "vision_config": {"model_type": "llama4_vision_model"}});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.multimodal.as_deref(), Some("llama4"));
        assert_eq!(
            (c.head_dim, c.intermediate_size, c.rope_theta, c.rope_pairs),
            (128, 16384, 5e5, RopePairs::Interleaved)
        );
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 16.0));
        assert!((0..48).all(|l| c.rotary_layers[l] == ((l + 1) % 4 != 0)));
        assert_eq!(
            (c.qk_norm, c.qk_norm_after_rope, c.qkv_bias),
            (QkNorm::Weightless, true, false)
        );
        assert_eq!(c.max_tokens.as_ref().map(|m| m.0), Some(8191));
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise, m.input_scaled),
            (16, 1, 8192, false, true)
        );
        assert_eq!((m.router, m.prefix), (MoeRouter::SigmoidTopK, "mlp"));
        assert_eq!(m.fused, FusedExperts::InputsFirst { interleaved: false });
        assert_eq!(m.shared.map(|s| s.inter), Some(8192));
        assert!(m.sparse_layers.iter().all(|&s| s));
        // Maverick's text_config: 128 experts on the odd layers (moe_layers derived from the step), no
        // rope scaling, no q/k norms; the chunks and the temperature off, no limit.
        let t = &mut v["text_config"];
        let obj = t.as_object_mut().unwrap();
        obj.remove("moe_layers");
        obj.remove("rope_scaling");
        t["interleave_moe_layer_step"] = 2.into();
        t["num_local_experts"] = 128.into();
        t["use_qk_norm"] = false.into();
        t["no_rope_layers"] = serde_json::json!([]);
        t["attention_chunk_size"] = serde_json::Value::Null;
        t["attn_temperature_tuning"] = false.into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!((c.qk_norm, c.max_tokens.is_none()), (QkNorm::Off, true));
        assert!((0..48).all(|l| c.rotary_layers[l] == ((l + 1) % 4 != 0)));
        let m = c.moe.unwrap();
        assert!((0..48).all(|l| m.is_sparse(l) == (l % 2 == 1)));
        assert_eq!(m.experts, 128);
        // Chunks of 4096 again (on the rotary layers, as the class derives the kinds): they bound the
        // sequences.
        v["text_config"]["attention_chunk_size"] = 4096.into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.max_tokens.as_ref().map(|m| m.0), Some(4096));
        v["text_config"]["moe_layers"] = serde_json::json!([1, 48]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("'moe_layers'") && e.contains("below 48"), "{e}");
    }

    /// A HyperCLOVA X config (HyperCLOVAXConfig's fields; the sizes illustrative): Granite's
    /// multipliers but the logits × logits_scaling, the scores × 1/√head_dim where attention_multiplier
    /// is absent, GLM-4's four norms; `use_post_norm` false leaves Granite's two.
    #[test]
    fn hyperclovax_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["HyperCLOVAXForCausalLM"],
            "model_type": "hyperclovax", "hidden_size": 5120, "intermediate_size": 13824,
            "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 110592, "embedding_multiplier": 1.0,
            "logits_scaling": 0.5, "residual_multiplier": 1.0, "rms_norm_eps": 1e-5,
            "rope_theta": 50000000, "tie_word_embeddings": false, "use_post_norm": true});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (
                c.block_norms,
                c.attn_scale,
                c.logits_scale,
                c.residual_scale
            ),
            (BlockNorms::Glm4, None, Some(0.5), None)
        );
        v["use_post_norm"] = false.into();
        v["attention_multiplier"] = 0.0625.into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.block_norms, c.attn_scale),
            (BlockNorms::Pre, Some(0.0625))
        );
    }

    /// An EXAONE MoE config (ExaoneMoeConfig's fields, its class defaults for the mixture): EXAONE 4's
    /// attention in a pre-norm block; 64 experts of 1024, top 8 renormalised × 2.5 by σ + the
    /// correction bias, one shared expert, sparse from layer 1; `mlp_layer_types` wins over
    /// `first_k_dense_replace` where both are stated.
    #[test]
    fn exaone_moe_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["ExaoneMoeForCausalLM"],
            "model_type": "exaone_moe", "hidden_size": 512, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 1000, "sliding_window": 128,
            "rope_theta": 1000000.0, "first_k_dense_replace": 1});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.model_type.as_str(), c.block_norms, c.qk_norm),
            ("exaone_moe", BlockNorms::Pre, QkNorm::PerHead)
        );
        assert_eq!(c.rotary_layers, [true, true, true, false]);
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (64, 8, 1024, true)
        );
        assert!(matches!(
            m.router,
            MoeRouter::Sigmoid { groups: 1, scale, .. } if scale == 2.5
        ));
        assert_eq!(m.shared.map(|s| s.inter), Some(1024));
        assert_eq!(m.sparse_layers, [false, true, true, true]);
        v["mlp_layer_types"] = serde_json::json!(["dense", "dense", "sparse", "dense"]);
        v["num_experts"] = 16.into();
        v["num_shared_experts"] = 2.into();
        let m = ModelConfig::from_json(&v, p).unwrap().moe.unwrap();
        assert_eq!(m.sparse_layers, [false, false, true, false]);
        assert_eq!((m.experts, m.shared.map(|s| s.inter)), (16, Some(2048)));
    }

    /// An AFMoE config of AfmoeConfig's defaults (Arcee Trinity's layout): windows of 1024 on all but
    /// every 4th layer, the rotary embedding on those only, per-head q/k norms, the gate on the
    /// attention's output, GLM-4's four norms; 64 experts of 1408, σ + `mlp.expert_bias` choosing the
    /// top 6, renormalised × `route_scale`, two shared experts, layer 0 dense; `mup_enabled` scales the
    /// embeddings by √hidden; a null window with sliding layers is refused.
    #[test]
    fn afmoe_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["AfmoeForCausalLM"], "model_type": "afmoe",
            "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 200192,
            "route_scale": 2.826, "rope_theta": 10000.0});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.head_dim, c.qk_norm, c.block_norms),
            (128, QkNorm::PerHead, BlockNorms::Glm4)
        );
        assert_eq!(
            (c.attention_output_gate, c.embed_scale),
            (Some(OutputGate::Projection), 1.0)
        );
        let windowed: Vec<bool> = (0..8).map(|l| (l + 1) % 4 != 0).collect();
        assert_eq!(
            (c.sliding_window, &c.sliding_layers),
            (Some(1024), &windowed)
        );
        assert_eq!(c.rotary_layers, windowed);
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (64, 6, 1408, true)
        );
        assert!(matches!(
            m.router,
            MoeRouter::Sigmoid { groups: 1, scale, bias: "mlp.expert_bias", .. } if scale == 2.826
        ));
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(2816));
        assert!((0..8).all(|l| m.is_sparse(l) == (l >= 1)));
        v["mup_enabled"] = true.into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.embed_scale, (2048f64).sqrt() as f32);
        v["sliding_window"] = serde_json::Value::Null;
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("no 'sliding_window'"), "{e}");
    }

    /// An Apertus config in the 4.x form of the hub's (swiss-ai/Apertus-8B-2509's sizes as published,
    /// from memory: the test rests on the fields, not the sizes): xIELU in Arcee's up → act → down MLP,
    /// per-head q/k norms, llama3 rope × 8 at θ 1.2·10⁷; without rope settings, the class's (the same);
    /// another hidden_act is read as the usual activations are.
    #[test]
    fn apertus_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["ApertusForCausalLM"],
            "model_type": "apertus", "hidden_size": 4096, "intermediate_size": 21504,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 131072, "hidden_act": "xielu", "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-5, "rope_theta": 12000000, "rope_scaling": {"factor": 8.0,
            "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": false});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert!(c.mlp_xielu && c.layout == BlockLayout::Arcee);
        assert_eq!(
            (c.qk_norm, c.head_dim, c.rope_theta, c.pad_token_id),
            (QkNorm::PerHead, 128, 1.2e7, Some(3))
        );
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let obj = v.as_object_mut().unwrap();
        obj.remove("rope_scaling");
        obj.remove("rope_theta");
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.rope_theta, 1.2e7);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        v["hidden_act"] = "silu".into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert!(!c.mlp_xielu && c.activation == Activation::Silu);
    }

    /// A HY V3 config of HYV3Config's defaults (its fields; the sizes the class's): per-head q/k norms,
    /// 192 experts of 1536, σ + the correction bias choosing the top 8, renormalised × 2.826, one shared
    /// expert, the first layer dense; `num_local_experts` is not read (the class maps it to
    /// `num_experts`, which hub configs state).
    #[test]
    fn hy_v3_config() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"architectures": ["HYV3ForCausalLM"], "model_type": "hy_v3",
            "hidden_size": 4096, "intermediate_size": 13312, "num_hidden_layers": 4,
            "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 120832});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.head_dim, c.qk_norm, c.rope_theta, c.rms_norm_eps),
            (128, QkNorm::PerHead, 11_158_840.0, 1e-5)
        );
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise),
            (192, 8, 1536, true)
        );
        assert!(matches!(
            m.router,
            MoeRouter::Sigmoid { groups: 1, scale, bias: "mlp.gate.e_score_correction_bias", .. }
                if scale == 2.826
        ));
        assert_eq!(m.shared.as_ref().map(|s| s.inter), Some(1536));
        assert_eq!(m.sparse_layers, [false, true, true, true]);
    }

    /// A MiniCPM 5 MoE config of MiniCPM5MoeConfig's defaults (the sizes the class's): the query's
    /// projection gives each head's gate too, 2 key/value heads, θ 5·10⁶; 160 experts of 512, σ + the
    /// correction bias choosing the top 16, renormalised × 3.66, one shared expert, sparse from
    /// `first_k_dense_replace` (1) on; `use_gated_attention` false is refused.
    #[test]
    fn minicpm5_moe_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["MiniCPM5MoeForCausalLM"],
            "model_type": "minicpm5_moe", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 4, "num_attention_heads": 32, "vocab_size": 130560,
            "first_k_dense_replace": 2});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (
                c.num_key_value_heads,
                c.head_dim,
                c.rope_theta,
                c.pad_token_id
            ),
            (2, 128, 5e6, Some(1))
        );
        assert_eq!(c.attention_output_gate, Some(OutputGate::WithQuery));
        let m = c.moe.unwrap();
        assert_eq!((m.experts, m.top_k, m.inter), (160, 16, 512));
        assert!(matches!(m.router, MoeRouter::Sigmoid { scale, .. } if scale == 3.66));
        assert_eq!(m.sparse_layers, [false, false, true, true]);
        v["use_gated_attention"] = false.into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("'use_gated_attention' is false"), "{e}");
    }

    /// Hunyuan-7B-Instruct's config.json (4.x form): per-head q/k norms after the rotary embedding,
    /// NTK-alpha rope (θ 10⁴ × 1000^(128/126), no scaling left), GQA; a "dynamic" rope without `alpha`
    /// stays dynamic NTK.
    #[test]
    fn hunyuan_dense_hub_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["HunYuanDenseV1ForCausalLM"],
            "attention_bias": false, "attention_head_dim": 128, "bos_token_id": 1,
            "cla_share_factor": 2, "eod_token_id": 127967, "eos_token_id": 127960, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "mlp_bias": false, "model_type": "hunyuan_v1_dense",
            "norm_type": "rms", "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "pad_token_id": 127961, "rms_norm_eps": 1e-05,
            "rope_scaling": {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "type": "dynamic"}, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "use_cla": false, "use_qk_norm": true,
            "use_rotary_pos_emb": true, "vocab_size": 128167});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!((c.qk_norm, c.qk_norm_after_rope), (QkNorm::PerHead, true));
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!((c.rope_theta / (1e4 * 1000f64.powf(128.0 / 126.0)) - 1.0).abs() < 1e-12);
        assert_eq!(
            (c.head_dim, c.pad_token_id, c.rms_norm_eps),
            (128, Some(127961), 1e-5)
        );
        assert!(!c.qkv_bias && !c.mlp_bias && c.tie_word_embeddings);
        v["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Dynamic { factor: 2.0, .. }
        ));
        assert_eq!(c.rope_theta, 1e4);
    }

    /// Hunyuan-A13B's shape (4.x form, per-layer lists of one value): 64 experts, top 8 renormalised, a
    /// shared MLP of `intermediate_size`, HunYuan's attention; lists that differ by layer are refused.
    #[test]
    fn hunyuan_moe_a13b_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"architectures": ["HunYuanMoEV1ForCausalLM"],
            "head_dim": 128, "hidden_size": 4096, "intermediate_size": 3072,
            "model_type": "hunyuan_v1_moe", "moe_intermediate_size": vec![3072; 32],
            "moe_topk": vec![8; 32], "num_attention_heads": 32, "num_experts": 64,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "num_shared_expert": vec![1; 32],
            "rms_norm_eps": 1e-05, "rope_scaling": {"alpha": 1000.0, "factor": 1.0,
            "type": "dynamic"}, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "vocab_size": 128167});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert!(c.qk_norm_after_rope && c.qk_norm == QkNorm::PerHead);
        assert!((c.rope_theta / (1e4 * 1000f64.powf(128.0 / 126.0)) - 1.0).abs() < 1e-12);
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise, m.router),
            (64, 8, 3072, true, MoeRouter::Softmax)
        );
        assert_eq!(
            m.shared.map(|s| (s.module, s.inter)),
            Some(("mlp.shared_mlp", 3072))
        );
        v["moe_topk"][3] = 4.into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(
            e.contains("'moe_topk' is not one size for every layer"),
            "{e}"
        );
    }

    /// gpt-neo-125M's config.json: GPTNeoConfig's names, unscaled scores, a window of 256 on the odd
    /// layers (attention_types), learned positions, intermediate_size null (4 × hidden), tied; an
    /// attention_types that does not cover num_layers, or an unknown kind, refused.
    #[test]
    fn gpt_neo_hub_config() {
        let p = Path::new("config.json");
        let mut v = serde_json::json!({"activation_function": "gelu_new",
            "architectures": ["GPTNeoForCausalLM"], "attention_dropout": 0,
            "attention_types": [[["global", "local"], 6]], "bos_token_id": 50256,
            "embed_dropout": 0, "eos_token_id": 50256, "hidden_size": 768,
            "initializer_range": 0.02, "intermediate_size": null, "layer_norm_epsilon": 1e-05,
            "max_position_embeddings": 2048, "model_type": "gpt_neo", "num_heads": 12,
            "num_layers": 12, "resid_dropout": 0, "vocab_size": 50257, "window_size": 256});
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(c.layout, BlockLayout::GptNeo);
        assert_eq!(
            (c.num_hidden_layers, c.head_dim, c.intermediate_size),
            (12, 64, 3072)
        );
        assert_eq!((c.attn_scale, c.sliding_window), (Some(1.0), Some(256)));
        assert!((0..12).all(|l| c.sliding_layers[l] == (l % 2 == 1)));
        assert_eq!(c.learned_positions.map(|p| p.max_tokens), Some(2048));
        assert!(!c.qkv_bias && c.o_bias && c.mlp_bias && c.tie_word_embeddings);
        assert_eq!((c.activation, c.pad_token_id), (Activation::GeluTanh, None));
        v["attention_types"] = serde_json::json!([[["global", "local"], 5]]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("gives 10 layers, num_layers is 12"), "{e}");
        v["attention_types"] = serde_json::json!([[["global", "sparse"], 6]]);
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("neither \"global\" nor \"local\""), "{e}");
    }

    /// VaultGemma (a 1B-shaped config, VaultGemmaConfig's defaults otherwise): Gemma 2's attention, scale,
    /// soft-caps, window pattern and embedding scale, in LLaMA's pre-norm block.
    #[test]
    fn vaultgemma_is_gemma2_with_pre_norms() {
        let p = Path::new("config.json");
        let v = serde_json::json!({"model_type": "vaultgemma", "hidden_size": 1152,
            "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000});
        let c = ModelConfig::from_json(&v, p).unwrap();
        let mut g2 = v.clone();
        g2["model_type"] = "gemma2".into();
        let g = ModelConfig::from_json(&g2, p).unwrap();
        assert_eq!(
            (c.model_type.as_str(), c.block_norms),
            ("vaultgemma", BlockNorms::Pre)
        );
        assert_eq!(g.block_norms, BlockNorms::Sandwich);
        assert_eq!(
            (c.attn_scale, c.attn_softcap, c.final_softcap, c.norm_offset),
            (g.attn_scale, Some(50.0), Some(30.0), 1.0)
        );
        assert_eq!(
            (c.sliding_window, &c.sliding_layers),
            (Some(4096), &g.sliding_layers)
        );
        assert!(c.sliding_layers[0] && !c.sliding_layers[1] && c.tie_word_embeddings);
        assert_eq!(
            (c.embed_scale, c.activation),
            (g.embed_scale, Activation::GeluTanh)
        );
    }

    /// A config without θ takes its class's `default_theta` (not 10⁴ for all).
    #[test]
    fn rope_theta_defaults_are_the_classes() {
        let p = Path::new("config.json");
        for (model_type, theta) in [
            ("llama", 1e4),
            ("cohere", 5e5),
            ("ernie4_5", 5e5),
            ("helium", 1e5),
            ("mixtral", 1e6),
            ("smollm3", 2e6),
        ] {
            let mut v = serde_json::json!({
                "model_type": model_type, "vocab_size": 200000, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 2,
                "num_experts_per_tok": 1
            });
            let c = ModelConfig::from_json(&v, p).unwrap();
            assert_eq!(c.rope_theta, theta, "{model_type}");
            v["rope_parameters"] = serde_json::json!({"rope_type": "default"});
            let c = ModelConfig::from_json(&v, p).unwrap();
            assert_eq!(c.rope_theta, theta, "{model_type}, 5.x form");
        }
    }

    /// MiniMax-M2's hub config (4.x form): 256 experts of 1536 (intermediate_size), top 8 by σ + the
    /// correction bias, q/k norms over the whole projections, the legacy rotary_dim 64 of 128, θ 5·10⁶
    /// (also when absent: the class default); linear attention and shared experts refused.
    #[test]
    fn minimax_m2_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["MiniMaxM2ForCausalLM"], "attn_type_list": [1, 1, 1, 1],
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536,
            "max_position_embeddings": 196608, "model_type": "minimax_m2", "num_attention_heads": 48,
            "num_experts_per_tok": 8, "num_hidden_layers": 4, "num_key_value_heads": 8,
            "num_local_experts": 256, "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64,
            "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": false,
            "use_qk_norm": true, "use_routing_bias": true, "vocab_size": 200064
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.rope_theta, c.qk_norm),
            (128, 64, 5e6, QkNorm::Whole)
        );
        assert!(!c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise, m.prefix, m.shared),
            (256, 8, 1536, true, "block_sparse_moe", None)
        );
        assert_eq!(
            m.router,
            MoeRouter::Sigmoid {
                groups: 1,
                topk_group: 1,
                scale: 1.0,
                bias: "block_sparse_moe.e_score_correction_bias"
            }
        );
        let mut bare = hub.clone();
        bare.as_object_mut().unwrap().remove("rope_theta");
        assert_eq!(ModelConfig::from_json(&bare, p).unwrap().rope_theta, 5e6);
        for (key, value) in [
            ("attn_type_list", serde_json::json!([0, 1, 1, 1])),
            ("shared_intermediate_size", 512.into()),
            ("scoring_func", "softmax".into()),
        ] {
            let mut bad = hub.clone();
            bad[key] = value;
            let e = ModelConfig::from_json(&bad, p).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    /// GLM-4.5-Air's hub config (glm4_moe): 128 experts of 1408, top 8 by σ, one shared expert, layer 0
    /// dense, q/k/v biases, half of each head rotary (rotate_half); impossible routings refused.
    #[test]
    fn glm4_moe_hub_config() {
        let p = Path::new("config.json");
        let air = serde_json::json!({
            "architectures": ["Glm4MoeForCausalLM"], "attention_bias": true, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 10944,
            "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408,
            "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": true,
            "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 46,
            "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 1000000,
            "routed_scaling_factor": 1.0, "tie_word_embeddings": false, "topk_group": 1,
            "first_k_dense_replace": 1, "use_qk_norm": false, "vocab_size": 151552
        });
        let c = ModelConfig::from_json(&air, p).unwrap();
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.rope_pairs),
            (128, 64, RopePairs::Halves)
        );
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.fused_gate_up);
        assert_eq!((c.qk_norm, c.block_norms), (QkNorm::Off, BlockNorms::Pre));
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.inter, m.normalise, m.prefix),
            (128, 8, 1408, true, "mlp")
        );
        let shared = m.shared.unwrap();
        assert_eq!(
            (shared.module, shared.inter, shared.gated),
            ("mlp.shared_experts", 1408, false)
        );
        assert_eq!(
            m.router,
            MoeRouter::Sigmoid {
                groups: 1,
                topk_group: 1,
                scale: 1.0,
                bias: "mlp.gate.e_score_correction_bias"
            }
        );
        assert_eq!(m.sparse_layers.iter().position(|&s| s), Some(1));
        let mut bad = air.clone();
        (bad["n_group"], bad["topk_group"]) = (8.into(), 1.into());
        bad["num_experts_per_tok"] = 20.into();
        let e = ModelConfig::from_json(&bad, p).unwrap_err().to_string();
        assert!(e.contains("not a routing"), "{e}");
    }

    /// The experts of each mixture-of-experts type: the expert count under either name, Mixtral always
    /// renormalising, the experts' intermediate size, Qwen's dense layers.
    #[test]
    fn moe_configs() {
        let p = Path::new("config.json");
        let with = |ty: &str, extra: serde_json::Value| {
            let mut v = base();
            v["model_type"] = ty.into();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            ModelConfig::from_json(&v, p).unwrap().moe.unwrap()
        };
        let m = with(
            "mixtral",
            serde_json::json!({"num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false}),
        );
        assert_eq!(
            (m.experts, m.top_k, m.normalise, m.prefix),
            (8, 2, true, "block_sparse_moe")
        );
        assert_eq!((m.projections, &m.shared), (["w1", "w3", "w2"], &None));
        assert_eq!(m.router, MoeRouter::Softmax);
        let m = with(
            "qwen3_moe",
            serde_json::json!({"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 24,
                               "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
        );
        assert_eq!((m.experts, m.inter, m.normalise), (6, 24, false));
        let layers = base()["num_hidden_layers"].as_u64().unwrap() as usize;
        let want: Vec<bool> = (0..layers).map(|l| l != 3 && l % 2 == 1).collect();
        assert_eq!(m.sparse_layers, want);
        let m = with(
            "qwen2_moe",
            serde_json::json!({"num_experts": 4, "num_experts_per_tok": 4, "moe_intermediate_size": 8,
                               "shared_expert_intermediate_size": 40, "norm_topk_prob": true}),
        );
        assert_eq!(
            (
                m.shared.as_ref().map(|s| (s.inter, s.gated)),
                m.normalise,
                m.top_k
            ),
            (Some((40, true)), true, 4)
        );
        assert!(m.sparse_layers.iter().all(|&s| s));
        let mut v = base();
        v["model_type"] = "llama".into();
        assert!(ModelConfig::from_json(&v, p).unwrap().moe.is_none());
    }

    /// GPTBigCodeConfig: GPT-2's names and defaults, multi-query unless `multi_query` is false; the hub's
    /// StarCoder (15.5B) config; cross-attention refused by name.
    #[test]
    fn gpt_bigcode_configs() {
        let p = Path::new("config.json");
        let c =
            ModelConfig::from_json(&serde_json::json!({"model_type": "gpt_bigcode"}), p).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.intermediate_size
            ),
            (768, 12, 12, 1, 3072)
        );
        assert_eq!(
            (c.layout, c.activation, c.attn_scale, c.pad_token_id),
            (BlockLayout::GptBigCode, Activation::GeluTanh, None, None)
        );
        assert!(c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
        assert_eq!(c.layout.grouped_qkv(), Some("attn.c_attn"));
        let starcoder = serde_json::json!({
            "model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
            "activation_function": "gelu_pytorch_tanh", "attention_softmax_in_fp32": true,
            "multi_query": true, "n_embd": 6144, "n_head": 48, "n_inner": 24576, "n_layer": 40,
            "n_positions": 8192, "scale_attention_softmax_in_fp32": true, "vocab_size": 49152,
            "layer_norm_epsilon": 1e-5, "bos_token_id": 0, "eos_token_id": 0,
        });
        let c = ModelConfig::from_json(&starcoder, p).unwrap();
        assert_eq!(
            (c.num_hidden_layers, c.head_dim, c.num_key_value_heads),
            (40, 128, 1)
        );
        assert_eq!(
            c.learned_positions,
            Some(LearnedPositions {
                max_tokens: 8192,
                offset: 0
            })
        );
        let mut v = starcoder.clone();
        v["multi_query"] = false.into();
        v["scale_attn_weights"] = false.into();
        v["activation_function"] = "gelu".into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.num_key_value_heads, c.attn_scale, c.activation),
            (48, Some(1.0), Activation::Gelu)
        );
        v["add_cross_attention"] = true.into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("add_cross_attention"), "{e}");
    }

    /// GPT2Config's names and defaults: a bare `{"model_type": "gpt2"}` is GPT-2 small.
    #[test]
    fn gpt2_config_names_and_defaults() {
        let p = Path::new("config.json");
        let c = ModelConfig::from_json(&serde_json::json!({"model_type": "gpt2"}), p).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.head_dim
            ),
            (768, 12, 12, 64)
        );
        assert_eq!((c.intermediate_size, c.vocab_size), (3072, 50257));
        let positions = |max_tokens, offset| Some(LearnedPositions { max_tokens, offset });
        assert_eq!(c.learned_positions, positions(1024, 0));
        assert_eq!(
            (c.layout, c.activation, c.rms_norm_eps),
            (BlockLayout::Gpt2, Activation::GeluTanh, 1e-5)
        );
        assert!(c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
        assert_eq!((c.attn_scale, c.pad_token_id), (None, None));
        let v = serde_json::json!({
            "model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 3, "n_inner": 100,
            "n_positions": 64, "layer_norm_epsilon": 1e-6, "activation_function": "gelu",
            "scale_attn_weights": false, "pad_token_id": 0,
        });
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.head_dim,
                c.intermediate_size
            ),
            (48, 2, 16, 100)
        );
        assert_eq!(
            (c.learned_positions, c.rms_norm_eps),
            (positions(64, 0), 1e-6)
        );
        assert_eq!(
            (c.activation, c.attn_scale, c.pad_token_id),
            (Activation::Gelu, Some(1.0), None)
        );
    }

    /// OPTConfig's names and defaults (OPT-125m), and OPT-350m's particulars refused by name.
    #[test]
    fn opt_config_names_and_defaults() {
        let p = Path::new("config.json");
        let c = ModelConfig::from_json(&serde_json::json!({"model_type": "opt"}), p).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.intermediate_size,
                c.vocab_size
            ),
            (768, 12, 3072, 50272)
        );
        let positions = Some(LearnedPositions {
            max_tokens: 2048,
            offset: 2,
        });
        assert_eq!((c.learned_positions, c.pad_token_id), (positions, Some(1)));
        assert_eq!(
            (c.layout, c.activation, c.rms_norm_eps),
            (BlockLayout::Opt, Activation::Relu, 1e-5)
        );
        assert!(c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
        let c = ModelConfig::from_json(
            &serde_json::json!({"model_type": "opt", "enable_bias": false, "pad_token_id": null}),
            p,
        )
        .unwrap();
        assert!(!(c.qkv_bias || c.o_bias || c.mlp_bias));
        assert_eq!(c.pad_token_id, None);
        for (key, value, want) in [
            (
                "do_layer_norm_before",
                serde_json::json!(false),
                "do_layer_norm_before",
            ),
            (
                "word_embed_proj_dim",
                serde_json::json!(512),
                "word_embed_proj_dim",
            ),
            (
                "layer_norm_elementwise_affine",
                serde_json::json!(false),
                "without weights",
            ),
        ] {
            let mut v = serde_json::json!({"model_type": "opt", "hidden_size": 1024});
            v[key] = value;
            let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("not supported"), "{e}");
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        let p = Path::new("config.json");
        let mut v = base();
        v["model_type"] = "t5".into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("model_type 't5'"), "{e}");
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "su", "factor": 2.0});
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("'su'"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    /// Vision-language wrappers: the decoder is the `text_config`, with the text config class's
    /// defaults where a hub config omits them, the wrapper named.
    #[test]
    fn multimodal_wrappers_read_their_text_config() {
        let p = Path::new("config.json");
        // google/gemma-3-4b-it's text_config (4.50): no vocab_size, head_dim, rope_theta, pattern.
        let gemma3 = serde_json::json!({
            "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
            "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 27}
        });
        let c = ModelConfig::from_json(&gemma3, p).unwrap();
        assert_eq!(c.multimodal.as_deref(), Some("gemma3"));
        assert_eq!(c.model_type, "gemma3_text");
        assert_eq!(
            (c.vocab_size, c.head_dim, c.num_hidden_layers),
            (262_208, 256, 34)
        );
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(c.sliding_rope, Some((1e4, RopeScaling::Default)));
        assert_eq!(c.sliding_window, Some(1024));
        let full: Vec<usize> = (0..34).filter(|&l| !c.sliding_layers[l]).collect();
        assert_eq!(full, [5, 11, 17, 23, 29]);
        assert_eq!(c.attn_scale, Some(1.0 / 16.0));
        assert!(c.tie_word_embeddings);

        // llava-1.5's text_config: only what differs from LlamaConfig; no num_key_value_heads (= heads).
        let llava = serde_json::json!({
            "model_type": "llava", "tie_word_embeddings": false,
            "text_config": {"model_type": "llama", "rms_norm_eps": 1e-5, "vocab_size": 32064}
        });
        let c = ModelConfig::from_json(&llava, p).unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (4096, 11008, 32)
        );
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (32, 32));
        assert_eq!((c.vocab_size, c.rms_norm_eps), (32064, 1e-5));
        assert!(!c.tie_word_embeddings);

        // Mistral 3 without the text model_type: mistral, and MistralConfig's 8 key/value heads.
        let mistral3 =
            serde_json::json!({"model_type": "mistral3", "text_config": {"head_dim": 128}});
        let c = ModelConfig::from_json(&mistral3, p).unwrap();
        assert_eq!(c.model_type, "mistral");
        assert_eq!((c.num_key_value_heads, c.intermediate_size), (8, 14336));

        // Another decoder inside llava states its own sizes: the llama defaults do not apply to it.
        let mut other = llava.clone();
        other["text_config"] = serde_json::json!({"model_type": "mistral", "vocab_size": 32064});
        let e = ModelConfig::from_json(&other, p).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");

        let no_text = serde_json::json!({"model_type": "gemma3"});
        let e = ModelConfig::from_json(&no_text, p).unwrap_err().to_string();
        assert!(e.contains("no 'text_config'"), "{e}");
        let nested = serde_json::json!({"model_type": "llava", "text_config": gemma3});
        let e = ModelConfig::from_json(&nested, p).unwrap_err().to_string();
        assert!(e.contains("itself a vision-language"), "{e}");
        let e = ModelConfig::from_json(&serde_json::json!({"model_type": "idefics3"}), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vision-language: gemma3, mistral3, llava, qwen2_vl, qwen2_5_vl, qwen3_vl"),
            "{e}"
        );

        // Qwen2.5-VL-7B's flat 4.x config: the text fields at the top level, M-RoPE.
        let flat = serde_json::json!({
            "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
            "use_sliding_window": false, "max_window_layers": 28, "vocab_size": 152064,
            "tie_word_embeddings": false,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_size": 1280, "model_type": "qwen2_5_vl"}
        });
        let c = ModelConfig::from_json(&flat, p).unwrap();
        assert_eq!(c.multimodal.as_deref(), Some("qwen2_5_vl"));
        assert_eq!((c.model_type.as_str(), c.num_hidden_layers), ("qwen2", 28));
        assert_eq!(
            (c.rope_scaling.clone(), c.rope_theta),
            (RopeScaling::Default, 1e6)
        );
        assert!(c.qkv_bias && !c.o_bias && c.sliding_window.is_none());
        // 5.x: nested, the text class's own model_type and defaults (eps 1e-5, not Qwen2Config's 1e-6).
        let nested = serde_json::json!({
            "model_type": "qwen2_5_vl",
            "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 160,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                    "rope_theta": 10000.0}}
        });
        let c = ModelConfig::from_json(&nested, p).unwrap();
        assert_eq!((c.model_type.as_str(), c.rms_norm_eps), ("qwen2", 1e-5));
        let qwen3_vl = serde_json::json!({
            "model_type": "qwen3_vl", "text_config": {"model_type": "qwen3_vl_text"}
        });
        let c = ModelConfig::from_json(&qwen3_vl, p).unwrap();
        assert_eq!(
            (c.model_type.as_str(), c.qk_norm),
            ("qwen3", QkNorm::PerHead)
        );
        assert_eq!((c.head_dim, c.rope_theta), (128, 500000.0));
    }

    /// GPT-NeoX in both config generations: Pythia's 4.x names (`rotary_pct`, `rotary_emb_base`,
    /// `layer_norm_eps`) and 5.x's `rope_parameters`; the class defaults (a quarter of each head rotated,
    /// biases, the parallel residual); no padding row.
    #[test]
    fn gpt_neox_configs() {
        let p = Path::new("config.json");
        let pythia = serde_json::json!({
            "model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 512, "intermediate_size": 2048,
            "num_hidden_layers": 6, "num_attention_heads": 8, "rotary_pct": 0.25,
            "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "use_parallel_residual": true,
            "hidden_act": "gelu", "tie_word_embeddings": false, "pad_token_id": 1
        });
        let c = ModelConfig::from_json(&pythia, p).unwrap();
        assert_eq!(
            c.layout,
            BlockLayout::NeoX {
                parallel_residual: true
            }
        );
        assert_eq!(
            (c.head_dim, c.rotary_dim, c.num_key_value_heads),
            (64, 16, 8)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-5));
        assert_eq!(c.activation, Activation::Gelu);
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias && !c.tie_word_embeddings);
        assert_eq!(c.pad_token_id, None);
        // Omitted: rotary_pct 0.25, the parallel residual, biases.
        let mut bare = pythia.clone();
        for k in [
            "rotary_pct",
            "use_parallel_residual",
            "hidden_act",
            "layer_norm_eps",
        ] {
            bare.as_object_mut().unwrap().remove(k);
        }
        let c = ModelConfig::from_json(&bare, p).unwrap();
        assert_eq!(c.rotary_dim, 16);
        assert!(matches!(
            c.layout,
            BlockLayout::NeoX {
                parallel_residual: true
            }
        ));
        // 5.x: rope_parameters with the partial factor.
        let mut v5 = pythia.clone();
        let o = v5.as_object_mut().unwrap();
        o.remove("rotary_pct");
        o.remove("rotary_emb_base");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
        );
        o.insert("use_parallel_residual".into(), false.into());
        o.insert("hidden_act".into(), "gelu_new".into());
        let c = ModelConfig::from_json(&v5, p).unwrap();
        assert_eq!((c.rope_theta, c.rotary_dim), (500.0, 32));
        assert_eq!(
            c.layout,
            BlockLayout::NeoX {
                parallel_residual: false
            }
        );
        assert_eq!(c.activation, Activation::GeluTanh);
        let mut relu = pythia.clone();
        relu["hidden_act"] = "relu".into();
        let e = ModelConfig::from_json(&relu, p).unwrap_err().to_string();
        assert!(
            e.contains("hidden_act 'relu'") && e.contains("gpt_neox, phi: gelu"),
            "{e}"
        );
        // The LLaMA family keeps its layout and refuses a partial rotary.
        let mut llama = base();
        assert_eq!(
            ModelConfig::from_json(&llama, p).unwrap().layout,
            BlockLayout::Llama
        );
        llama["partial_rotary_factor"] = 0.5.into();
        assert!(ModelConfig::from_json(&llama, p).is_err());
    }

    /// Granite's multipliers: class defaults 1 (then no extra op), the attention's replacing
    /// 1/√head_dim, the logits' stored as 1 / logits_scaling; a non-positive one refused.
    #[test]
    fn granite_multipliers() {
        let p = Path::new("config.json");
        let mut v = base();
        v["model_type"] = "granite".into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!((c.embed_scale, c.attn_scale), (1.0, Some(1.0)));
        assert_eq!((c.residual_scale, c.logits_scale), (None, None));
        v["embedding_multiplier"] = 12.0.into();
        v["attention_multiplier"] = 0.0078125.into();
        v["residual_multiplier"] = 0.22.into();
        v["logits_scaling"] = 16.0.into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!((c.embed_scale, c.attn_scale), (12.0, Some(0.0078125)));
        assert_eq!(
            (c.residual_scale, c.logits_scale),
            (Some(0.22), Some(0.0625))
        );
        v["logits_scaling"] = 0.0.into();
        let e = ModelConfig::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("'logits_scaling' is 0"), "{e}");
        // The LLaMA family ignores the fields.
        v["model_type"] = "llama".into();
        let c = ModelConfig::from_json(&v, p).unwrap();
        assert_eq!(
            (c.embed_scale, c.attn_scale, c.logits_scale),
            (1.0, None, None)
        );
    }

    /// Phi-2's config: LayerNorm eps, half the head rotated by default (0.4 stated), biases everywhere
    /// and on the lm_head, one shared norm; q/k LayerNorms refused by name.
    #[test]
    fn phi_configs() {
        let p = Path::new("config.json");
        let phi2 = serde_json::json!({
            "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 32, "num_attention_heads": 32, "layer_norm_eps": 1e-5,
            "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "hidden_act": "gelu_new",
            "qk_layernorm": false, "tie_word_embeddings": false
        });
        let c = ModelConfig::from_json(&phi2, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::Phi, BlockNorms::Shared)
        );
        assert_eq!((c.head_dim, c.rotary_dim, c.rms_norm_eps), (80, 32, 1e-5));
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias && c.lm_head_bias);
        assert_eq!(c.activation, Activation::GeluTanh);
        let mut bare = phi2.clone();
        bare.as_object_mut()
            .unwrap()
            .remove("partial_rotary_factor");
        assert_eq!(ModelConfig::from_json(&bare, p).unwrap().rotary_dim, 40);
        let mut qk = phi2.clone();
        qk["qk_layernorm"] = true.into();
        let e = ModelConfig::from_json(&qk, p).unwrap_err().to_string();
        assert!(e.contains("qk_layernorm"), "{e}");
    }

    /// StableLM 2 1.6B's hub config (4.x): LayerNorms, q/k/v biases, a quarter of each head rotary (the
    /// class default too); the parallel residual is Phi's shared norm; 12B's q/k LayerNorms, one per
    /// head. SmolLM3 3B's and OLMo 3 7B's hub configs read with their layer patterns.
    #[test]
    fn stablelm_smollm3_and_olmo3_hub_configs() {
        let p = Path::new("config.json");
        let stablelm2 = serde_json::json!({
            "model_type": "stablelm", "vocab_size": 100352, "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32,
            "num_key_value_heads": 32, "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.25,
            "rope_theta": 10000, "use_qkv_bias": true, "qk_layernorm": false,
            "use_parallel_residual": false, "tie_word_embeddings": false, "hidden_act": "silu"
        });
        let c = ModelConfig::from_json(&stablelm2, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::StableLm, BlockNorms::Pre)
        );
        assert_eq!((c.head_dim, c.rotary_dim, c.rms_norm_eps), (64, 16, 1e-5));
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias && c.layout.layer_norm());
        let mut bare = stablelm2.clone();
        bare.as_object_mut()
            .unwrap()
            .remove("partial_rotary_factor");
        assert_eq!(ModelConfig::from_json(&bare, p).unwrap().rotary_dim, 16);
        let mut parallel = stablelm2.clone();
        parallel["use_parallel_residual"] = true.into();
        let c = ModelConfig::from_json(&parallel, p).unwrap();
        assert_eq!(c.block_norms, BlockNorms::Shared);
        assert_eq!(c.qk_norm, QkNorm::Off);
        let twelve_b = serde_json::json!({
            "model_type": "stablelm", "vocab_size": 100352, "hidden_size": 5120,
            "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 8, "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.25,
            "rope_theta": 10000, "use_qkv_bias": false, "qk_layernorm": true,
            "use_parallel_residual": true, "tie_word_embeddings": false, "hidden_act": "silu"
        });
        let c = ModelConfig::from_json(&twelve_b, p).unwrap();
        assert_eq!(
            (c.block_norms, c.qk_norm, c.qk_norm_rows()),
            (
                BlockNorms::Shared,
                QkNorm::HeadWeights,
                Some([(160, 32), (160, 8)])
            )
        );

        // SmolLM3-3B: every 4th layer NoPE, no window, tied, θ 5·10⁶.
        let mut smollm3 = serde_json::json!({
            "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048,
            "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 4, "rope_theta": 5000000.0, "use_sliding_window": false,
            "sliding_window": null, "pad_token_id": 128004
        });
        let c = ModelConfig::from_json(&smollm3, p).unwrap();
        let nope: Vec<usize> = (0..36).filter(|&l| !c.rotary_layers[l]).collect();
        assert_eq!(nope, (3..36).step_by(4).collect::<Vec<_>>());
        assert!(c.tie_word_embeddings && c.sliding_layers.iter().all(|s| !s));
        smollm3["no_rope_layers"] = serde_json::json!([1, 0]);
        let e = ModelConfig::from_json(&smollm3, p).unwrap_err().to_string();
        assert!(
            e.contains("no_rope_layers") && e.contains("36 entries"),
            "{e}"
        );

        // Olmo-3-7B (4.x): every 4th layer full attention, YaRN there only, θ 5·10⁵ on both kinds.
        let olmo3 = serde_json::json!({
            "model_type": "olmo3", "vocab_size": 100278, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "rope_theta": 500000, "sliding_window": 4096,
            "max_position_embeddings": 65536, "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                "original_max_position_embeddings": 8192, "attention_factor": 1.2079441541679836,
                "beta_fast": 32, "beta_slow": 1}
        });
        let c = ModelConfig::from_json(&olmo3, p).unwrap();
        let full: Vec<usize> = (0..32).filter(|&l| c.layer_window(l).is_none()).collect();
        assert_eq!(full, (3..32).step_by(4).collect::<Vec<_>>());
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn { factor: 8.0, attention_factor, .. } if attention_factor == 1.2079441541679836
        ));
        assert_eq!(c.sliding_rope, Some((500000.0, RopeScaling::Default)));
        assert_eq!(
            (c.qk_norm, c.block_norms, c.pad_token_id),
            (QkNorm::Whole, BlockNorms::Post, Some(1))
        );
    }

    /// Aya Expanse 8B's hub config (cohere): interleaved rotary, the shared norm, logit_scale, tied and
    /// pad 0 by default; Command R+'s (104B) q/k LayerNorms with weights per head. Command R7B's (cohere2):
    /// every 4th layer full attention without rotary (the class's pattern), the others windowed.
    #[test]
    fn cohere_hub_configs() {
        let p = Path::new("config.json");
        let aya = serde_json::json!({
            "model_type": "cohere", "vocab_size": 256000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "layer_norm_eps": 1e-5, "logit_scale": 0.125,
            "rope_theta": 10000, "use_qk_norm": false, "attention_bias": false
        });
        let c = ModelConfig::from_json(&aya, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms, c.rope_pairs),
            (
                BlockLayout::Cohere,
                BlockNorms::Shared,
                RopePairs::Interleaved
            )
        );
        assert!(c.layout.layer_norm() && !c.layout.norm_bias());
        assert_eq!(
            (c.logits_scale, c.tie_word_embeddings, c.pad_token_id),
            (Some(0.125), true, Some(0))
        );
        assert_eq!((c.qk_norm, c.qk_norm_rows()), (QkNorm::Off, None));
        let plus = serde_json::json!({
            "model_type": "cohere", "vocab_size": 256000, "hidden_size": 12288,
            "intermediate_size": 33792, "num_hidden_layers": 64, "num_attention_heads": 96,
            "num_key_value_heads": 8, "layer_norm_eps": 1e-5, "logit_scale": 0.8333333333333334,
            "rope_theta": 75000000.0, "use_qk_norm": true, "attention_bias": false
        });
        let c = ModelConfig::from_json(&plus, p).unwrap();
        assert_eq!(
            (c.qk_norm, c.qk_norm_rows()),
            (QkNorm::HeadWeights, Some([(128, 96), (128, 8)]))
        );
        let r7b = serde_json::json!({
            "model_type": "cohere2", "vocab_size": 256000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "sliding_window": 4096, "rope_theta": 50000
        });
        let c = ModelConfig::from_json(&r7b, p).unwrap();
        let full: Vec<usize> = (0..32).filter(|&l| c.layer_window(l).is_none()).collect();
        assert_eq!(full, (3..32).step_by(4).collect::<Vec<_>>());
        assert_eq!(c.rotary_layers, c.sliding_layers);
        assert_eq!(c.logits_scale, Some(0.0625));
    }

    /// InternLM2.5-7B's hub config (remote code: `bias` on wqkv and wo, true by default; 4.x dynamic
    /// NTK; pad 2) and the class defaults.
    #[test]
    fn internlm2_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": false,
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "pad_token_id": 2, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000,
            "tie_word_embeddings": false, "vocab_size": 92544
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(c.layout, BlockLayout::InternLm2);
        assert_eq!((c.head_dim, c.pad_token_id), (128, Some(2)));
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Dynamic {
                factor: 2.0,
                max_position_embeddings: 32768
            }
        );
        let mut defaults = hub.clone();
        let o = defaults.as_object_mut().unwrap();
        for key in ["bias", "pad_token_id", "rms_norm_eps"] {
            o.remove(key);
        }
        let c = ModelConfig::from_json(&defaults, p).unwrap();
        assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
        assert_eq!((c.pad_token_id, c.rms_norm_eps), (Some(0), 1e-6));
    }

    /// InternLM3-8B's hub config (`qkv_bias` / `bias` names, head_dim 128, dynamic NTK); GLM-4-9B's
    /// (glm: interleaved half-head rotary, q/k/v biases by default, fused gate/up) and GLM-4-0414's
    /// (glm4: its sandwich norms); EXAONE 4.0 32B's (a "LLLG" pattern with `layer_types`, rotary on the
    /// windowed layers only), and the same pattern without `layer_types` refused.
    #[test]
    fn internlm3_glm_and_exaone4_hub_configs() {
        let p = Path::new("config.json");
        let internlm3 = serde_json::json!({
            "model_type": "internlm3", "vocab_size": 128512, "hidden_size": 4096,
            "intermediate_size": 10240, "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 2, "qkv_bias": false, "bias": false, "rms_norm_eps": 1e-5,
            "rope_theta": 50000000, "max_position_embeddings": 32768,
            "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"}
        });
        let c = ModelConfig::from_json(&internlm3, p).unwrap();
        assert_eq!((c.head_dim, c.pad_token_id), (128, Some(2)));
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Dynamic {
                factor: 6.0,
                max_position_embeddings: 32768
            }
        );
        let mut biased = internlm3.clone();
        (biased["qkv_bias"], biased["bias"]) = (true.into(), true.into());
        let c = ModelConfig::from_json(&biased, p).unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);

        let glm = serde_json::json!({
            "model_type": "glm", "vocab_size": 151552, "hidden_size": 4096,
            "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 2, "head_dim": 128, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5, "pad_token_id": 151329
        });
        let c = ModelConfig::from_json(&glm, p).unwrap();
        assert_eq!(
            (c.rotary_dim, c.rope_pairs, c.rms_norm_eps),
            (64, RopePairs::Interleaved, 1.5625e-7)
        );
        assert!(c.qkv_bias && !c.o_bias && c.fused_gate_up && !c.fused_qkv);
        let mut glm4 = glm.clone();
        glm4["model_type"] = "glm4".into();
        glm4.as_object_mut()
            .unwrap()
            .remove("partial_rotary_factor");
        let c = ModelConfig::from_json(&glm4, p).unwrap();
        assert_eq!((c.block_norms, c.rotary_dim), (BlockNorms::Glm4, 64));

        let lllg: Vec<&str> = (0..8)
            .map(|l| match (l + 1) % 4 {
                0 => "full_attention",
                _ => "sliding_attention",
            })
            .collect();
        let mut exaone4 = serde_json::json!({
            "model_type": "exaone4", "vocab_size": 102400, "hidden_size": 5120,
            "intermediate_size": 27392, "num_hidden_layers": 8, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "sliding_window": 4096,
            "sliding_window_pattern": "LLLG", "layer_types": lllg, "rope_theta": 1000000.0
        });
        let c = ModelConfig::from_json(&exaone4, p).unwrap();
        assert_eq!(c.rotary_layers, c.sliding_layers);
        assert_eq!(c.sliding_layers.iter().filter(|&&s| !s).count(), 2);
        assert_eq!(
            (c.qk_norm, c.block_norms),
            (QkNorm::PerHead, BlockNorms::Post)
        );
        // Without a window every layer is full attention and rotated.
        let mut unwindowed = exaone4.clone();
        unwindowed["sliding_window"] = serde_json::Value::Null;
        unwindowed.as_object_mut().unwrap().remove("layer_types");
        let c = ModelConfig::from_json(&unwindowed, p).unwrap();
        assert!(c.rotary_layers.iter().all(|&r| r) && c.sliding_layers.iter().all(|&s| !s));
        exaone4.as_object_mut().unwrap().remove("layer_types");
        let e = ModelConfig::from_json(&exaone4, p).unwrap_err().to_string();
        assert!(e.contains("LLLG") && e.contains("layer_types"), "{e}");
    }

    /// Falcon's hub configs: 7B (multi-query, one shared norm), 40B (the new architecture: 8 key/value
    /// groups, ln_attn / ln_mlp), Falcon 2 11B (new architecture on one norm), Falcon-RW (ALiBi); a block
    /// Falcon has not is refused by name.
    #[test]
    fn falcon_hub_configs() {
        let p = Path::new("config.json");
        let f7b = serde_json::json!({
            "model_type": "falcon", "alibi": false, "bias": false, "hidden_size": 4544,
            "layer_norm_epsilon": 1e-5, "multi_query": true, "new_decoder_architecture": false,
            "num_attention_heads": 71, "num_hidden_layers": 32, "parallel_attn": true,
            "vocab_size": 65024
        });
        let c = ModelConfig::from_json(&f7b, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::Falcon { ln_pair: false }, BlockNorms::Shared)
        );
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.intermediate_size),
            (1, 64, 4 * 4544)
        );
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.mlp_bias);
        assert_eq!(c.activation, Activation::Gelu);
        let f40b = serde_json::json!({
            "model_type": "falcon", "alibi": false, "bias": false, "hidden_size": 8192,
            "new_decoder_architecture": true, "num_attention_heads": 128, "num_kv_heads": 8,
            "num_hidden_layers": 60, "parallel_attn": true, "vocab_size": 65024
        });
        let c = ModelConfig::from_json(&f40b, p).unwrap();
        assert_eq!(c.layout, BlockLayout::Falcon { ln_pair: true });
        assert_eq!(
            c.layout.norm_names(c.block_norms)[..2],
            [Some("ln_attn"), Some("ln_mlp")]
        );
        assert_eq!((c.num_key_value_heads, c.head_dim), (8, 64));
        let mut f11b = f40b.clone();
        f11b["num_ln_in_parallel_attn"] = 1.into();
        let c = ModelConfig::from_json(&f11b, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::Falcon { ln_pair: false }, BlockNorms::Shared)
        );
        f11b["parallel_attn"] = false.into();
        let e = ModelConfig::from_json(&f11b, p).unwrap_err().to_string();
        assert!(e.contains("num_ln_in_parallel_attn"), "{e}");
        // Falcon-RW-1B: ALiBi (its slopes scaled as Falcon scales the scores), no rotary embedding.
        let rw = serde_json::json!({
            "model_type": "falcon", "alibi": true, "bias": true, "hidden_size": 2048,
            "multi_query": false, "new_decoder_architecture": false, "num_attention_heads": 32,
            "num_hidden_layers": 24, "parallel_attn": false, "vocab_size": 50304
        });
        let c = ModelConfig::from_json(&rw, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim), (32, 64));
        assert_eq!(
            c.alibi,
            Some(Alibi {
                max_bias: 8.0,
                factor: 0.125
            })
        );
        assert!(c.rotary_layers.iter().all(|&r| !r));
        assert!(ModelConfig::from_json(&f7b, p).unwrap().alibi.is_none());
    }

    /// bigscience/bloom-560m's hub config: Falcon's oldest block with ALiBi (unscaled slopes), the tanh
    /// GELU, a LayerNorm on the embeddings, no padding row, tied; residuals after the norms refused.
    #[test]
    fn bloom_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "apply_residual_connection_post_layernorm": false, "architectures": ["BloomForCausalLM"],
            "attention_dropout": 0.0, "attention_softmax_in_fp32": true, "bos_token_id": 1,
            "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024, "layer_norm_epsilon": 1e-05,
            "model_type": "bloom", "n_head": 16, "n_inner": null, "n_layer": 24, "offset_alibi": 100,
            "pad_token_id": 3, "pretraining_tp": 1, "slow_but_exact": false, "vocab_size": 250880
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::Falcon { ln_pair: false }, BlockNorms::Pre)
        );
        assert_eq!(
            (
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads
            ),
            (24, 16, 16)
        );
        assert_eq!((c.head_dim, c.intermediate_size), (64, 4096));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(
            c.alibi,
            Some(Alibi {
                max_bias: 8.0,
                factor: 1.0
            })
        );
        assert!(c.embed_norm && c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
        assert_eq!((c.pad_token_id, c.rms_norm_eps), (None, 1e-5));
        assert!(c.rotary_layers.iter().all(|&r| !r));
        let mut post = hub.clone();
        post["apply_residual_connection_post_layernorm"] = true.into();
        let e = ModelConfig::from_json(&post, p).unwrap_err().to_string();
        assert!(
            e.contains("apply_residual_connection_post_layernorm"),
            "{e}"
        );
    }

    /// EleutherAI/gpt-j-6b's hub config: `n_*` names, rotary_dim 64 of 256 on interleaved pairs, one
    /// shared LayerNorm, biases on the MLP and the lm_head only, untied; `rotary_dim` null rotates all.
    #[test]
    fn gptj_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"],
            "bos_token_id": 50256, "eos_token_id": 50256, "layer_norm_epsilon": 1e-05,
            "model_type": "gptj", "n_embd": 4096, "n_head": 16, "n_inner": null, "n_layer": 28,
            "n_positions": 2048, "rotary": true, "rotary_dim": 64, "scale_attn_weights": true,
            "tie_word_embeddings": false, "vocab_size": 50400
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::GptJ, BlockNorms::Shared)
        );
        assert_eq!(
            (c.num_hidden_layers, c.head_dim, c.intermediate_size),
            (28, 256, 16384)
        );
        assert_eq!((c.rotary_dim, c.rope_pairs), (64, RopePairs::Interleaved));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(!c.qkv_bias && !c.o_bias && c.mlp_bias && c.lm_head_bias);
        assert!(!c.tie_word_embeddings && c.pad_token_id.is_none());
        let mut full = hub.clone();
        full["rotary_dim"] = serde_json::Value::Null;
        assert_eq!(ModelConfig::from_json(&full, p).unwrap().rotary_dim, 256);
    }

    /// Salesforce/codegen-350M-mono's hub config: GPT-J's names and block, q/k/v in 4 shards of
    /// q, v, k; an n_embd that does not split into the 4 shards refused.
    #[test]
    fn codegen_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "activation_function": "gelu_new", "architectures": ["CodeGenForCausalLM"],
            "bos_token_id": 1, "eos_token_id": 50256, "layer_norm_epsilon": 1e-05,
            "model_type": "codegen", "n_ctx": 2048, "n_embd": 1024, "n_head": 16, "n_inner": null,
            "n_layer": 20, "n_positions": 2048, "rotary_dim": 32, "scale_attn_weights": true,
            "tie_word_embeddings": false, "vocab_size": 51200
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::CodeGen, BlockNorms::Shared)
        );
        assert_eq!(
            (c.num_hidden_layers, c.head_dim, c.intermediate_size),
            (20, 64, 4096)
        );
        assert_eq!((c.rotary_dim, c.rope_pairs), (32, RopePairs::Interleaved));
        assert_eq!(c.layout.grouped_qkv(), Some("attn.qkv_proj"));
        assert_eq!(c.layout.qkv_groups(16), (4, [0, 2, 1]));
        assert!(!c.qkv_bias && !c.o_bias && c.mlp_bias && c.lm_head_bias);
        assert!(!c.tie_word_embeddings && c.pad_token_id.is_none());
        let mut odd = hub.clone();
        (odd["n_embd"], odd["n_head"]) = (1026.into(), 19.into());
        let e = ModelConfig::from_json(&odd, p).unwrap_err().to_string();
        assert!(e.contains("multiple of 4"), "{e}");
    }

    /// mosaicml/mpt-7b's hub config (`d_model`, `n_heads`, `n_layers`, `attn_config`), clip_qkv and a
    /// softmax_scale read from attn_config; what transformers does not run refused by name.
    #[test]
    fn mpt_hub_config() {
        let p = Path::new("config.json");
        let hub = serde_json::json!({
            "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096,
            "expansion_ratio": 4, "max_seq_len": 2048, "n_heads": 32, "n_layers": 32,
            "no_bias": true, "norm_type": "low_precision_layernorm", "vocab_size": 50432,
            "logit_scale": null, "learned_pos_emb": true,
            "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch",
                            "attn_pdrop": 0, "attn_type": "multihead_attention", "clip_qkv": null,
                            "prefix_lm": false, "qk_ln": false, "softmax_scale": null}
        });
        let c = ModelConfig::from_json(&hub, p).unwrap();
        assert_eq!(
            (c.layout, c.block_norms),
            (BlockLayout::Mpt, BlockNorms::Pre)
        );
        assert_eq!((c.num_hidden_layers, c.num_key_value_heads), (32, 32));
        assert_eq!((c.head_dim, c.intermediate_size), (128, 16384));
        assert!(c.fused_qkv && c.tie_word_embeddings && !c.qkv_bias && !c.mlp_bias);
        assert!(!c.layout.norm_bias());
        assert_eq!(c.activation, Activation::Gelu);
        assert_eq!(
            (c.clip_qkv, c.attn_scale, c.pad_token_id),
            (None, None, None)
        );
        assert_eq!(c.alibi.map(|a| a.max_bias), Some(8.0));
        let mut tuned = hub.clone();
        tuned["attn_config"]["clip_qkv"] = 6.into();
        tuned["attn_config"]["softmax_scale"] = 0.125.into();
        let c = ModelConfig::from_json(&tuned, p).unwrap();
        assert_eq!((c.clip_qkv, c.attn_scale), (Some(6.0), Some(0.125)));
        for (key, value, want) in [
            ("qk_ln", true.into(), "qk_ln"),
            ("prefix_lm", true.into(), "prefix_lm"),
            ("alibi", false.into(), "alibi is false"),
            ("alibi_bias_max", 16.into(), "alibi_bias_max is 16"),
        ] {
            let mut bad = hub.clone();
            bad["attn_config"][key] = value;
            let e = ModelConfig::from_json(&bad, p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("not supported"), "{e}");
        }
        let mut biased = hub.clone();
        biased["no_bias"] = false.into();
        let e = ModelConfig::from_json(&biased, p).unwrap_err().to_string();
        assert!(e.contains("no_bias"), "{e}");
    }

    /// ERNIE-4.5-0.3B's and Helium-1-2B's hub configs (interleaved rotary pairs) and Seed-OSS-36B's,
    /// with their class defaults: head_dim 128; ERNIE tied, pad 0, `use_bias` on every projection;
    /// Helium eps 1e-8, pad 3, no o_proj bias; Seed-OSS q/k/v biases, pad 1.
    #[test]
    fn ernie4_5_helium_and_seed_oss_hub_configs() {
        let p = Path::new("config.json");
        let mut ernie = serde_json::json!({
            "model_type": "ernie4_5", "vocab_size": 103424, "hidden_size": 1024,
            "intermediate_size": 3072, "num_hidden_layers": 18, "num_attention_heads": 16,
            "num_key_value_heads": 2, "rope_theta": 500000, "use_bias": false
        });
        let c = ModelConfig::from_json(&ernie, p).unwrap();
        assert_eq!(
            (
                c.head_dim,
                c.rope_pairs,
                c.pad_token_id,
                c.tie_word_embeddings
            ),
            (128, RopePairs::Interleaved, Some(0), true)
        );
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
        ernie["use_bias"] = true.into();
        let c = ModelConfig::from_json(&ernie, p).unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        let helium = serde_json::json!({
            "model_type": "helium", "vocab_size": 48000, "hidden_size": 2560,
            "intermediate_size": 7040, "num_hidden_layers": 24, "num_attention_heads": 20,
            "num_key_value_heads": 20, "rope_theta": 100000.0, "attention_bias": true
        });
        let c = ModelConfig::from_json(&helium, p).unwrap();
        assert_eq!(
            (c.rms_norm_eps, c.pad_token_id, c.rope_pairs),
            (1e-8, Some(3), RopePairs::Interleaved)
        );
        assert!(c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
        // Seed-OSS-36B: q/k/v biases by default, o_proj's by attention_out_bias.
        let mut seed = serde_json::json!({
            "model_type": "seed_oss", "vocab_size": 155136, "hidden_size": 5120,
            "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 80,
            "num_key_value_heads": 8, "rope_theta": 10000000.0
        });
        let c = ModelConfig::from_json(&seed, p).unwrap();
        assert_eq!((c.head_dim, c.pad_token_id), (128, Some(1)));
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
        seed["attention_out_bias"] = true.into();
        assert!(ModelConfig::from_json(&seed, p).unwrap().o_bias);
    }

    /// Arcee AFM-4.5B's config: the plain ReLU² MLP with LLaMA's RMSNorms.
    #[test]
    fn arcee_hub_config() {
        let p = Path::new("config.json");
        let afm = serde_json::json!({
            "model_type": "arcee", "vocab_size": 128004, "hidden_size": 2560,
            "intermediate_size": 18432, "num_hidden_layers": 36, "num_attention_heads": 20,
            "num_key_value_heads": 4, "hidden_act": "relu2", "rope_theta": 10000.0
        });
        let c = ModelConfig::from_json(&afm, p).unwrap();
        assert_eq!(
            (c.layout, c.activation),
            (BlockLayout::Arcee, Activation::Relu2)
        );
        assert_eq!(c.layout.plain_mlp(), Some(("mlp.up_proj", "mlp.down_proj")));
        assert!(!c.layout.layer_norm() && c.rms_norm_eps == 1e-5);
    }

    /// OLMo-7B-0424-hf's config: LayerNorms without parameters (eps 1e-5 whatever the config says,
    /// gain 1), clip_qkv 8; pad 1 by default.
    #[test]
    fn olmo_hub_config() {
        let p = Path::new("config.json");
        let mut olmo = serde_json::json!({
            "model_type": "olmo", "vocab_size": 50304, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "clip_qkv": 8.0, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-3, "attention_bias": false
        });
        let c = ModelConfig::from_json(&olmo, p).unwrap();
        assert_eq!(c.layout, BlockLayout::Olmo);
        assert!(c.layout.layer_norm() && !c.layout.norm_weight() && !c.layout.norm_bias());
        assert_eq!(
            (c.rms_norm_eps, c.norm_offset, c.clip_qkv, c.pad_token_id),
            (1e-5, 1.0, Some(8.0), Some(1))
        );
        olmo["clip_qkv"] = 0.into();
        let e = ModelConfig::from_json(&olmo, p).unwrap_err().to_string();
        assert!(e.contains("clip_qkv"), "{e}");
    }

    /// StarCoder2's config: `norm_epsilon`, `use_bias` on every projection, tied and unwindowed by
    /// default, a window on every layer when stated.
    #[test]
    fn starcoder2_configs() {
        let p = Path::new("config.json");
        let sc2 = serde_json::json!({
            "model_type": "starcoder2", "vocab_size": 49152, "hidden_size": 3072,
            "intermediate_size": 12288, "num_hidden_layers": 30, "num_attention_heads": 24,
            "num_key_value_heads": 2, "norm_epsilon": 1e-5, "sliding_window": 4096,
            "rope_theta": 999999.4420358813, "hidden_act": "gelu_pytorch_tanh"
        });
        let c = ModelConfig::from_json(&sc2, p).unwrap();
        assert_eq!((c.layout, c.rms_norm_eps), (BlockLayout::Starcoder2, 1e-5));
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias && c.tie_word_embeddings);
        assert_eq!(c.sliding_layers, vec![true; 30]);
        assert_eq!(c.activation, Activation::GeluTanh);
        let mut plain = sc2.clone();
        let o = plain.as_object_mut().unwrap();
        o.remove("sliding_window");
        o.insert("use_bias".into(), false.into());
        let c = ModelConfig::from_json(&plain, p).unwrap();
        assert!(c.sliding_window.is_none() && !c.qkv_bias && !c.mlp_bias);
    }
}
