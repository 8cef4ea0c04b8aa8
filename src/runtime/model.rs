//! A decoder checkpoint (every `model_type` of [`ModelConfig`]) as a tape. The LLaMA block: embedding
//! → per layer [norm → q/k/v (→ q/k norms) → RoPE → causal GQA attention → o → residual → norm → gated
//! MLP → residual] → final norm → lm_head → cross-entropy. The families vary it through the config:
//!
//! * where the norms sit and what they are ([`BlockNorms`]; RMSNorm, or LayerNorm with a bias, without
//!   one (Cohere) or without parameters (OLMo 1): [`BlockLayout::layer_norm`], `norm_bias`,
//!   `norm_weight`; Gemma's gain 1 + w); q/k norms per head or over the projection (`QkNorm`);
//! * the rotary embedding: its frequencies and scaling (`ModelConfig::rope_frequencies`), the part of a
//!   head it turns, its pairing (`RopePairs`: Cohere's, GLM's interleaved), a second table by layer kind
//!   (Gemma 3, OLMo 3), none in some layers (`rotary_layers`: SmolLM3, Cohere 2, EXAONE 4) or at all
//!   (learned positions, `Positions`: GPT-2, OPT; ALiBi: BLOOM, Falcon-RW, MPT);
//! * the attention: sliding windows per layer, the score scale and soft-cap (Gemma 2), ALiBi's biases
//!   (`AttnShape::alibi`), `clip_qkv` (OLMo, OLMoE: `Activation::Clamp`);
//! * the projections' names and fusion ([`BlockLayout`]): Phi-3's `qkv_proj` and Phi-3's / GLM's
//!   `gate_up_proj` read as row blocks of the stored matrices ([`Weights::split_rows`]); GPT-NeoX's,
//!   Falcon's (BLOOM's) and InternLM2's q, k and v per key/value group in one projection, gathered by
//!   `Columns` ops
//!   (`BlockLayout::grouped_qkv`); GPT-2's `Conv1D` weights read transposed
//!   ([`Weights::transposed_columns`]);
//! * the MLP: gated, plain (up → act → down), or a mixture of experts (the config's `Moe`: a router
//!   `Linear` and one [`SparseMoe`] op, `tape/moe.rs`, plus Qwen2-MoE's shared expert × σ(gate),
//!   `RowScale`);
//! * the residual: sequential, or the attention and the MLP in parallel on one shared norm (Phi,
//!   StableLM, Cohere, Falcon-7B) or each on its own (GPT-NeoX, Falcon's `ln_attn` / `ln_mlp`:
//!   `BlockLayout::mlp_reads_input`);
//! * constant factors (`Activation::Scale`): Gemma's √hidden on the embeddings, Granite's multipliers,
//!   Cohere's `logit_scale`; Gemma 2's soft-capped logits; BLOOM's LayerNorm on the embeddings.
//!
//! A vision-language checkpoint's language model is read where [`TensorNames`] finds it.

use super::config::{
    BlockLayout, BlockNorms, FusedExperts, ModelConfig, Moe, MoeRouter, OutputGate, QkNorm,
    SharedExpert, MLA_NORM_EPS,
};
use super::ops::{cpu::AttnShape, RopeTable};
use super::ops::{cpu::Cpu, Activation, ColumnBlocks, Device, NormShape, Xielu};
use super::tape::moe::{Expert, Router, SparseMoe};
use super::tape::{op, BufId, Pool, Tape};
use super::weights::Weights;
use super::{GradNorms, OnHidden, Tokens};
use crate::error::{Error, Result};
use crate::io::DType;
use crate::similarity::cuda::{DeviceBatch, DeviceLayer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct Model {
    pub config: ModelConfig,
    pub dir: PathBuf,
    /// Where the decoder's tensors are in the checkpoint.
    pub names: TensorNames,
    weights: Weights,
    /// The device the passes run on (the CPU unless [`Model::set_device`] says otherwise), with the
    /// activation and gradient buffers it recycles from one batch to the next (see [`Pool`]).
    runner: Box<dyn DecoderRunner>,
    /// Each decoder layer's router (softmax, or σ with the layer's correction bias read at load; the
    /// softmax's for the dense layers, which have none).
    routers: Vec<Router>,
    /// Each decoder layer's xIELU constants (Apertus's `mlp.act_fn.beta`, `eps`, read at load); empty
    /// without [`ModelConfig::mlp_xielu`].
    xielu: Vec<Xielu>,
}

/// The decoder's passes on one device, behind an object-safe interface (so that a [`Model`] can hold any
/// [`Device`]); hidden states reach the callbacks on the host.
pub trait DecoderRunner: Send + Sync {
    /// The device, for notes and reports.
    fn device_name(&self) -> String;
    /// Whether the hidden states are in host memory (the CPU), not on a GPU.
    fn hidden_on_host(&self) -> bool;
    /// [`Model::forward`] or, with `start`, [`Model::forward_from`].
    fn forward(
        &self,
        model: &Model,
        tokens: &Tokens,
        skip: &[usize],
        start: Option<(usize, Arc<Vec<f32>>)>,
        on_hidden: OnHidden<'_>,
    ) -> Result<f64>;
    /// [`Model::grad_norms_observed`].
    fn grad_norms(
        &self,
        model: &Model,
        tokens: &Tokens,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<GradNorms>;
    /// [`Model::pass_to_device`].
    fn pass_to_device(
        &self,
        model: &Model,
        tokens: &Tokens,
        grads: bool,
        ordinal: usize,
        sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<Option<DevicePass>>;
}

/// What [`Model::pass_to_device`] returns: the loss, and the gradient norms when it ran a backward.
#[derive(Clone, Debug)]
pub struct DevicePass {
    pub loss: f64,
    pub grads: Option<GradNorms>,
}

/// A [`DecoderRunner`] on device `D`, recycling one [`Pool`] of buffers.
pub struct OnDevice<D: Device> {
    dev: D,
    pool: Mutex<Pool<D>>,
}

impl<D: Device> OnDevice<D> {
    pub fn new(dev: D) -> Self {
        OnDevice {
            dev,
            pool: Mutex::new(Pool::default()),
        }
    }

    /// Run `f` with the pool taken out of its lock (passes of one model do not overlap).
    fn with_pool<R>(&self, f: impl FnOnce(&mut Pool<D>) -> R) -> R {
        let mut pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()));
        let r = f(&mut pool);
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = pool;
        r
    }
}

/// An [`OnHidden`] whose callback may outlive the borrow of it (`'b: 'a`).
type OnHiddenFor<'a, 'b> = Option<&'a mut (dyn FnMut(usize, &[f32]) + 'b)>;

/// `on_hidden` over host views of device slices: the first failed download is kept and returned after the
/// pass (the tape's callback cannot fail). Without a callback nothing is viewed: a GPU copies nothing out.
fn host_callback<'a, 'b: 'a, D: Device>(
    dev: &'a D,
    mut on_hidden: OnHiddenFor<'a, 'b>,
    failed: &'a mut Option<crate::Error>,
) -> impl FnMut(usize, &D::Slice) + use<'a, 'b, D> {
    let mut scratch = Vec::new();
    move |i, s| {
        let Some(f) = on_hidden.as_deref_mut() else {
            return;
        };
        if failed.is_some() {
            return;
        }
        match dev.host_view(s, &mut scratch) {
            Ok(h) => f(i, h),
            Err(e) => *failed = Some(e),
        }
    }
}

impl<D: Device> DecoderRunner for OnDevice<D> {
    fn device_name(&self) -> String {
        self.dev.name()
    }

    fn hidden_on_host(&self) -> bool {
        self.dev.cuda_ordinal().is_none()
    }

    fn forward(
        &self,
        model: &Model,
        tokens: &Tokens,
        skip: &[usize],
        start: Option<(usize, Arc<Vec<f32>>)>,
        on_hidden: OnHidden<'_>,
    ) -> Result<f64> {
        let mut failed = None;
        let loss = self.with_pool(|pool| {
            let mut cb = host_callback(&self.dev, on_hidden, &mut failed);
            model.forward_on(&self.dev, pool, tokens, skip, start, &mut cb)
        })?;
        failed.map_or(Ok(loss), Err)
    }

    fn grad_norms(
        &self,
        model: &Model,
        tokens: &Tokens,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<GradNorms> {
        let mut failed = None;
        let g = self.with_pool(|pool| {
            let mut cb = host_callback(&self.dev, on_hidden, &mut failed);
            model.grad_norms_on(&self.dev, pool, tokens, skip, &mut cb)
        })?;
        failed.map_or(Ok(g), Err)
    }

    fn pass_to_device(
        &self,
        model: &Model,
        tokens: &Tokens,
        grads: bool,
        ordinal: usize,
        sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<Option<DevicePass>> {
        if self.dev.cuda_ordinal() != Some(ordinal) {
            return Ok(None);
        }
        let (l, h, rows) = (
            model.num_layers(),
            model.hidden_size(),
            tokens.sequences * tokens.len,
        );
        self.with_pool(|pool| {
            // Each layer's output is copied (on the device) out of the tape, which frees it once the
            // next layer has read it.
            let mut outs = Vec::with_capacity(l);
            for _ in 0..l {
                outs.push(pool.alloc(&self.dev, rows * h)?);
            }
            let mut failed = None;
            let mut keep = |i: usize, s: &D::Slice| {
                if i >= 1 && failed.is_none() {
                    failed = self.dev.copy(s, &mut outs[i - 1]).err();
                }
            };
            let pass = if grads {
                model
                    .grad_norms_on(&self.dev, pool, tokens, &[], &mut keep)
                    .map(|g| DevicePass {
                        loss: g.loss,
                        grads: Some(g),
                    })
            } else {
                model
                    .forward_on(&self.dev, pool, tokens, &[], None, &mut keep)
                    .map(|loss| DevicePass { loss, grads: None })
            };
            let pass = match (pass, failed) {
                (Ok(p), None) => p,
                (Err(e), _) | (_, Some(e)) => return Err(e),
            };
            // The sink reads the outputs through their addresses, outside the device's stream order.
            self.dev.synchronize()?;
            let layers = outs
                .iter()
                .map(|o| {
                    Ok(DeviceLayer {
                        ptr: self.dev.device_addr(o)?,
                        cols: h,
                        dtype: DType::F32,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sink(&DeviceBatch { rows, layers })?;
            for o in outs {
                pool.release(&self.dev, o);
            }
            Ok(Some(pass))
        })
    }
}

/// Where the decoder's tensors are in a checkpoint: its layers `{layers}{l}.…`, its embedding, final
/// norm and, untied, lm_head. A LLaMA-family decoder: `model.`, `model.layers.`,
/// `model.embed_tokens.weight`, `model.norm` and `lm_head.weight`; GPT-NeoX: `gpt_neox.`,
/// `gpt_neox.layers.`, `gpt_neox.embed_in.weight`, `gpt_neox.final_layer_norm` and `embed_out.weight`;
/// GPT-2: `transformer.` (or nothing, as the hub's original checkpoints), `transformer.h.`,
/// `transformer.wte.weight`, `transformer.ln_f`; OPT: `model.decoder.` (or `decoder.`),
/// `model.decoder.layers.`, `model.decoder.final_layer_norm`. The language model of a vision-language
/// checkpoint ([`ModelConfig::multimodal`]): one of [`TensorNames::multimodal_layouts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorNames {
    pub decoder: String,
    /// What every decoder layer's tensor name starts with, before the layer's number.
    pub layers: String,
    /// The learned position embeddings' table (GPT-2, OPT).
    pub positions: Option<String>,
    /// The embedding table.
    pub embed: String,
    /// The LayerNorm on the embeddings (BLOOM's `word_embeddings_layernorm`; its `.weight` and `.bias`).
    pub embed_norm: Option<String>,
    /// The final norm's module (its `.weight`; a LayerNorm's `.bias` too).
    pub norm: String,
    pub lm_head: String,
}

impl TensorNames {
    /// A LLaMA-family decoder's names under `decoder`, with `lm_head`.
    fn llama(decoder: &str, lm_head: &str) -> Self {
        TensorNames {
            decoder: decoder.into(),
            layers: format!("{decoder}layers."),
            positions: None,
            embed: format!("{decoder}embed_tokens.weight"),
            embed_norm: None,
            norm: format!("{decoder}norm"),
            lm_head: lm_head.into(),
        }
    }

    /// The names of a decoder-only checkpoint of `layout`.
    pub fn decoder_only(layout: BlockLayout) -> Self {
        match layout {
            BlockLayout::Llama
            | BlockLayout::Arcee
            | BlockLayout::Nemotron
            | BlockLayout::Olmo
            | BlockLayout::Starcoder2
            | BlockLayout::StableLm
            | BlockLayout::Cohere => Self::llama("model.", "lm_head.weight"),
            BlockLayout::InternLm2 => TensorNames {
                embed: "model.tok_embeddings.weight".into(),
                ..Self::llama("model.", "output.weight")
            },
            BlockLayout::Phi => TensorNames {
                norm: "model.final_layernorm".into(),
                ..Self::llama("model.", "lm_head.weight")
            },
            BlockLayout::NeoX { .. } => TensorNames {
                decoder: "gpt_neox.".into(),
                layers: "gpt_neox.layers.".into(),
                positions: None,
                embed: "gpt_neox.embed_in.weight".into(),
                embed_norm: None,
                norm: "gpt_neox.final_layer_norm".into(),
                lm_head: "embed_out.weight".into(),
            },
            BlockLayout::Gpt2 | BlockLayout::GptBigCode | BlockLayout::GptNeo => {
                Self::gpt2("transformer.")
            }
            BlockLayout::Opt => Self::opt("model.decoder."),
            BlockLayout::Falcon { .. } => Self::falcon("transformer.", false),
            BlockLayout::GptJ | BlockLayout::CodeGen | BlockLayout::Exaone => TensorNames {
                positions: None,
                ..Self::gpt2("transformer.")
            },
            BlockLayout::Mpt => TensorNames {
                decoder: "transformer.".into(),
                layers: "transformer.blocks.".into(),
                positions: None,
                embed: "transformer.wte.weight".into(),
                embed_norm: None,
                norm: "transformer.norm_f".into(),
                lm_head: "lm_head.weight".into(),
            },
        }
    }

    /// Falcon's (and BLOOM's, with `embed_norm`) names under `decoder`: `transformer.` as the ForCausalLM
    /// classes save them, or nothing (the hub's `bigscience/bloom*` checkpoints, saved from BloomModel).
    fn falcon(decoder: &str, embed_norm: bool) -> Self {
        TensorNames {
            decoder: decoder.into(),
            layers: format!("{decoder}h."),
            positions: None,
            embed: format!("{decoder}word_embeddings.weight"),
            embed_norm: embed_norm.then(|| format!("{decoder}word_embeddings_layernorm")),
            norm: format!("{decoder}ln_f"),
            lm_head: "lm_head.weight".into(),
        }
    }

    /// OPT's names under `decoder`: `model.decoder.` as OPTForCausalLM saves it, or `decoder.` (the
    /// hub's `facebook/opt-*` checkpoints, saved from the base model).
    fn opt(decoder: &str) -> Self {
        TensorNames {
            positions: Some(format!("{decoder}embed_positions.weight")),
            norm: format!("{decoder}final_layer_norm"),
            ..Self::llama(decoder, "lm_head.weight")
        }
    }

    /// GPT-2's names under `decoder`: `transformer.` as transformers saves it, or nothing (the hub's
    /// original `gpt2` checkpoints: `h.0.…`, `wte.weight`).
    fn gpt2(decoder: &str) -> Self {
        TensorNames {
            decoder: decoder.into(),
            layers: format!("{decoder}h."),
            positions: Some(format!("{decoder}wpe.weight")),
            embed: format!("{decoder}wte.weight"),
            embed_norm: None,
            norm: format!("{decoder}ln_f"),
            lm_head: "lm_head.weight".into(),
        }
    }

    /// The layouts a vision-language checkpoint's language model may have, in the order tried: the
    /// hub's for Gemma 3, Mistral 3 and llava (which transformers 5 writes back), 4.52 – 4.57's and
    /// Qwen3-VL's, the hub's for Qwen2-VL and Qwen2.5-VL (the decoder's own names, the tower `visual.`).
    pub fn multimodal_layouts() -> [Self; 3] {
        [
            Self::llama("language_model.model.", "language_model.lm_head.weight"),
            Self::llama("model.language_model.", "lm_head.weight"),
            Self::llama("model.", "lm_head.weight"),
        ]
    }

    /// The final norm's weight.
    pub fn norm(&self) -> String {
        format!("{}.weight", self.norm)
    }

    /// The final norm's bias (a LayerNorm's).
    pub fn norm_bias(&self) -> String {
        format!("{}.bias", self.norm)
    }

    /// The lm_head's bias (Phi's), beside its weight.
    pub fn lm_head_bias(&self) -> String {
        let module = self
            .lm_head
            .strip_suffix(".weight")
            .unwrap_or(&self.lm_head);
        format!("{module}.bias")
    }

    /// Decoder layer `l`'s module name (its tensors are `{layer}.…`).
    pub fn layer(&self, l: usize) -> String {
        format!("{}{l}", self.layers)
    }

    /// What every decoder layer's tensor name starts with, before the layer's number.
    pub fn layers_prefix(&self) -> String {
        self.layers.clone()
    }

    /// Whether a tensor belongs to the decoder (its layers, embedding, final norm or lm_head); a
    /// vision-language checkpoint's other tensors (vision tower, projector) do not.
    pub fn is_decoder(&self, name: &str) -> bool {
        name.starts_with(&self.decoder) || name == self.lm_head
    }

    /// The names of the checkpoint `weights` (in `dir`, for errors) under `config`: a vision-language
    /// checkpoint's layout is the first whose embedding is there.
    fn find(config: &ModelConfig, weights: &Weights, dir: &Path) -> Result<Self> {
        let (layouts, what) = match (&config.multimodal, config.layout) {
            (Some(wrapper), _) => (
                Self::multimodal_layouts().to_vec(),
                format!("a vision-language checkpoint ({wrapper}) without its language model's"),
            ),
            (None, BlockLayout::Gpt2) => (
                vec![Self::gpt2("transformer."), Self::gpt2("")],
                "a GPT-2 checkpoint without its".to_string(),
            ),
            (None, BlockLayout::Opt) => (
                vec![Self::opt("model.decoder."), Self::opt("decoder.")],
                "an OPT checkpoint without its".to_string(),
            ),
            (None, BlockLayout::Falcon { .. }) if config.embed_norm => (
                vec![Self::falcon("transformer.", true), Self::falcon("", true)],
                "a BLOOM checkpoint without its".to_string(),
            ),
            (None, layout) => return Ok(Self::decoder_only(layout)),
        };
        layouts
            .iter()
            .find(|n| weights.contains(&n.embed))
            .cloned()
            .ok_or_else(|| {
                Error::Model(format!(
                    "{}: {what} embedding ({})",
                    dir.display(),
                    layouts
                        .iter()
                        .map(|n| format!("'{}'", n.embed))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}

impl Model {
    /// Read `config.json`, map the weights and check that every tensor the config implies is there with
    /// its shape.
    pub fn load(dir: &Path) -> Result<Model> {
        let mut config = ModelConfig::load(&dir.join("config.json"))?;
        let mut weights = Weights::open(dir)?;
        let names = TensorNames::find(&config, &weights, dir)?;
        for l in 0..config.num_hidden_layers {
            let layer = names.layer(l);
            for (stored, name) in renamed_tensors(&config.model_type) {
                weights.rename(&format!("{layer}.{stored}"), &format!("{layer}.{name}"));
            }
        }
        // Block-scaled FP8: every e4m3 matrix reads as its values × its blocks' scales.
        if let Some(block) = config.fp8_block {
            let fp8: Vec<String> = (weights.names())
                .filter(|n| weights.dtype(n) == Some(safetensors::Dtype::F8_E4M3))
                .map(str::to_string)
                .collect();
            for name in fp8 {
                weights.block_scaled(&name, &format!("{name}_scale_inv"), block)?;
            }
        }
        // A vision-language wrapper's lm_head is tied as the checkpoint shows: transformers 5 ties by the
        // wrapper's `tie_word_embeddings` (often absent, then true: Mistral3ForConditionalGeneration
        // saves no lm_head though its text_config says false) unless the file holds an lm_head that
        // differs, 4.x by the text_config's.
        if config.multimodal.is_some() {
            config.tie_word_embeddings = !weights.contains(&names.lm_head);
        }
        // Gemma multiplies the embedding by √hidden cast to the weights' dtype (transformers'
        // `embed_scale.to(self.weight.dtype)`, as the original JAX code casts it to the activations'):
        // a bf16 checkpoint's factor is √hidden rounded to bf16 (√3072 = 55.43 → 55.5).
        // MiniCPM3's scale_emb likewise (its embedding is Gemma 3's). (Granite's embedding_multiplier is a
        // Python float: the product is rounded, not the factor.)
        config.embed_scale = match weights.dtype(&names.embed) {
            _ if !(config.model_type.starts_with("gemma") || config.model_type == "vaultgemma")
                && config.model_type != "minicpm3" =>
            {
                config.embed_scale
            }
            Some(safetensors::Dtype::BF16) => half::bf16::from_f32(config.embed_scale).to_f32(),
            Some(safetensors::Dtype::F16) => half::f16::from_f32(config.embed_scale).to_f32(),
            _ => config.embed_scale,
        };
        let mut model = Model {
            config,
            dir: dir.to_path_buf(),
            names,
            weights,
            runner: Box::new(OnDevice::new(Cpu)),
            routers: Vec::new(),
            xielu: Vec::new(),
        };
        model.check_weights()?;
        model.routers = model.read_routers()?;
        model.xielu = model.read_xielu()?;
        let fused_experts = (0..model.num_layers())
            .any(|l| model.has_fused_experts(l) || model.fused_shared_expert(l).is_some());
        if model.config.fused_qkv || model.config.fused_gate_up || fused_experts {
            model.split_fused_projections()?;
        }
        if model.config.layout == BlockLayout::Gpt2 {
            model.transpose_conv1d()?;
        }
        if let Some(stored) = per_head_qk_norms(&model.config) {
            let c = &model.config;
            for l in 0..c.num_hidden_layers {
                let layer = model.names.layer(l);
                let heads = [c.num_attention_heads, c.num_key_value_heads];
                for ((name, stored), heads) in QK_NORMS.iter().zip(stored).zip(heads) {
                    let parts: Vec<String> = (0..heads)
                        .map(|h| format!("{layer}.{stored}.{h}.weight"))
                        .collect();
                    model
                        .weights
                        .stack(&format!("{layer}.{name}.weight"), &parts)?;
                }
            }
        }
        Ok(model)
    }

    /// Each layer's xIELU constants (one value each, `mlp.act_fn.beta` and `eps`) where the MLP has xIELU.
    fn read_xielu(&self) -> Result<Vec<Xielu>> {
        if !self.config.mlp_xielu {
            return Ok(Vec::new());
        }
        (0..self.config.num_hidden_layers)
            .map(|l| {
                let read = |name: &str| -> Result<f32> {
                    let name = format!("{}.mlp.act_fn.{name}", self.names.layer(l));
                    Ok(self.weights.get_f32(&name)?[0])
                };
                Ok(Xielu {
                    beta: read("beta")?,
                    eps: read("eps")?,
                })
            })
            .collect()
    }

    /// Each layer's [`Router`], with its layer's correction bias where the router has one.
    fn read_routers(&self) -> Result<Vec<Router>> {
        let c = &self.config;
        (0..c.num_hidden_layers)
            .map(|l| {
                let Some(m) = c.moe.as_ref().filter(|m| m.is_sparse(l)) else {
                    return Ok(Router::Softmax);
                };
                let read = |name: &str| -> Result<Arc<[f32]>> {
                    let name = format!("{}.{name}", self.names.layer(l));
                    Ok(self.weights.get_f32(&name)?.into_owned().into())
                };
                Ok(match m.router {
                    MoeRouter::Softmax => Router::Softmax,
                    MoeRouter::SoftmaxGroups {
                        groups,
                        topk_group,
                        best,
                        scale,
                    } => Router::SoftmaxGroups {
                        groups,
                        topk_group,
                        best,
                        scale,
                    },
                    MoeRouter::SoftmaxBiased { bias } => {
                        Router::SoftmaxBiased { bias: read(bias)? }
                    }
                    MoeRouter::Sigmoid {
                        groups,
                        topk_group,
                        scale,
                        bias,
                    } => Router::Sigmoid {
                        bias: read(bias)?,
                        groups,
                        topk_group,
                        scale,
                    },
                    // σ's top k are the logits' top k: σ with no bias, one group, no scale.
                    MoeRouter::SigmoidTopK => Router::Sigmoid {
                        bias: vec![0.0; m.experts].into(),
                        groups: 1,
                        topk_group: 1,
                        scale: 1.0,
                    },
                })
            })
            .collect()
    }

    /// GPT-2: name each layer's `Conv1D` weights (`[in, out]`) transposed as the projections the decoder
    /// reads (`c_attn`'s three column blocks as q, k and v), and their biases' blocks likewise.
    fn transpose_conv1d(&mut self) -> Result<()> {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let [q, k, v] = self.config.layout.qkv_proj();
        let o = self.config.layout.o_proj();
        let (up, down) = self
            .config
            .layout
            .plain_mlp()
            .expect("GPT-2's MLP is plain");
        for l in 0..self.config.num_hidden_layers {
            let layer = self.names.layer(l);
            for (stored, parts) in [
                ("attn.c_attn", vec![(q, h), (k, h), (v, h)]),
                ("attn.c_proj", vec![(o, h)]),
                ("mlp.c_fc", vec![(up, i)]),
                ("mlp.c_proj", vec![(down, h)]),
            ] {
                let named = |suffix: &str| -> Vec<(String, usize)> {
                    (parts.iter())
                        .map(|&(p, n)| (format!("{layer}.{p}.{suffix}"), n))
                        .collect()
                };
                let w = format!("{layer}.{stored}.weight");
                self.weights.transposed_columns(&w, &named("weight"))?;
                let b = format!("{layer}.{stored}.bias");
                self.weights.split_rows(&b, &named("bias"))?;
            }
        }
        Ok(())
    }

    /// Phi-3 (and GLM's gate/up): name the row blocks of each layer's `qkv_proj` (q, k, v) and
    /// `gate_up_proj` (gate, up: Phi3MLP's `chunk(2)` takes the gate first) as the projections the
    /// decoder reads.
    fn split_fused_projections(&mut self) -> Result<()> {
        let c = &self.config;
        let (qd, kvd, i) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
            c.intermediate_size,
        );
        for l in 0..c.num_hidden_layers {
            let layer = self.names.layer(l);
            let name = |n: &str| format!("{layer}.{n}.weight");
            if c.fused_qkv {
                let [q, k, v] = c.layout.qkv_proj();
                self.weights.split_rows(
                    &name(c.layout.fused_qkv()),
                    &[(name(q), qd), (name(k), kvd), (name(v), kvd)],
                )?;
            }
            if c.fused_gate_up {
                self.weights.split_rows(
                    &name("mlp.gate_up_proj"),
                    &[(name("mlp.gate_proj"), i), (name("mlp.up_proj"), i)],
                )?;
            }
            if let Some(s) = self.fused_shared_expert(l) {
                let name = |p: &str| format!("{layer}.{}.{p}.weight", s.module);
                self.weights.split_rows(
                    &name("gate_up_proj"),
                    &[(name("gate_proj"), s.inter), (name("up_proj"), s.inter)],
                )?;
            }
            // transformers 5's own layout of a mixture's experts (Mistral 4 saves it): each expert's
            // gate and up stacked in `experts.gate_up_proj` `[experts, 2 inter, hidden]`, its down in
            // `experts.down_proj` `[experts, hidden, inter]`.
            let m = c.moe.as_ref().filter(|_| self.has_fused_experts(l));
            if let Some(m) = m.filter(|m| m.fused != FusedExperts::OutputsFirst) {
                split_inputs_first_experts(&mut self.weights, m, c.hidden_size, &layer)?;
            } else if let Some(m) = m {
                let experts = |p: &str| format!("{layer}.{}.experts.{p}", m.prefix);
                let [gate, up, down] = m.projections;
                let expert =
                    |e: usize, p: &str| format!("{layer}.{}.experts.{e}.{p}.weight", m.prefix);
                let gate_up: Vec<(String, usize)> = (0..m.experts)
                    .flat_map(|e| [(expert(e, gate), m.inter), (expert(e, up), m.inter)])
                    .collect();
                self.weights
                    .split_rows(&experts("gate_up_proj"), &gate_up)?;
                let downs: Vec<(String, usize)> = (0..m.experts)
                    .map(|e| (expert(e, down), c.hidden_size))
                    .collect();
                self.weights.split_rows(&experts("down_proj"), &downs)?;
            }
        }
        Ok(())
    }

    /// Whether layer `l` is a mixture whose experts the checkpoint stores fused (`experts.gate_up_proj`,
    /// `experts.down_proj`), as transformers 5 does for the types it has no hub layout for.
    fn has_fused_experts(&self, l: usize) -> bool {
        self.config
            .moe
            .as_ref()
            .filter(|m| m.is_sparse(l))
            .is_some_and(|m| {
                let fused = format!("{}.{}.experts.gate_up_proj", self.names.layer(l), m.prefix);
                self.weights.contains(&fused)
            })
    }

    /// Layer `l`'s shared expert where the checkpoint stores its gate and up fused (`gate_up_proj`,
    /// gate first: Granite MoE's `shared_mlp.input_linear`, renamed at load).
    fn fused_shared_expert(&self, l: usize) -> Option<&SharedExpert> {
        let m = self.config.moe.as_ref().filter(|m| m.is_sparse(l))?;
        let s = m.shared.as_ref()?;
        let fused = format!("{}.{}.gate_up_proj.weight", self.names.layer(l), s.module);
        self.weights.contains(&fused).then_some(s)
    }

    /// Every tensor the decoder reads, with the shape the config implies: the embedding, the final norm,
    /// the lm_head (untied), then per layer its norms, attention and MLP weights (as stored: fused
    /// q/k/v and gate/up for phi3).
    fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let norm_bias = c.layout.norm_bias();
        let mut out = vec![(self.names.embed.clone(), vec![v, h])];
        if let Some(norm) = &self.names.embed_norm {
            out.push((format!("{norm}.weight"), vec![h]));
            out.push((format!("{norm}.bias"), vec![h]));
        }
        if c.layout.norm_weight() {
            out.push((self.names.norm(), vec![h]));
        }
        if norm_bias {
            out.push((self.names.norm_bias(), vec![h]));
        }
        if !c.tie_word_embeddings {
            out.push((self.names.lm_head.clone(), vec![v, h]));
        }
        if c.lm_head_bias {
            out.push((self.names.lm_head_bias(), vec![v]));
        }
        if let (Some(p), Some(name)) = (c.learned_positions, &self.names.positions) {
            out.push((name.clone(), vec![p.max_tokens + p.offset, h]));
        }
        for l in 0..c.num_hidden_layers {
            let layer = self.names.layer(l);
            let mut t =
                |name: &str, shape: Vec<usize>| out.push((format!("{layer}.{name}"), shape));
            for norm in c.layout.norm_names(c.block_norms).into_iter().flatten() {
                if c.layout.norm_weight() {
                    t(&format!("{norm}.weight"), vec![h]);
                }
                if norm_bias {
                    t(&format!("{norm}.bias"), vec![h]);
                }
            }
            // The attention's input projections (as stored: fused for GPT-NeoX, Falcon and Phi-3), its
            // output projection, the MLP's projections (as stored: Phi-3's and GLM's gate/up fused).
            let mut linears = match (c.layout.grouped_qkv(), c.layout) {
                // MLA's projections and its two latent norms.
                _ if c.mla.is_some() => {
                    let (linears, norms) = mla_tensors(c);
                    for (norm, d) in norms {
                        t(&format!("{norm}.weight"), vec![d]);
                    }
                    linears
                }
                (Some(name), _) => vec![(name, qd + 2 * kvd, h, c.qkv_bias)],
                // Conv1D: [in, out] as stored (read transposed), every one with a bias.
                (None, BlockLayout::Gpt2) => {
                    for (name, rows, cols) in [
                        ("attn.c_attn", h, 3 * qd),
                        ("attn.c_proj", qd, h),
                        ("mlp.c_fc", h, i),
                        ("mlp.c_proj", i, h),
                    ] {
                        t(&format!("{name}.weight"), vec![rows, cols]);
                        t(&format!("{name}.bias"), vec![cols]);
                    }
                    continue;
                }
                _ if c.fused_qkv => {
                    vec![(c.layout.fused_qkv(), qd + 2 * kvd, h, c.qkv_bias)]
                }
                _ => {
                    let [q, k, v] = c.layout.qkv_proj();
                    // MiniCPM 5 MoE's query projection gives each head's gate too.
                    let q = match c.attention_output_gate {
                        Some(OutputGate::WithQuery) => ("self_attn.q_gate_proj", 2 * qd),
                        _ => (q, qd),
                    };
                    vec![
                        (q.0, q.1, h, c.qkv_bias),
                        (k, kvd, h, c.qkv_bias),
                        (v, kvd, h, c.qkv_bias),
                    ]
                }
            };
            linears.push((c.layout.o_proj(), h, c.attention_width(), c.o_bias));
            if c.attention_output_gate == Some(OutputGate::Projection) {
                linears.push(("self_attn.gate_proj", c.attention_width(), h, false));
            }
            if c.attention_sinks {
                t("self_attn.sinks", vec![c.num_attention_heads]);
            }
            let moe = c.moe.as_ref().filter(|m| m.is_sparse(l));
            let mut moe_linears = Vec::new();
            let fused_experts = self.has_fused_experts(l);
            if let Some(m) = moe {
                moe_linears.push((format!("{}.gate", m.prefix), m.experts, h));
                let name = |p: &str| format!("{}.experts.{p}", m.prefix);
                match (fused_experts, m.fused) {
                    // GPT-OSS's and Llama 4's: inputs first (GPT-OSS's with biases).
                    (true, FusedExperts::InputsFirst { .. }) => {
                        t(&name("gate_up_proj"), vec![m.experts, h, 2 * m.inter]);
                        t(&name("down_proj"), vec![m.experts, m.inter, h]);
                        if m.oss.is_some() {
                            t(&name("gate_up_proj_bias"), vec![m.experts, 2 * m.inter]);
                            t(&name("down_proj_bias"), vec![m.experts, h]);
                        }
                    }
                    (true, FusedExperts::OutputsFirst) => {
                        t(&name("gate_up_proj"), vec![m.experts, 2 * m.inter, h]);
                        t(&name("down_proj"), vec![m.experts, h, m.inter]);
                    }
                    (false, _) => {}
                }
                if m.oss.is_some() {
                    t(&format!("{}.gate.bias", m.prefix), vec![m.experts]);
                }
                for e in (0..m.experts).filter(|_| !fused_experts) {
                    let [gate, up, down] = m.projections;
                    let name = |p: &str| format!("{}.experts.{e}.{p}", m.prefix);
                    moe_linears.extend([
                        (name(gate), m.inter, h),
                        (name(up), m.inter, h),
                        (name(down), h, m.inter),
                    ]);
                }
                if let Some(s) = &m.shared {
                    let name = |p: &str| format!("{}.{p}", s.module);
                    match self.fused_shared_expert(l).is_some() {
                        true => moe_linears.push((name("gate_up_proj"), 2 * s.inter, h)),
                        false => moe_linears.extend([
                            (name("gate_proj"), s.inter, h),
                            (name("up_proj"), s.inter, h),
                        ]),
                    }
                    moe_linears.push((name("down_proj"), h, s.inter));
                    if s.gated {
                        moe_linears.push((format!("{}_gate", s.module), 1, h));
                    }
                }
                if let Some((bias, shape)) = router_bias(m) {
                    t(bias, shape);
                }
            }
            match (c.layout.plain_mlp(), c.fused_gate_up) {
                _ if moe.is_some() => {}
                (Some((up, down)), _) => {
                    linears.extend([(up, i, h, c.mlp_bias), (down, h, i, c.mlp_bias)]);
                    // xIELU's two learned scalars and its two constants (0-d buffers).
                    if c.mlp_xielu {
                        for (p, shape) in [("alpha_p", vec![1]), ("alpha_n", vec![1])] {
                            t(&format!("mlp.act_fn.{p}"), shape);
                        }
                        for p in ["beta", "eps"] {
                            t(&format!("mlp.act_fn.{p}"), vec![]);
                        }
                    }
                }
                (None, true) => linears.extend([
                    ("mlp.gate_up_proj", 2 * i, h, c.mlp_bias),
                    ("mlp.down_proj", h, i, c.mlp_bias),
                ]),
                (None, false) => {
                    let (module, [gate, up, down]) = c.layout.gated_mlp();
                    for (p, rows, cols) in [(gate, i, h), (up, i, h), (down, h, i)] {
                        t(&format!("{module}.{p}.weight"), vec![rows, cols]);
                        if c.mlp_bias {
                            t(&format!("{module}.{p}.bias"), vec![rows]);
                        }
                    }
                }
            }
            for (name, rows, cols, bias) in linears {
                t(&format!("{name}.weight"), vec![rows, cols]);
                if bias {
                    t(&format!("{name}.bias"), vec![rows]);
                }
            }
            for (name, rows, cols) in moe_linears {
                t(&format!("{name}.weight"), vec![rows, cols]);
            }
            if let Some(rows) = c.qk_norm_rows().filter(|_| c.qk_norm != QkNorm::Weightless) {
                let per_head = per_head_qk_norms(c);
                for (i, (name, (d, groups))) in QK_NORMS.iter().zip(rows).enumerate() {
                    match (per_head, groups) {
                        (Some(stored), _) => {
                            for h in 0..groups {
                                t(&format!("{}.{h}.weight", stored[i]), vec![d]);
                            }
                        }
                        (None, 1) => t(&format!("{name}.weight"), vec![d]),
                        (None, _) => t(&format!("{name}.weight"), vec![groups, d]),
                    }
                }
            }
        }
        out
    }

    fn check_weights(&self) -> Result<()> {
        if !self.config.tie_word_embeddings && !self.weights.contains(&self.names.lm_head) {
            return Err(Error::Model(format!(
                "{}: checkpoint has no '{}' and config.json has tie_word_embeddings false",
                self.dir.display(),
                self.names.lm_head
            )));
        }
        for (name, shape) in self.expected_tensors() {
            self.weights.expect(&name, &shape)?;
        }
        Ok(())
    }

    /// Tensors of the checkpoint the decoder does not read, sorted: a sign that config.json's
    /// `model_type` or flags do not describe the weights (e.g. Qwen3 q/k norms under `qwen2`), since
    /// the results then ignore part of the model. Not listed: buffers that older checkpoints saved
    /// (rotary `inv_freq`, GPT-2's causal masks: [`crate::pruning::checkpoint::is_buffer`]), a tied
    /// checkpoint's `lm_head.weight` (transformers ties it away too), and a vision-language
    /// checkpoint's other modalities ([`Model::other_modality_tensors`]).
    pub fn unused_tensors(&self) -> Vec<String> {
        let read: std::collections::HashSet<String> = self
            .expected_tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let mut unused: Vec<String> = self
            .weights
            .names()
            .filter(|n| !read.contains(*n) && self.names.is_decoder(n))
            // An FP8 weight's block scales are read with it.
            .filter(|n| {
                !n.strip_suffix("_scale_inv")
                    .is_some_and(|w| read.contains(w))
            })
            .filter(|n| !crate::pruning::checkpoint::is_buffer(n))
            .filter(|n| !(self.config.tie_word_embeddings && *n == self.names.lm_head))
            .map(str::to_string)
            .collect();
        unused.sort();
        unused
    }

    /// The number of tensors of a vision-language checkpoint outside its language model (vision tower,
    /// projector): not read, copied unchanged into a pruned checkpoint. 0 for a plain decoder.
    pub fn other_modality_tensors(&self) -> usize {
        self.weights
            .names()
            .filter(|n| !self.names.is_decoder(n))
            .count()
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    pub fn layer_names(&self) -> Vec<String> {
        (0..self.num_layers())
            .map(|i| self.names.layer(i))
            .collect()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Load a calibration tokens file for this model: at least one sequence of at least 2 tokens, every id
    /// inside the vocabulary (an error names the first bad position).
    pub fn load_tokens(&self, path: &Path) -> Result<Tokens> {
        let tokens = Tokens::load_npy(path)?;
        if tokens.sequences == 0 || tokens.len < 2 {
            return Err(Error::format(
                path,
                format!(
                    "need at least one sequence of at least 2 tokens (got {} × {})",
                    tokens.sequences, tokens.len
                ),
            ));
        }
        tokens.check_vocab(self.vocab_size(), path)?;
        Ok(tokens)
    }

    /// Calibration tokens from a `.npy` array or from text tokenised with the checkpoint's own
    /// `tokenizer.json` ([`super::text`]); every id checked against the vocabulary.
    pub fn load_token_input(&self, input: &super::TokenInput) -> Result<Tokens> {
        match input {
            super::TokenInput::Npy(p) => self.load_tokens(p),
            super::TokenInput::Text(spec) => {
                let tokens = super::text::tokenize_text(&self.dir.join("tokenizer.json"), spec)?;
                tokens.check_vocab(self.vocab_size(), &spec.path)?;
                Ok(tokens)
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Forward only. `skip`: decoder layers bypassed (identity). Calls `on_hidden(i, h)` with i = 0 for the
    /// embedding output and i = l + 1 for the output of decoder layer l (a skipped layer reports its input),
    /// h = `[seqs * tokens, hidden]`; with `None` (nobody reads them) a GPU copies no hidden state out.
    /// Returns the mean next-token cross-entropy. Activations are freed as soon as nothing reads them any
    /// more.
    pub fn forward(&self, tokens: &Tokens, skip: &[usize], on_hidden: OnHidden<'_>) -> Result<f64> {
        self.runner.forward(self, tokens, skip, None, on_hidden)
    }

    /// One forward (with `grads`, forward + backward) on all layers, the layers' outputs (hidden states
    /// `1..=L`, f32, `rows × hidden`) kept on the GPU and handed to `sink` as one [`DeviceBatch`] after
    /// the pass (valid during the call): for the CUDA CKA on GPU `ordinal`, with no host round trip.
    /// `Ok(None)` when the model does not run on that GPU (the caller takes the host path).
    pub fn pass_to_device(
        &self,
        tokens: &Tokens,
        grads: bool,
        ordinal: usize,
        sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<Option<DevicePass>> {
        self.runner
            .pass_to_device(self, tokens, grads, ordinal, sink)
    }

    /// Run the passes on another device (the CPU by default): [`OnDevice`] of a [`Device`].
    pub fn set_device(&mut self, runner: Box<dyn DecoderRunner>) {
        self.runner = runner;
    }

    /// The device the passes run on.
    pub fn device_name(&self) -> String {
        self.runner.device_name()
    }

    /// Whether the passes keep the hidden states in host memory (the CPU), not on a GPU.
    pub fn runner_on_host(&self) -> bool {
        self.runner.hidden_on_host()
    }

    /// [`Model::forward`] (or, with `start`, [`Model::forward_from`]) on device `dev`, recycling the
    /// buffers of `pool`; `on_hidden` sees the hidden states where the device keeps them.
    pub fn forward_on<D: Device>(
        &self,
        dev: &D,
        pool: &mut Pool<D>,
        tokens: &Tokens,
        skip: &[usize],
        start: Option<(usize, Arc<Vec<f32>>)>,
        on_hidden: &mut dyn FnMut(usize, &D::Slice),
    ) -> Result<f64> {
        let mut tape = self.build_tape(dev, std::mem::take(pool), tokens, skip, start)?;
        let loss = tape.forward(&self.weights, false, on_hidden);
        *pool = tape.into_pool();
        loss
    }

    /// Forward only, resuming at decoder layer `start` from `h_start`, the input of that layer
    /// (`[seqs * tokens, hidden]`, what [`Model::forward`] reports as hidden state `start`): the layers
    /// before `start` are taken as already run. `on_hidden` sees hidden states `start..=L`. With the input
    /// of layer `start` of a network that agrees with this one (same `skip`) before `start`, the loss equals
    /// [`Model::forward`]'s exactly, at the cost of the layers from `start` on.
    pub fn forward_from(
        &self,
        tokens: &Tokens,
        start: usize,
        h_start: Arc<Vec<f32>>,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<f64> {
        let want = tokens.sequences * tokens.len * self.hidden_size();
        if start > self.num_layers() || h_start.len() != want {
            return Err(Error::invalid(format!(
                "forward_from: start layer {start} of {} with a hidden state of {} values (expected {want})",
                self.num_layers(),
                h_start.len()
            )));
        }
        self.runner
            .forward(self, tokens, skip, Some((start, h_start)), on_hidden)
    }

    /// Forward + backward: the loss and each decoder layer's gradient norm (skipped layers: 0), plus the
    /// embedding's, the final norm's and (untied) the lm_head's. With tied embeddings the shared matrix
    /// gets both contributions and is reported as `embed_tokens`; `lm_head` is `None`.
    pub fn grad_norms(&self, tokens: &Tokens, skip: &[usize]) -> Result<GradNorms> {
        self.grad_norms_observed(tokens, skip, None)
    }

    /// [`Model::grad_norms`], also handing the forward's hidden states to `on_hidden` as
    /// [`Model::forward`] does — one pass serves both the CKA capture and the gradient norms.
    pub fn grad_norms_observed(
        &self,
        tokens: &Tokens,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<GradNorms> {
        self.runner.grad_norms(self, tokens, skip, on_hidden)
    }

    /// [`Model::grad_norms_observed`] on device `dev`, recycling the buffers of `pool`.
    pub fn grad_norms_on<D: Device>(
        &self,
        dev: &D,
        pool: &mut Pool<D>,
        tokens: &Tokens,
        skip: &[usize],
        on_hidden: &mut dyn FnMut(usize, &D::Slice),
    ) -> Result<GradNorms> {
        let mut tape = self.build_tape(dev, std::mem::take(pool), tokens, skip, None)?;
        let mut run = |tape: &mut Tape<D>| -> Result<(f64, Vec<f64>)> {
            let loss = tape.forward(&self.weights, true, on_hidden)?;
            Ok((loss, tape.backward(&self.weights, self.num_layers() + 4)?))
        };
        let result = run(&mut tape);
        *pool = tape.into_pool();
        let (loss, sumsq) = result?;
        let n = self.num_layers();
        Ok(GradNorms {
            loss,
            per_layer: sumsq[..n].iter().map(|s| s.sqrt()).collect(),
            embed_tokens: sumsq[n].sqrt(),
            norm: sumsq[n + 1].sqrt(),
            lm_head: (!self.config.tie_word_embeddings).then(|| sumsq[n + 2].sqrt()),
        })
    }

    /// The tape for one batch. Parameter groups: layer l → l, embed_tokens → L, norm → L+1, lm_head → L+2,
    /// learned positions (GPT-2, OPT) → L+3.
    /// `start`: resume at that decoder layer from the given hidden state instead of embedding the tokens.
    fn build_tape<D: Device>(
        &self,
        dev: &D,
        pool: Pool<D>,
        tokens: &Tokens,
        skip: &[usize],
        start: Option<(usize, Arc<Vec<f32>>)>,
    ) -> Result<Tape<D>> {
        let c = &self.config;
        let (seqs, t) = (tokens.sequences, tokens.len);
        if seqs == 0 || t < 2 {
            return Err(Error::invalid(
                "a batch needs at least one sequence of at least 2 tokens",
            ));
        }
        if let Some((most, why)) = c.max_tokens.as_ref().filter(|&&(most, _)| t > most) {
            return Err(Error::invalid(format!(
                "sequences of {t} tokens: {why}, which the runtime does not compute; use sequences \
                 of at most {most} tokens"
            )));
        }
        if let Some(&l) = skip.iter().find(|&&l| l >= self.num_layers()) {
            return Err(Error::invalid(format!(
                "skip: layer {l} does not exist (the model has {} layers)",
                self.num_layers()
            )));
        }
        let n = seqs * t;
        let (h, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (heads, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let nl = self.num_layers();
        let (g_embed, g_norm, g_head, g_positions) = (nl, nl + 1, nl + 2, nl + 3);

        let targets = (0..n)
            .map(|r| {
                if r % t + 1 < t {
                    tokens.data[r + 1]
                } else {
                    -1
                }
            })
            .collect();
        let mut tape = Tape::on(dev.clone(), tokens.data.clone(), targets, pool);
        // The full-attention layers' rotary table and the sliding-window layers' (the same but for Gemma 3).
        // MLA rotates a part of `rope` values per head on its own.
        let rotated_head = c.mla.map_or(hd, |m| m.rope);
        let ropes = [false, true].map(|sliding| {
            let (inv_freq, rope_scale) = c.rope_frequencies(sliding, t);
            Arc::new(RopeTable::with_pairs(
                &inv_freq,
                rotated_head,
                t,
                rope_scale,
                c.rope_pairs,
            ))
        });
        let shape = AttnShape {
            seqs,
            tokens: t,
            heads,
            kv_heads: kv,
            head_dim: hd,
            window: None,
            scale: c.attn_scale,
            softcap: c.attn_softcap,
            alibi: c.alibi,
        };

        let embed = tape.param(self.names.embed.clone(), g_embed, vocab * h);
        let (first, resumed) = (start.as_ref().map_or(0, |s| s.0), start.is_some());
        let mut x = tape.buffer("embed", n, h);
        match start {
            None => tape.push(op::Embedding {
                table: embed,
                scale: c.embed_scale,
                padding: c.pad_token_id,
                out: x,
            }),
            Some((_, data)) => tape.push(op::HiddenInput { data, out: x }),
        }
        // BLOOM normalises the embeddings (a LayerNorm with its bias, in the group of the learned
        // positions, which no norm reports).
        if let (Some(name), false) = (&self.names.embed_norm, resumed) {
            let w = tape.param(format!("{name}.weight"), g_positions, h);
            let b = tape.param(format!("{name}.bias"), g_positions, h);
            let y = tape.buffer("embed_norm", n, h);
            tape.push(op::Norm {
                x,
                w: Some(w),
                b: Some(b),
                shape: self.norm_shape(h),
                out: y,
            });
            x = y;
        }
        // GPT-2 and OPT add the learned embedding of each token's position (its gradient in a group of its
        // own, which no norm reports).
        if let (Some(p), Some(name), false) = (c.learned_positions, &self.names.positions, resumed)
        {
            if t > p.max_tokens {
                return Err(Error::invalid(format!(
                    "sequences of {t} tokens are longer than the model's {} learned positions",
                    p.max_tokens
                )));
            }
            let table = tape.param(name.clone(), g_positions, (p.max_tokens + p.offset) * h);
            let pos = tape.buffer("positions", n, h);
            tape.push(op::Positions {
                table,
                tokens: t,
                offset: p.offset,
                out: pos,
            });
            let sum = tape.buffer("embed_positions", n, h);
            tape.push(op::Add {
                a: x,
                b: pos,
                out: sum,
            });
            x = sum;
        }
        tape.mark(first, x);

        for l in first..nl {
            if !skip.contains(&l) {
                x = self.push_layer(&mut tape, l, x, n, shape, &ropes, inter);
            }
            tape.mark(l + 1, x);
        }

        let norm = c
            .layout
            .norm_weight()
            .then(|| tape.param(self.names.norm(), g_norm, h));
        let norm_bias = c
            .layout
            .norm_bias()
            .then(|| tape.param(self.names.norm_bias(), g_norm, h));
        let mut xn = tape.buffer("norm", n, h);
        tape.push(op::Norm {
            x,
            w: norm,
            b: norm_bias,
            shape: self.norm_shape(h),
            out: xn,
        });
        // Granite divides the logits by logits_scaling: scale the lm_head's input instead, the same
        // logits and gradients (it has no lm_head bias) for a buffer `hidden` wide, not `vocab`.
        if let Some(f) = c.logits_scale {
            debug_assert!(!c.lm_head_bias);
            xn = push_activate(
                &mut tape,
                xn,
                Activation::Scale(f),
                "norm_scaled".into(),
                n,
                h,
            );
        }
        let head = if c.tie_word_embeddings {
            embed
        } else {
            tape.param(self.names.lm_head.clone(), g_head, vocab * h)
        };
        let head_bias = c
            .lm_head_bias
            .then(|| tape.param(self.names.lm_head_bias(), g_head, vocab));
        let mut logits = tape.buffer("logits", n, vocab);
        tape.push(op::Linear {
            x: xn,
            w: head,
            b: head_bias,
            out: logits,
        });
        // Gemma 2 soft-caps the logits (the backward keeps the uncapped ones: one more [n, vocab] buffer).
        if let Some(cap) = c.final_softcap {
            let act = Activation::Softcap(cap);
            logits = push_activate(&mut tape, logits, act, "logits_capped".into(), n, vocab);
        }
        let lse = tape.buffer("logits_lse", n, 1);
        tape.push(op::CrossEntropy { logits, lse });
        Ok(tape)
    }

    /// A norm of rows of `d` values under this config.
    fn norm_shape(&self, d: usize) -> NormShape {
        NormShape {
            d,
            eps: self.config.rms_norm_eps,
            offset: self.config.norm_offset,
            centre: self.config.layout.layer_norm(),
            groups: 1,
        }
    }

    /// Push decoder layer `l` reading the residual stream `x`; returns the layer's output buffer.
    #[allow(clippy::too_many_arguments)]
    fn push_layer<D: Device>(
        &self,
        tape: &mut Tape<D>,
        l: usize,
        x: BufId,
        n: usize,
        shape: AttnShape,
        ropes: &[Arc<RopeTable>; 2],
        inter: usize,
    ) -> BufId {
        let c = &self.config;
        let h = c.hidden_size;
        let rope = &ropes[c.sliding_layers.get(l).copied().unwrap_or(false) as usize];
        // A window spanning the whole sequence masks nothing: run such a layer as plain causal attention.
        let shape = AttnShape {
            window: c.layer_window(l).filter(|&w| w < shape.tokens),
            ..shape
        };
        let (qd, kvd) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let pre = self.names.layer(l);
        let linear =
            |tape: &mut Tape<D>, x: BufId, name: &str, inp: usize, out: usize, bias: bool| {
                let w = tape.param(format!("{pre}.{name}.weight"), l, out * inp);
                let b = bias.then(|| tape.param(format!("{pre}.{name}.bias"), l, out));
                let y = tape.buffer(format!("{pre}.{name}"), n, out);
                tape.push(op::Linear { x, w, b, out: y });
                y
            };
        // The norm `shape` of the rows of x (`width` a buffer row: shape.d = width, or head_dim for
        // Qwen3's per-head q_norm / k_norm; shape.groups rows of weights, one per head for Cohere's q/k
        // norms): RMSNorm, or GPT-NeoX's LayerNorm (with its bias where `bias`); with weights where the
        // layout's norms have them, but for Llama 4's q/k norms (`weight` false).
        let norm_rows = |tape: &mut Tape<D>,
                         x: BufId,
                         name: &str,
                         width: usize,
                         shape: NormShape,
                         (weight, bias): (bool, bool)| {
            let param = |tape: &mut Tape<D>, what| {
                tape.param(format!("{pre}.{name}.{what}"), l, shape.groups * shape.d)
            };
            let w = (weight && c.layout.norm_weight()).then(|| param(tape, "weight"));
            // A norm asked for without weights has a gain of 1.
            let shape = match weight {
                true => shape,
                false => NormShape {
                    offset: 1.0,
                    ..shape
                },
            };
            let b = bias.then(|| param(tape, "bias"));
            let y = tape.buffer(format!("{pre}.{name}"), n, width);
            tape.push(op::Norm {
                x,
                w,
                b,
                shape,
                out: y,
            });
            y
        };
        // The q/k norms' rows (Llama 4's only where the layer rotates) and their (weight, bias).
        let weightless = c.qk_norm == QkNorm::Weightless;
        let qk_rows = c
            .qk_norm_rows()
            .filter(|_| !weightless || c.rotary_layers[l]);
        let qk_params = (!weightless, false);
        // With `groups` rows of weights.
        let grouped_shape = |(d, groups)| NormShape {
            groups,
            ..self.norm_shape(d)
        };
        let norm = |tape: &mut Tape<D>, x: BufId, name: &str, width: usize, d: usize| {
            norm_rows(
                tape,
                x,
                name,
                width,
                self.norm_shape(d),
                (true, c.layout.norm_bias()),
            )
        };
        // x + branch, the branch × Granite's residual_multiplier first.
        let add = |tape: &mut Tape<D>, a: BufId, mut b: BufId, name: &str| {
            if let Some(f) = c.residual_scale {
                let scaled = format!("{pre}.{name}.scaled");
                b = push_activate(tape, b, Activation::Scale(f), scaled, n, h);
            }
            let out = tape.buffer(format!("{pre}.{name}"), n, h);
            tape.push(op::Add { a, b, out });
            out
        };

        // [before the attention, before the MLP, on the attention's output, on the MLP's output].
        let [norm_in, norm_mlp_in, norm_attn_out, norm_mlp_out] =
            c.layout.norm_names(c.block_norms);
        let maybe_norm = |tape: &mut Tape<D>, x: BufId, name: Option<&str>| match name {
            Some(name) => norm(tape, x, name, h, h),
            None => x,
        };
        let a = maybe_norm(tape, x, norm_in);
        // Column blocks of x gathered into a buffer `width` wide.
        let gather = |tape: &mut Tape<D>, x: BufId, name: &str, blocks, width| {
            let out = tape.buffer(format!("{pre}.{name}"), n, width);
            tape.push(op::Columns { x, blocks, out });
            out
        };
        // The rotary embedding of `heads` heads of x (none with learned positions, GPT-2's and OPT's,
        // nor in SmolLM3's NoPE layers).
        let rotate = |tape: &mut Tape<D>, x: BufId, heads: usize, name: &str, width: usize| {
            if !c.rotary_layers[l] {
                return x;
            }
            let out = tape.buffer(format!("{pre}.{name}"), n, width);
            tape.push(op::Rope {
                x,
                heads,
                table: rope.clone(),
                out,
            });
            out
        };
        // MiniCPM 5 MoE's query and gate come out of one projection, each head's query then its gate.
        let q_gate = (c.attention_output_gate == Some(OutputGate::WithQuery))
            .then(|| linear(tape, a, "self_attn.q_gate_proj", h, 2 * qd, c.qkv_bias));
        let (q, k, v) = match c.layout.grouped_qkv() {
            // DeepSeek's latent attention: q, k rotated, v padded to the query's width.
            _ if c.mla.is_some() => {
                let mla = c.mla.expect("checked");
                let (heads, dq) = (shape.heads, shape.head_dim);
                let (nope, r, kl) = (mla.nope, mla.rope, mla.kv_lora_rank);
                let latent_norm = |tape: &mut Tape<D>, x: BufId, name: &str, d: usize| {
                    let shape = NormShape {
                        eps: MLA_NORM_EPS,
                        ..self.norm_shape(d)
                    };
                    norm_rows(tape, x, name, d, shape, (true, false))
                };
                let q = match mla.q_lora_rank {
                    Some(ql) => {
                        let qa = linear(tape, a, "self_attn.q_a_proj", h, ql, c.qkv_bias);
                        let qa = latent_norm(tape, qa, "self_attn.q_a_layernorm", ql);
                        linear(tape, qa, "self_attn.q_b_proj", ql, qd, false)
                    }
                    None => linear(tape, a, "self_attn.q_proj", h, qd, false),
                };
                let kv_a = "self_attn.kv_a_proj_with_mqa";
                let kv_a = linear(tape, a, kv_a, h, kl + r, c.qkv_bias);
                let blocks = |block, stride, offset| ColumnBlocks {
                    block,
                    stride,
                    offset,
                };
                let latent = gather(tape, kv_a, "self_attn.kv_latent", blocks(kl, kl + r, 0), kl);
                let latent = latent_norm(tape, latent, "self_attn.kv_a_layernorm", kl);
                let kv_width = heads * (nope + mla.v);
                let kv = linear(tape, latent, "self_attn.kv_b_proj", kl, kv_width, false);
                let k_nope = blocks(nope, nope + mla.v, 0);
                let k_nope = gather(tape, kv, "self_attn.k_nope", k_nope, heads * nope);
                let v = blocks(mla.v, nope + mla.v, nope);
                let v = gather(tape, kv, "self_attn.v", v, heads * mla.v);
                let q_nope = gather(
                    tape,
                    q,
                    "self_attn.q_nope",
                    blocks(nope, dq, 0),
                    heads * nope,
                );
                let q_rot = gather(tape, q, "self_attn.q_pe", blocks(r, dq, nope), heads * r);
                let k_rot = gather(tape, kv_a, "self_attn.k_pe", blocks(r, kl + r, kl), r);
                let q_rot = rotate(tape, q_rot, heads, "self_attn.q_pe_rope", heads * r);
                let k_rot = rotate(tape, k_rot, 1, "self_attn.k_pe_rope", r);
                let place = |tape: &mut Tape<D>, parts, name: &str| {
                    let out = tape.buffer(format!("{pre}.{name}"), n, qd);
                    tape.push(op::Place { parts, out });
                    out
                };
                let q = vec![(q_nope, blocks(nope, dq, 0)), (q_rot, blocks(r, dq, nope))];
                let q = place(tape, q, "self_attn.q");
                // The shared rotary key, once per head.
                let k_rot = (0..heads).map(|g| (k_rot, blocks(r, qd, g * dq + nope)));
                let k = std::iter::once((k_nope, blocks(nope, dq, 0)));
                let k = place(tape, k.chain(k_rot).collect(), "self_attn.k");
                let v = match mla.v == dq {
                    true => v,
                    false => place(tape, vec![(v, blocks(mla.v, dq, 0))], "self_attn.v_padded"),
                };
                (q, k, v)
            }
            // Groups side by side in one projection, each its share of q, k and v (per key/value group,
            // its heads / kv_heads queries, its key and its value: GPT-NeoX one query each, Falcon-7B
            // one group; CodeGen's 4 shards of q, v, k): gather each.
            Some(fused) => {
                let qkv = linear(tape, a, fused, h, qd + 2 * kvd, c.qkv_bias);
                let (groups, order) = c.layout.qkv_groups(shape.kv_heads);
                let widths = [qd / groups, kvd / groups, kvd / groups];
                let stride = widths.iter().sum();
                let module = fused.rsplit_once('.').map_or(fused, |m| m.0);
                let [q, k, v] =
                    [("q", 0, qd), ("k", 1, kvd), ("v", 2, kvd)].map(|(name, part, width)| {
                        let before = order.iter().take_while(|&&p| p != part);
                        let blocks = ColumnBlocks {
                            block: widths[part],
                            stride,
                            offset: before.map(|&p| widths[p]).sum(),
                        };
                        gather(tape, qkv, &format!("{module}.{name}"), blocks, width)
                    });
                (q, k, v)
            }
            None => {
                let [qn, kn, vn] = c.layout.qkv_proj();
                let mut q = match q_gate {
                    Some(qg) => gather(
                        tape,
                        qg,
                        "self_attn.q",
                        query_gate_blocks(shape.head_dim, false),
                        qd,
                    ),
                    None => linear(tape, a, qn, h, qd, c.qkv_bias),
                };
                let mut k = linear(tape, a, kn, h, kvd, c.qkv_bias);
                let v = linear(tape, a, vn, h, kvd, c.qkv_bias);
                // No family's q/k norms have a bias (Cohere's and StableLM's LayerNorms included).
                if let Some([q_rows, k_rows]) = qk_rows.filter(|_| !c.qk_norm_after_rope) {
                    q = norm_rows(tape, q, QK_NORMS[0], qd, grouped_shape(q_rows), qk_params);
                    k = norm_rows(tape, k, QK_NORMS[1], kvd, grouped_shape(k_rows), qk_params);
                }
                (q, k, v)
            }
        };
        // OLMo's and OLMoE's clip_qkv: q, k and v clamped (after OLMoE's q/k norms).
        let (q, k, v) = match c.clip_qkv {
            None => (q, k, v),
            Some(clip) => {
                let clamp = |tape: &mut Tape<D>, x: BufId, name: &str, width: usize| {
                    let name = format!("{pre}.self_attn.{name}_clipped");
                    push_activate(tape, x, Activation::Clamp(clip), name, n, width)
                };
                (
                    clamp(tape, q, "q", qd),
                    clamp(tape, k, "k", kvd),
                    clamp(tape, v, "v", kvd),
                )
            }
        };
        // The rotary embedding of q and k (MLA's are rotated).
        let (mut qr, mut kr) = match c.mla {
            Some(_) => (q, k),
            None => (
                rotate(tape, q, shape.heads, "q_rope", qd),
                rotate(tape, k, shape.kv_heads, "k_rope", kvd),
            ),
        };
        // HunYuan normalises the rotated q and k.
        if let Some([q_rows, k_rows]) = qk_rows.filter(|_| c.qk_norm_after_rope) {
            qr = norm_rows(tape, qr, QK_NORMS[0], qd, grouped_shape(q_rows), qk_params);
            kr = norm_rows(tape, kr, QK_NORMS[1], kvd, grouped_shape(k_rows), qk_params);
        }
        let att = tape.buffer(format!("{pre}.attn"), n, qd);
        let lse = tape.buffer(
            format!("{pre}.attn_lse"),
            shape.seqs * shape.heads,
            shape.tokens,
        );
        let sinks = c.attention_sinks.then(|| {
            let name = format!("{}.self_attn.sinks", self.names.layer(l));
            tape.param(name, l, shape.heads)
        });
        tape.push(op::Attention {
            q: qr,
            k: kr,
            v,
            shape,
            sinks,
            out: att,
            lse,
        });

        // A gated MLP `module` of intermediate size `inter` on `b`: down(act(gate b) ⊙ up b).
        // A gated MLP's projections under `module` (LLaMA's names; InternLM2's dense MLP has its own).
        let gated = |tape: &mut Tape<D>,
                     b: BufId,
                     module: &str,
                     [gate, up, down]: [&str; 3],
                     inter: usize| {
            let proj = |p: &str| format!("{module}.{p}");
            let gate = linear(tape, b, &proj(gate), h, inter, c.mlp_bias);
            let up = linear(tape, b, &proj(up), h, inter, c.mlp_bias);
            let act = push_activate(
                tape,
                gate,
                c.activation,
                format!("{pre}.{module}.act"),
                n,
                inter,
            );
            let m = tape.buffer(format!("{pre}.{module}.mul"), n, inter);
            tape.push(op::Mul {
                a: act,
                b: up,
                out: m,
            });
            linear(tape, m, &proj(down), inter, h, c.mlp_bias)
        };
        const LLAMA_GATED: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
        // The MLP of its (normed) input `b`: gated (LLaMA), up → act → down (GPT-NeoX, Phi), or the
        // sparse mixture of experts (+ Qwen2-MoE's gated shared expert).
        let mlp = |tape: &mut Tape<D>, b: BufId| {
            let out = match (
                c.layout.plain_mlp(),
                c.moe.as_ref().filter(|m| m.is_sparse(l)),
            ) {
                (Some((up, down)), _) => {
                    let up = linear(tape, b, up, h, inter, c.mlp_bias);
                    let name = format!("{pre}.mlp.act");
                    let act = match c.mlp_xielu {
                        true => {
                            let out = tape.buffer(name, n, inter);
                            let scalar = |tape: &mut Tape<D>, p: &str| {
                                tape.param(format!("{pre}.mlp.act_fn.{p}"), l, 1)
                            };
                            let alpha_p = scalar(tape, "alpha_p");
                            let alpha_n = scalar(tape, "alpha_n");
                            tape.push(op::Xielu {
                                x: up,
                                alpha_p,
                                alpha_n,
                                consts: self.xielu[l],
                                out,
                            });
                            out
                        }
                        false => push_activate(tape, up, c.activation, name, n, inter),
                    };
                    linear(tape, act, down, inter, h, c.mlp_bias)
                }
                (None, Some(moe)) => {
                    let module = format!("{pre}.{}", moe.prefix);
                    // GPT-OSS's router and experts have biases.
                    let oss = moe.oss;
                    let logits = linear(
                        tape,
                        b,
                        &format!("{}.gate", moe.prefix),
                        h,
                        moe.experts,
                        oss.is_some(),
                    );
                    let experts = (0..moe.experts)
                        .map(|e| {
                            let [gate, up, down] = moe.projections.map(|p| {
                                let name = format!("{module}.experts.{e}.{p}.weight");
                                tape.param(name, l, moe.inter * h)
                            });
                            // Gate, up and down: biases of inter, inter and hidden values.
                            let bias = oss.map(|_| {
                                std::array::from_fn(|k| {
                                    let p = moe.projections[k];
                                    let name = format!("{module}.experts.{e}.{p}.bias");
                                    tape.param(name, l, [moe.inter, moe.inter, h][k])
                                })
                            });
                            Expert {
                                gate,
                                up,
                                down,
                                bias,
                            }
                        })
                        .collect();
                    let out = tape.buffer(format!("{module}.experts"), n, h);
                    tape.push(SparseMoe {
                        x: b,
                        logits,
                        experts,
                        top_k: moe.top_k,
                        normalise: moe.normalise,
                        router: self.routers[l].clone(),
                        act: match oss {
                            Some(o) => Activation::OssGate {
                                alpha: o.alpha,
                                limit: o.limit,
                            },
                            None => c.activation,
                        },
                        up_act: oss.map(|o| Activation::ClampPlusOne(o.limit)),
                        inter: moe.inter,
                        input_scaled: moe.input_scaled,
                        out,
                    });
                    let Some(s) = &moe.shared else {
                        return maybe_norm(tape, out, norm_mlp_out);
                    };
                    let mut shared = gated(tape, b, s.module, LLAMA_GATED, s.inter);
                    // Qwen2-MoE's gate on the shared expert: × σ(shared_expert_gate · x).
                    if s.gated {
                        let gate = format!("{}_gate", s.module);
                        let g = linear(tape, b, &gate, h, 1, false);
                        let name = format!("{pre}.{gate}.sigmoid");
                        let g = push_activate(tape, g, Activation::Sigmoid, name, n, 1);
                        let gated_shared = tape.buffer(format!("{pre}.{}.gated", s.module), n, h);
                        tape.push(op::RowScale {
                            x: shared,
                            s: g,
                            out: gated_shared,
                        });
                        shared = gated_shared;
                    }
                    let sum = tape.buffer(format!("{module}.out"), n, h);
                    tape.push(op::Add {
                        a: out,
                        b: shared,
                        out: sum,
                    });
                    sum
                }
                (None, None) => {
                    let (module, projections) = c.layout.gated_mlp();
                    gated(tape, b, module, projections, inter)
                }
            };
            maybe_norm(tape, out, norm_mlp_out)
        };
        // MLA's values padded to a query's width: their heads' first `v` values.
        let att = match c.mla.filter(|m| m.v != shape.head_dim) {
            Some(m) => {
                let blocks = ColumnBlocks {
                    block: m.v,
                    stride: shape.head_dim,
                    offset: 0,
                };
                gather(tape, att, "attn_values", blocks, c.attention_width())
            }
            None => att,
        };
        // The gate on the attention's output: × σ(g), per value; g AFMoE's gate_proj a or MiniCPM 5
        // MoE's gate columns of q_gate_proj a.
        let att = match c.attention_output_gate {
            Some(kind) => {
                let width = c.attention_width();
                let g = match (kind, q_gate) {
                    (OutputGate::WithQuery, Some(qg)) => gather(
                        tape,
                        qg,
                        "self_attn.gate",
                        query_gate_blocks(shape.head_dim, true),
                        qd,
                    ),
                    _ => linear(tape, a, "self_attn.gate_proj", h, width, false),
                };
                let name = format!("{pre}.self_attn.gate.sigmoid");
                let g = push_activate(tape, g, Activation::Sigmoid, name, n, width);
                let gated = tape.buffer(format!("{pre}.attn_gated"), n, width);
                tape.push(op::Mul {
                    a: att,
                    b: g,
                    out: gated,
                });
                gated
            }
            None => att,
        };
        let o = linear(
            tape,
            att,
            c.layout.o_proj(),
            c.attention_width(),
            h,
            c.o_bias,
        );
        let o = maybe_norm(tape, o, norm_attn_out);
        let x1 = add(tape, x, o, "resid_attn");
        // The MLP's input: the attention's normed input (the shared norm of Phi, StableLM, Cohere,
        // Falcon-7B), the block's input normed (GPT-NeoX's parallel residual, Falcon's ln_mlp), or x +
        // attn normed.
        let b = if c.block_norms == BlockNorms::Shared {
            a
        } else if c.layout.mlp_reads_input() {
            maybe_norm(tape, x, norm_mlp_in)
        } else {
            maybe_norm(tape, x1, norm_mlp_in)
        };
        let m = mlp(tape, b);
        add(tape, x1, m, "out")
    }
}

/// GPT-OSS and Llama 4: name each expert's projections (and GPT-OSS's biases) in a layer's fused
/// experts (`layer` its prefix), stored inputs first (`gate_up_proj` `[experts, hidden, 2 inter]`, gate
/// and up interleaved, GPT-OSS's columns 0, 2, … and 1, 3, …, or in halves, Llama 4's; `down_proj`
/// `[experts, inter, hidden]`; the biases `[experts, …]` alike), as the `[out, in]` weights the decoder
/// reads ([`Weights::strided_columns`]).
fn split_inputs_first_experts(
    weights: &mut Weights,
    m: &Moe,
    hidden: usize,
    layer: &str,
) -> Result<()> {
    let stored = |p: &str| format!("{layer}.{}.experts.{p}", m.prefix);
    let [gate, up, down] = m.projections;
    let (gate_cols, up_cols) = match m.fused {
        FusedExperts::InputsFirst { interleaved: true } => ((0, 2, m.inter), (1, 2, m.inter)),
        _ => ((0, 1, m.inter), (m.inter, 1, m.inter)),
    };
    let parts: &[(&str, &str)] = match m.oss {
        Some(_) => &[("weight", ""), ("bias", "_bias")],
        None => &[("weight", "")],
    };
    for e in 0..m.experts {
        let part = |p: &str, what: &str| format!("{layer}.{}.experts.{e}.{p}.{what}", m.prefix);
        for &(what, suffix) in parts {
            let gate_up = stored(&format!("gate_up_proj{suffix}"));
            let down_all = stored(&format!("down_proj{suffix}"));
            weights.strided_columns(&gate_up, e, gate_cols, &part(gate, what))?;
            weights.strided_columns(&gate_up, e, up_cols, &part(up, what))?;
            weights.strided_columns(&down_all, e, (0, 1, hidden), &part(down, what))?;
        }
    }
    Ok(())
}

/// The query's columns (`gate` false) or the gate's of MiniCPM 5 MoE's `q_gate_proj` output: each head's
/// `head_dim` query values, then its `head_dim` gate values.
fn query_gate_blocks(head_dim: usize, gate: bool) -> ColumnBlocks {
    ColumnBlocks {
        block: head_dim,
        stride: 2 * head_dim,
        offset: if gate { head_dim } else { 0 },
    }
}

/// HunYuan's q/k norms, stored under their own names.
const HUNYUAN_QK_NORMS: [(&str, &str); 2] = [
    (
        "self_attn.query_layernorm.weight",
        "self_attn.q_norm.weight",
    ),
    ("self_attn.key_layernorm.weight", "self_attn.k_norm.weight"),
];

/// Tensors (under a layer) a `model_type`'s checkpoints store under other names than the runtime
/// reads, as (stored, read): Granite MoE's hub names, as transformers' own conversion renames them
/// (the experts `[experts, 2 inter, hidden]` gate then up, the router, the shared MLP gate then up), and
/// the router as transformers 5 saves it. Absent names are skipped.
/// A pruned checkpoint keeps the stored names (it copies the files' tensors).
fn renamed_tensors(model_type: &str) -> &'static [(&'static str, &'static str)] {
    match model_type {
        "granitemoe" | "granitemoeshared" | "granitemoe_swa" => &[
            (
                "block_sparse_moe.input_linear.weight",
                "block_sparse_moe.experts.gate_up_proj",
            ),
            (
                "block_sparse_moe.output_linear.weight",
                "block_sparse_moe.experts.down_proj",
            ),
            (
                "block_sparse_moe.router.layer.weight",
                "block_sparse_moe.gate.weight",
            ),
            // transformers 5's name (Granite MoE SWA has no hub layout of its own).
            (
                "block_sparse_moe.router.weight",
                "block_sparse_moe.gate.weight",
            ),
            (
                "shared_mlp.input_linear.weight",
                "shared_mlp.gate_up_proj.weight",
            ),
            (
                "shared_mlp.output_linear.weight",
                "shared_mlp.down_proj.weight",
            ),
        ],
        "vaultgemma" => &[(
            "pre_feedforward_layernorm.weight",
            "post_attention_layernorm.weight",
        )],
        "hunyuan_v1_dense" => &HUNYUAN_QK_NORMS,
        "hunyuan_v1_moe" => &[
            HUNYUAN_QK_NORMS[0],
            HUNYUAN_QK_NORMS[1],
            ("mlp.gate.wg.weight", "mlp.gate.weight"),
        ],
        "gpt_oss" => &[
            ("mlp.router.weight", "mlp.gate.weight"),
            ("mlp.router.bias", "mlp.gate.bias"),
        ],
        // AFMoE's router and its four norms (read as GLM-4's: the attention's output norm first, then the
        // MLP's input norm takes its name).
        "afmoe" => &[
            ("mlp.router.gate.weight", "mlp.gate.weight"),
            (
                "post_attention_layernorm.weight",
                "post_self_attn_layernorm.weight",
            ),
            (
                "pre_mlp_layernorm.weight",
                "post_attention_layernorm.weight",
            ),
        ],
        // MiniCPM 5 MoE's fused query and gate (the hub's name).
        "minicpm5_moe" => &[("self_attn.q_proj.weight", "self_attn.q_gate_proj.weight")],
        // HY V3's hub names, as transformers' conversion renames them.
        "hy_v3" => &[
            ("mlp.router.gate.weight", "mlp.gate.weight"),
            ("mlp.expert_bias", "mlp.e_score_correction_bias"),
            (
                "mlp.shared_mlp.gate_proj.weight",
                "mlp.shared_experts.gate_proj.weight",
            ),
            (
                "mlp.shared_mlp.up_proj.weight",
                "mlp.shared_experts.up_proj.weight",
            ),
            (
                "mlp.shared_mlp.down_proj.weight",
                "mlp.shared_experts.down_proj.weight",
            ),
            (
                "mlp.e_score_correction_bias",
                "mlp.gate.e_score_correction_bias",
            ),
        ],
        // K-EXAONE's router bias sits beside the router (transformers' conversion moves it into it).
        "exaone_moe" => &[(
            "mlp.e_score_correction_bias",
            "mlp.gate.e_score_correction_bias",
        )],
        // Apertus's two norms.
        "apertus" => &[
            ("attention_layernorm.weight", "input_layernorm.weight"),
            (
                "feedforward_layernorm.weight",
                "post_attention_layernorm.weight",
            ),
        ],
        // HyperCLOVA X's output norms, read as GLM-4's.
        "hyperclovax" => &[
            ("post_norm1.weight", "post_self_attn_layernorm.weight"),
            ("post_norm2.weight", "post_mlp_layernorm.weight"),
        ],
        // Llama 4's MLP module (dense or a mixture) is `feed_forward`, its router `router`.
        "llama4_text" => &[
            ("feed_forward.router.weight", "mlp.gate.weight"),
            (
                "feed_forward.experts.gate_up_proj",
                "mlp.experts.gate_up_proj",
            ),
            ("feed_forward.experts.down_proj", "mlp.experts.down_proj"),
            (
                "feed_forward.shared_expert.gate_proj.weight",
                "mlp.shared_expert.gate_proj.weight",
            ),
            (
                "feed_forward.shared_expert.up_proj.weight",
                "mlp.shared_expert.up_proj.weight",
            ),
            (
                "feed_forward.shared_expert.down_proj.weight",
                "mlp.shared_expert.down_proj.weight",
            ),
            ("feed_forward.gate_proj.weight", "mlp.gate_proj.weight"),
            ("feed_forward.up_proj.weight", "mlp.up_proj.weight"),
            ("feed_forward.down_proj.weight", "mlp.down_proj.weight"),
        ],
        _ => &[],
    }
}

/// A router's correction bias, under its layer, and its shape (`None` for the plain softmax).
fn router_bias(m: &Moe) -> Option<(&'static str, Vec<usize>)> {
    match m.router {
        MoeRouter::Sigmoid { bias, .. } => Some((bias, vec![m.experts])),
        MoeRouter::SoftmaxBiased { bias } => Some((bias, vec![1, m.experts])),
        MoeRouter::Softmax | MoeRouter::SoftmaxGroups { .. } | MoeRouter::SigmoidTopK => None,
    }
}

/// The q and k norms as the decoder reads them (`self_attn.q_norm`, `self_attn.k_norm`).
const QK_NORMS: [&str; 2] = ["self_attn.q_norm", "self_attn.k_norm"];

/// StableLM 2 12B stores its q/k norms as a LayerNorm module per head
/// (`self_attn.{q,k}_layernorm.norms.{h}`): their modules' names, which `Model::load` stacks as
/// [`QK_NORMS`] (`[heads, head_dim]`, Cohere's form); `None` for the others.
/// MLA's linear layers (name, rows, columns, bias) and its latent norms (name, width): the query's
/// (low-rank through `q_a_proj`, `q_a_layernorm`, `q_b_proj`, else `q_proj`), the latent's
/// (`kv_a_proj_with_mqa`, `kv_a_layernorm`) and the heads' keys and values out of it (`kv_b_proj`).
#[allow(clippy::type_complexity)]
fn mla_tensors(
    c: &ModelConfig,
) -> (
    Vec<(&'static str, usize, usize, bool)>,
    Vec<(&'static str, usize)>,
) {
    let m = c.mla.expect("an MLA config");
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let qd = heads * c.head_dim;
    let (mut linears, mut norms) = match m.q_lora_rank {
        Some(ql) => (
            vec![
                ("self_attn.q_a_proj", ql, h, c.qkv_bias),
                ("self_attn.q_b_proj", qd, ql, false),
            ],
            vec![("self_attn.q_a_layernorm", ql)],
        ),
        None => (vec![("self_attn.q_proj", qd, h, false)], vec![]),
    };
    let kl = m.kv_lora_rank;
    linears.extend([
        ("self_attn.kv_a_proj_with_mqa", kl + m.rope, h, c.qkv_bias),
        ("self_attn.kv_b_proj", heads * (m.nope + m.v), kl, false),
    ]);
    norms.push(("self_attn.kv_a_layernorm", kl));
    (linears, norms)
}

fn per_head_qk_norms(c: &ModelConfig) -> Option<[&'static str; 2]> {
    (c.layout == BlockLayout::StableLm && c.qk_norm == QkNorm::HeadWeights)
        .then_some(["self_attn.q_layernorm.norms", "self_attn.k_layernorm.norms"])
}

/// Push `act(x)` into a new buffer `name` of `rows × cols`; returns the buffer.
fn push_activate<D: Device>(
    tape: &mut Tape<D>,
    x: BufId,
    act: Activation,
    name: String,
    rows: usize,
    cols: usize,
) -> BufId {
    let out = tape.buffer(name, rows, cols);
    tape.push(op::Activate { x, act, out });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tape tells the device each decoder layer's parameters one layer ahead, in the order the
    /// layers run: forward embed → 0 → 1 → … → norm → lm_head, backward the reverse; each layer's
    /// announcement lists exactly that layer's parameters. (A device streaming its weights relies on it.)
    #[test]
    fn parameters_are_announced_one_layer_ahead_in_both_directions() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_llama3_rope");
        let model = Model::load(&dir).unwrap();
        let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
        let tape = model
            .build_tape(&Cpu, Pool::default(), &tokens, &[], None)
            .unwrap();
        let nl = model.num_layers();
        let groups = |ps: &[usize]| -> Vec<usize> {
            let mut g: Vec<usize> = ps.iter().map(|&p| tape.params[p].group).collect();
            g.dedup();
            g
        };
        let io: Vec<_> = tape.ops.iter().map(|op| op.io()).collect();
        let forward: Vec<usize> = (0..tape.ops.len()).collect();
        let plan = tape.prefetch_plan(&io, &forward);
        let announced: Vec<usize> = plan.iter().flat_map(|(_, ps)| groups(ps)).collect();
        let mut expected = vec![nl]; // the embedding's group
        expected.extend(0..nl);
        expected.extend([nl + 1, nl + 2]); // final norm, untied lm_head
        assert_eq!(announced, expected);
        // Layer l is announced at the first op of the group before it, before any op of layer l runs.
        for w in plan.windows(2).skip(1) {
            let first_op_of_next = (0..tape.ops.len())
                .find(|&i| tape.ops[i].io().params.iter().any(|p| w[1].1.contains(p)))
                .unwrap();
            assert!(w[0].0 < first_op_of_next);
        }
        // Each announcement of a decoder layer names its 9 tensors (2 norms, q/k/v/o, gate/up/down).
        for (_, ps) in &plan[1..=nl] {
            assert_eq!(ps.len(), 9);
        }
        let backward: Vec<usize> = (0..tape.ops.len()).rev().collect();
        let announced: Vec<usize> = tape
            .prefetch_plan(&io, &backward)
            .iter()
            .flat_map(|(_, ps)| groups(ps))
            .collect();
        expected.reverse();
        assert_eq!(announced, expected);
    }

    /// Linear weights are announced as weights (a GPU may hold them in bf16), norms and the embedding as
    /// values; a tied embedding as both (the embedding reads the table, the lm_head multiplies by it).
    #[test]
    fn parameters_are_announced_with_how_the_ops_read_them() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (name, tied) in [("llama_llama3_rope", false), ("llama_bf16_tied", true)] {
            let dir = fixtures.join(name);
            let model = Model::load(&dir).unwrap();
            let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
            let tape = model
                .build_tape(&Cpu, Pool::default(), &tokens, &[], None)
                .unwrap();
            let io: Vec<_> = tape.ops.iter().map(|op| op.io()).collect();
            let uses = tape.param_uses(&io);
            let of = |n: &str| uses[tape.params.iter().position(|p| p.name == n).unwrap()];
            assert_eq!(of("model.layers.0.self_attn.q_proj.weight"), [false, true]);
            assert_eq!(of("model.layers.1.mlp.down_proj.weight"), [false, true]);
            assert_eq!(of("model.layers.0.input_layernorm.weight"), [true, false]);
            assert_eq!(of("model.norm.weight"), [true, false]);
            assert_eq!(of("model.embed_tokens.weight"), [true, tied], "{name}");
            if !tied {
                assert_eq!(of("lm_head.weight"), [false, true]);
            }
            // Every parameter is read some way.
            assert!(uses.iter().all(|u| u[0] || u[1]));
        }
    }
}
