//! `sglp-engine info`: the inputs' layers, shapes and dtypes (activation files, or a checkpoint and its
//! calibration tokens), and the compute devices of this machine. Every flag it takes is used; one that
//! does not apply to the input given is refused.

use super::common::{TextCut, TokenArgs};
use crate::error::{Error, Result};
use crate::io::{ActivationSet, ActivationSource, ReadOptions, TokenMode};
use crate::pruning::compare::ParamCounts;
use crate::pruning::prune::param_counts;
use crate::runtime::config::{
    BlockLayout, BlockNorms, ModelConfig, MoeRouter, OutputGate, QkNorm, RopeScaling,
};
use crate::runtime::ops::{Activation, RopePairs};
use crate::runtime::Model;
use crate::similarity::device::describe_devices;
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Activation file (`.safetensors` or a directory of `.npy`); repeat for shards.
    #[arg(long = "input", short = 'i', conflicts_with = "model")]
    pub inputs: Vec<PathBuf>,
    /// With --input: keep only the layers whose name matches this regular expression.
    #[arg(long)]
    pub layers: Option<regex::Regex>,
    /// With --input: how 3-D tensors become matrices (changes the sample count shown).
    #[arg(long, value_enum)]
    pub token_mode: Option<TokenMode>,
    /// A Hugging Face checkpoint directory: its architecture and decoder layers.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub cut: TextCut,
}

/// A value as it is typed on the command line (`samples`, not `Samples`).
fn typed<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

pub fn run(a: InfoArgs) -> Result<()> {
    if a.model.is_none() {
        let flag = [
            (a.tokens.tokens.is_some(), "--tokens"),
            (a.tokens.text.is_some(), "--text"),
        ]
        .into_iter()
        .find_map(|(given, f)| given.then_some(f));
        if let Some(f) = flag {
            return Err(Error::invalid(format!(
                "{f} applies to --model (a checkpoint's calibration tokens)"
            )));
        }
        a.cut.check_used(false)?;
    }
    if a.inputs.is_empty() {
        if a.layers.is_some() || a.token_mode.is_some() {
            return Err(Error::invalid(
                "--layers and --token-mode apply to activation files (--input)",
            ));
        }
    } else {
        describe_activations(&a)?;
    }
    if let Some(dir) = &a.model {
        describe_model(dir, &a)?;
    }
    println!("devices:");
    for d in describe_devices() {
        println!("  {d}");
    }
    Ok(())
}

fn describe_activations(a: &InfoArgs) -> Result<()> {
    let mode = a.token_mode.unwrap_or_default();
    let set = ActivationSet::open(
        &a.inputs,
        &ReadOptions {
            tokens: mode,
            layers: a.layers.clone(),
        },
    )?;
    for shard in set.describe() {
        println!(
            "{} ({}, {} samples)",
            shard.path.display(),
            shard.format,
            shard.rows
        );
    }
    println!(
        "{} layers, {} samples in all (--token-mode {}{})",
        set.layers().len(),
        set.n_samples(),
        typed(&mode),
        a.layers
            .as_ref()
            .map(|r| format!(", --layers {}", r.as_str()))
            .unwrap_or_default()
    );
    println!(
        "  {:<40} {:>5} {:>10}  shape (first shard)",
        "layer", "dtype", "features"
    );
    for m in &set.describe()[0].layers {
        println!(
            "  {:<40} {:>5} {:>10}  {:?}",
            m.name,
            m.dtype.name(),
            m.cols,
            m.shape
        );
    }
    Ok(())
}

/// A decoder block's layout: its norms, its MLP, how the residual stream runs through it.
fn describe_block(c: &ModelConfig) -> String {
    let act = match c.activation {
        _ if c.mlp_xielu => "xIELU (two learned scalars per layer)",
        Activation::Silu => "SiLU",
        Activation::GeluTanh => "tanh-GELU",
        Activation::Gelu => "GELU",
        Activation::Softcap(_) => "soft-cap",
        Activation::Scale(_) => "scale",
        Activation::Sigmoid => "sigmoid",
        Activation::Relu => "ReLU",
        Activation::Relu2 => "ReLU²",
        Activation::Clamp(_) => "clamp",
        Activation::ClampPlusOne(_) => "clamp + 1",
        Activation::OssGate { .. } => "GPT-OSS's clamped SwiGLU",
    };
    match c.layout {
        BlockLayout::Opt => format!(
            "LayerNorms with biases; MLP fc1 → {act} → fc2; learned positions, no rotary embedding"
        ),
        BlockLayout::Gpt2 => format!(
            "LayerNorms with biases; Conv1D projections (read transposed), q/k/v fused; MLP c_fc → \
             {act} → c_proj; learned positions, no rotary embedding"
        ),
        BlockLayout::GptBigCode => format!(
            "LayerNorms with biases; q/k/v fused per key/value group{}; MLP c_fc → {act} → c_proj; \
             learned positions, no rotary embedding",
            match c.num_key_value_heads {
                1 => " (multi-query)",
                _ => "",
            }
        ),
        BlockLayout::GptNeo => format!(
            "LayerNorms with biases; separate q/k/v without biases, unscaled scores; MLP c_fc → {act} \
             → c_proj; learned positions, no rotary embedding"
        ),
        BlockLayout::Starcoder2 => format!(
            "LayerNorms with biases; MLP c_fc → {act} → c_proj; attention and MLP one after the other"
        ),
        BlockLayout::Phi => format!(
            "one LayerNorm (with a bias) shared by the attention and the MLP, in parallel \
             (x + attn(ln x) + mlp(ln x)); MLP fc1 → {act} → fc2; lm_head with a bias"
        ),
        BlockLayout::StableLm if c.block_norms == BlockNorms::Shared => format!(
            "one LayerNorm (with a bias) shared by the attention and the MLP, in parallel \
             (x + attn(ln x) + mlp(ln x)); gated MLP ({act} gate)"
        ),
        BlockLayout::StableLm => format!("2 LayerNorms with biases; gated MLP ({act} gate)"),
        BlockLayout::Arcee => format!("2 RMSNorms; MLP up → {act} → down"),
        BlockLayout::Exaone => format!(
            "2 RMSNorms (ln_1, ln_2); gated MLP c_fc_0/c_fc_1/c_proj ({act} gate); LLaMA's block under \
             EXAONE's names"
        ),
        BlockLayout::Nemotron => format!(
            "2 LayerNorms with biases{}; MLP up → {act} → down",
            if c.norm_offset == 1.0 {
                ", gains 1 + w"
            } else {
                ""
            }
        ),
        BlockLayout::GptJ => format!(
            "one LayerNorm (with a bias) shared by the attention and the MLP, in parallel \
             (x + attn(ln x) + mlp(ln x)); MLP fc_in → {act} → fc_out; lm_head with a bias"
        ),
        BlockLayout::CodeGen => format!(
            "one LayerNorm (with a bias) shared by the attention and the MLP, in parallel \
             (x + attn(ln x) + mlp(ln x)); q/k/v fused in 4 shards (q, v, k each); MLP fc_in → {act} → fc_out; lm_head with a bias"
        ),
        BlockLayout::Mpt => format!(
            "2 LayerNorms without biases; q/k/v stacked in Wqkv{}; MLP up → {act} → down; no biases",
            c.clip_qkv
                .map(|q| format!(", clamped to ±{q}"))
                .unwrap_or_default()
        ),
        BlockLayout::InternLm2 => format!(
            "2 RMSNorms; q/k/v fused per key/value group (wqkv); gated MLP w1/w3/w2 ({act} gate)"
        ),
        BlockLayout::Olmo => format!(
            "2 LayerNorms without parameters; gated MLP ({act} gate){}",
            c.clip_qkv
                .map(|q| format!("; q, k, v clamped to ±{q}"))
                .unwrap_or_default()
        ),
        BlockLayout::Cohere => format!(
            "one LayerNorm (no bias) shared by the attention and the MLP, in parallel \
             (x + attn(ln x) + mlp(ln x)); gated MLP ({act} gate); logits × {}",
            c.logits_scale.unwrap_or(1.0)
        ),
        BlockLayout::Falcon { ln_pair } => format!(
            "LayerNorms with biases; q/k/v fused per key/value group; MLP dense_h_to_4h → {act} → \
             dense_4h_to_h; attention and MLP {}{}",
            match (ln_pair, c.block_norms) {
                (true, _) => "in parallel, each on its own norm (x + attn(ln_attn x) + mlp(ln_mlp x))",
                (false, BlockNorms::Shared) => "in parallel on one norm (x + attn(ln x) + mlp(ln x))",
                _ => "one after the other",
            },
            if c.embed_norm {
                "; a LayerNorm on the embeddings"
            } else {
                ""
            }
        ),
        BlockLayout::NeoX { parallel_residual } => format!(
            "LayerNorms with biases; q/k/v fused per head; MLP up → {act} → down; attention and MLP {}",
            if parallel_residual {
                "in parallel (x + attn(ln₁ x) + mlp(ln₂ x))"
            } else {
                "one after the other"
            }
        ),
        BlockLayout::Llama => {
            let norms = c.block_norms.names().into_iter().flatten().count();
            let mut s = format!(
                "{norms} RMSNorms{}; gated MLP ({act} gate)",
                if c.norm_offset != 0.0 { " (gain 1 + w)" } else { "" }
            );
            // Granite's multipliers (Gemma's √hidden is implied by its type).
            if c.embed_scale != 1.0
                && !(c.model_type.starts_with("gemma") || c.model_type == "vaultgemma")
            {
                s += &format!("; embeddings × {}", c.embed_scale);
            }
            if let Some(r) = c.residual_scale {
                s += &format!("; attention and MLP outputs × {r} before the residual adds");
            }
            if let Some(f) = c.logits_scale {
                s += &format!("; logits × {f}");
            }
            if let Some(m) = &c.moe {
                let sparse = m.sparse_layers.iter().filter(|&&x| x).count();
                s += &format!(
                    "\nmixture of experts: {} experts of intermediate size {}, top {} per token{}{}{} \
                     on {sparse} of {} layers{}",
                    m.experts,
                    m.inter,
                    m.top_k,
                    if m.normalise { " (weights renormalised)" } else { "" },
                    match m.router {
                        MoeRouter::Softmax => String::new(),
                        MoeRouter::SoftmaxBiased { .. } => " by probability + a correction bias".into(),
                        MoeRouter::SoftmaxGroups {
                            groups,
                            topk_group,
                            best,
                            scale,
                        } => {
                            let within = match groups {
                                1 => String::new(),
                                _ => format!(
                                    "from {topk_group} of {groups} groups by their best {best}, "
                                ),
                            };
                            format!(" by probability ({within}weights × {scale})")
                        }
                        MoeRouter::Sigmoid {
                            groups,
                            topk_group,
                            scale,
                            ..
                        } => format!(
                            " by σ + a correction bias (from {topk_group} of {groups} groups, \
                             weights × {scale})"
                        ),
                        MoeRouter::SigmoidTopK => " by logit, weighted by its σ".into(),
                    },
                    match &m.shared {
                        Some(s) if s.gated => format!(", a shared expert of {} gated by σ", s.inter),
                        Some(s) => format!(", a shared expert of {}", s.inter),
                        None => String::new(),
                    },
                    c.num_hidden_layers,
                    if sparse < c.num_hidden_layers {
                        " (the others a dense MLP)"
                    } else {
                        ""
                    }
                );
                if m.input_scaled {
                    s += "; each token × its weight goes into the expert (Llama 4's)";
                }
                if let Some(o) = m.oss {
                    s += &format!(
                        "; GPT-OSS's experts: (clamp(up, ±{l}) + 1) ⊙ m σ({a} m), m = min(gate, {l}), \
                         biases on the router and every projection",
                        l = o.limit,
                        a = o.alpha
                    );
                }
            }
            s
        }
    }
}

/// The attention particulars of a decoder: windows, score scale and caps, rotary embedding(s).
fn describe_attention(c: &ModelConfig) -> String {
    let windowed: Vec<usize> = (0..c.num_hidden_layers)
        .filter(|&l| c.layer_window(l).is_some())
        .collect();
    // "k of L layers (l₀, l₁, …)", at most 8 listed.
    let layers = |which: &[usize]| {
        let shown: Vec<String> = which.iter().take(8).map(|l| l.to_string()).collect();
        let more = if which.len() > 8 { ", …" } else { "" };
        format!(
            "{} of {} layers ({}{more})",
            which.len(),
            c.num_hidden_layers,
            shown.join(", ")
        )
    };
    let mut parts = vec![match c.sliding_window {
        Some(w) if !windowed.is_empty() => format!("window {w} on {}", layers(&windowed)),
        _ => "causal, no window".to_string(),
    }];
    if let Some(m) = c.mla {
        let query = match m.q_lora_rank {
            Some(r) => format!("the query through rank {r}"),
            None => "one query projection".to_string(),
        };
        parts.push(format!(
            "multi-head latent attention ({query}; keys and values out of a {}-value latent and one \
             shared {}-value rotary key; heads of {} + {} query values and {} values)",
            m.kv_lora_rank, m.rope, m.nope, m.rope, m.v
        ));
    }
    if let Some(s) = c.attn_scale {
        parts.push(format!("scores × {s:.6}"));
    }
    if c.attention_sinks {
        parts.push("a learned sink logit per head in each softmax".to_string());
    }
    if let Some((beta, unscaled)) = c.query_scaling {
        parts.push(format!(
            "queries × 1 + {beta} ln(1 + ⌊position / {unscaled}⌋) (Llama 4's scaling, 1 in the first \
             {unscaled} tokens)"
        ));
    }
    match c.attention_output_gate {
        Some(OutputGate::Projection) => {
            parts.push("the output × σ(self_attn.gate_proj · x) per value".into())
        }
        Some(OutputGate::WithQuery) => parts.push(
            "the output × σ(gate) per value, each head's gate beside its query in q_gate_proj"
                .into(),
        ),
        None => {}
    }
    if c.qk_norm == QkNorm::Weightless {
        parts.push("q and k RMS-normalised per head, without weights, after the rotation".into());
    }
    if let Some((most, why)) = &c.max_tokens {
        parts.push(format!("sequences of at most {most} tokens ({why})"));
    }
    if let Some(cap) = c.attn_softcap {
        parts.push(format!("scores soft-capped at {cap}"));
    }
    if let Some(cap) = c.final_softcap {
        parts.push(format!("logits soft-capped at {cap}"));
    }
    let rope = |theta: f64, scaling: &RopeScaling| {
        let kind = match scaling {
            RopeScaling::Default => "default".to_string(),
            RopeScaling::Linear { factor } => format!("linear ×{factor}"),
            RopeScaling::Llama3 { factor, .. } => format!("llama3 ×{factor}"),
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => format!("longrope (long factors past {original_max_position_embeddings} tokens)"),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => format!(
                "yarn ×{factor} from {original_max_position_embeddings} tokens, cos/sin × \
                 {attention_factor:.6}"
            ),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => format!("dynamic NTK ×{factor} past {max_position_embeddings} tokens"),
        };
        format!("θ {theta}, {kind}")
    };
    if let Some(p) = c.learned_positions {
        let offset = match p.offset {
            0 => String::new(),
            o => format!(", from row {o}"),
        };
        parts.push(format!(
            "learned positions (up to {} tokens{offset}), no rotary",
            p.max_tokens
        ));
        return parts.join("; ");
    }
    if let Some(a) = c.alibi {
        let slopes = (0..c.num_attention_heads.min(3))
            .map(|h| format!("{:.4}", a.slope(h, c.num_attention_heads)))
            .collect::<Vec<_>>()
            .join(", ");
        parts.push(format!("ALiBi (slopes {slopes}, …), no rotary embedding"));
        return parts.join("; ");
    }
    parts.push(format!(
        "rotary {} on {} of {} values{}",
        rope(c.rope_theta, &c.rope_scaling),
        c.rotary_dim,
        c.head_dim,
        match c.rope_pairs {
            RopePairs::Halves => "",
            RopePairs::Interleaved => " (interleaved pairs)",
        }
    ));
    if let Some((theta, scaling)) = &c.sliding_rope {
        parts.push(format!("windowed layers' rotary {}", rope(*theta, scaling)));
    }
    let unrotated: Vec<usize> = (0..c.num_hidden_layers)
        .filter(|&l| !c.rotary_layers[l])
        .collect();
    if !unrotated.is_empty() {
        parts.push(format!("no rotary embedding on {}", layers(&unrotated)));
    }
    parts.join("; ")
}

fn describe_model(dir: &std::path::Path, a: &InfoArgs) -> Result<()> {
    let model = Model::load(dir)?;
    super::common::warn_unused_tensors(&model, dir);
    let c = &model.config;
    let ParamCounts { other, per_layer } = param_counts(&model)?;
    let total = other + per_layer.iter().sum::<usize>();
    println!(
        "{} ({}): {} decoder layers, hidden {}, intermediate {}, {} heads ({} key/value) of {}, vocabulary {}{}",
        dir.display(),
        c.model_type,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        if c.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    // Layers may differ (Qwen-MoE's dense layers among sparse ones): the range.
    let (lo, hi) = (
        per_layer.iter().copied().min().unwrap_or(0),
        per_layer.iter().copied().max().unwrap_or(0),
    );
    let each = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}–{hi}")
    };
    println!("parameters: {total} ({each} per decoder layer, {other} outside them)");
    if let Some([r, c]) = c.fp8_block {
        println!(
            "weights: FP8 (e4m3) matrices with a scale per block of {r} × {c} (read as value × scale \
             in f32; a pruned checkpoint keeps them as stored)"
        );
    }
    println!("block: {}", describe_block(c));
    println!("attention: {}", describe_attention(c));
    if let Some(wrapper) = &c.multimodal {
        println!(
            "vision-language checkpoint ({wrapper}): its language model is the decoder (tensors \
             '{}…'); {} other tensors (vision tower, projector) are not read and are copied unchanged \
             into a pruned checkpoint",
            model.names.decoder,
            model.other_modality_tensors()
        );
    }
    let tokenizer = dir.join("tokenizer.json");
    println!(
        "tokenizer.json: {}",
        if tokenizer.is_file() {
            "present (--text works)"
        } else {
            "absent (--text needs it; use --tokens FILE.npy)"
        }
    );
    if let Some(input) = a.tokens.input(&a.cut) {
        let tokens = model.load_token_input(&input)?;
        let (lo, hi) = tokens
            .data
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        println!(
            "{}: {} sequences × {} tokens, ids {lo}..={hi}",
            input.path().display(),
            tokens.sequences,
            tokens.len
        );
    }
    Ok(())
}
