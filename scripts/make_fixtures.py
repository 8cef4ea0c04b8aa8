#!/usr/bin/env python3
"""Build the runtime's test fixtures: tiny random LLaMA / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 1-3 /
OLMo 2 and 3 / SmolLM3 / StableLM / Cohere 1-2 / InternLM3 / GLM / GLM-4 /
EXAONE 4 / Falcon / OLMo 1 / ERNIE 4.5 / Helium / Seed-OSS / Arcee / Granite / StarCoder2 / GPT-NeoX / Phi / GPT-2 / GPT-BigCode / GPT-J / CodeGen / OPT checkpoints, mixture-of-experts ones (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE, GLM-4.5, MiniMax-M2, ERNIE 4.5, Llama 4), and two vision-language ones (Gemma 3, Mistral 3) whose language model the runtime reads, made with
Hugging Face
`transformers` from a config and a seed (no downloads), calibration tokens, and PyTorch's float64 reference
numbers (loss, per-layer gradient norms, per-layer hidden states).

    /work/venvs/torch/bin/python scripts/make_fixtures.py [--out tests/fixtures] [--only NAME ...]

Each fixture directory holds a checkpoint (config.json + safetensors), tokens.npy and reference.safetensors:
  hidden.{i}        f64 [sequences, tokens, hidden]: i = 0 embedding output (× Granite's embedding_multiplier:
                    what decoder layer 0 reads), i = l + 1 output of decoder
                    layer l (before the final norm), whole token set in one forward
  loss.b{k}         f64 [1]: mean next-token cross-entropy of batch k (batches of BATCH sequences)
  gradnorm.b{k}     f64 [layers]: sqrt(sum of squared gradients of the layer's parameters), batch k
  extra.b{k}        f64 [3]: gradient norms of embed_tokens, norm, lm_head (lm_head = -1 when tied; the tied
                    matrix's whole gradient is in embed_tokens)
  loss_skip1        f64 [1]: loss of the whole token set with decoder layer 1 removed
  loss_full_attention  f64 [1] (sliding-window fixtures only): loss of the whole token set, same weights,
                    every layer with plain causal attention (shows the window changes the result)
  loss_short        f64 [1] (LongRoPE fixtures only): loss of the first SHORT tokens of every sequence,
                    no longer than original_max_position_embeddings, so the short factors apply (the whole
                    sequences use the long ones)
The reference runs in float64 (model.double()) on the checkpoint's stored values (bf16/f16 weights are
rounded first, then computed in f64).
"""
import argparse
import copy
import functools
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file
import transformers

BATCH = 2
SEQS, TOKENS = 3, 16

FIXTURES = [
    # name, model_type, config overrides, weight dtype, options
    dict(name="llama_llama3_rope", model_type="llama", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                       low_freq_factor=1.0, high_freq_factor=8.0,
                                       original_max_position_embeddings=32)),
         old_config=True, seed=1),
    dict(name="llama_bf16_tied", model_type="llama", dtype=torch.bfloat16, token_dtype=np.int32,
         cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=2),
    dict(name="mistral_sharded", model_type="mistral", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=160, rms_norm_eps=1e-5, sliding_window=4096,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         shard="40KB", seed=3),
    # The two above as torch.save files: one pytorch_model.bin (bf16, the tied lm_head saved on the
    # embedding's storage, a rotary inv_freq buffer per layer), and four .bin shards with their index.
    dict(name="llama_torch_bin", model_type="llama", dtype=torch.bfloat16, token_dtype=np.int32,
         cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         torch_save=True, inv_freq=True, seed=2),
    dict(name="mistral_torch_sharded", model_type="mistral", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=160, rms_norm_eps=1e-5, sliding_window=4096,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         shard="40KB", torch_save=True, seed=3),
    dict(name="qwen2_f16_bias", model_type="qwen2", dtype=torch.float16, token_dtype=np.int64,
         cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=150, rms_norm_eps=1e-6, head_dim=8,
                  use_sliding_window=False,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         seed=4),
    # Sliding-window attention (window 5 < 16 tokens) on layers 1 and 2 only (max_window_layers 1); the
    # config is saved without `layer_types`, as 4.x-era Qwen2 checkpoints are, so the runtime derives the
    # sliding layers from max_window_layers the way transformers does.
    dict(name="qwen2_sliding", model_type="qwen2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6,
                  use_sliding_window=True, sliding_window=5, max_window_layers=1,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=True, full_attention_loss=True, seed=5),
    # Qwen3: RMSNorm over each head of q and k (q_norm, k_norm) before the rotary embedding; head_dim 16
    # with hidden 32 and 4 heads (q_proj 32 → 64), attention_bias on q/k/v/o, bf16, tied embeddings.
    dict(name="qwen3_qk_norm", model_type="qwen3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6,
                  attention_bias=True, tie_word_embeddings=True, use_sliding_window=False,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         seed=6),
    # Phi-3: fused qkv_proj and gate_up_proj, partial rotary (12 of 16 values per head), LongRoPE with
    # original_max_position_embeddings 8 < 16 tokens (the long factors; `loss_short` checks the short
    # ones on 8 tokens; attention_factor √(1 + ln 8 / ln 8)), a sliding window of 5 on every layer.
    dict(name="phi3_longrope", model_type="phi3", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, sliding_window=5,
                  max_position_embeddings=64, original_max_position_embeddings=8,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                       short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                       long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0])),
         full_attention_loss=True, short_loss=8, seed=7),
    # Gemma: embedding × √hidden, RMSNorm gains 1 + w, tanh-GELU gate, head_dim 16 ≠ 32 / 4, one KV head,
    # tied embeddings, pad_token_id 0 (its embedding row takes no gradient), bf16.
    dict(name="gemma_geglu", model_type="gemma", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=128, rms_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=8),
    # Gemma 3: sandwich norms (post-attention, pre/post-feedforward), per-head q/k norms (1 + w), scores
    # scaled by 1/√query_pre_attn_scalar (24 ≠ head_dim 16), sliding window 5 on the layers of
    # sliding_window_pattern 3 (layer_types dropped from config.json, as in 4.x-era checkpoints: layers
    # 0, 1, 3 sliding), their rotary base 10⁴, the full layer's 10⁶ with linear scaling ×4.
    dict(name="gemma3_sandwich", model_type="gemma3_text", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6,
                  query_pre_attn_scalar=24, sliding_window=5, sliding_window_pattern=3,
                  tie_word_embeddings=True, pad_token_id=0,
                  rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                          rope_theta=1000000.0),
                                   "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
         drop_layer_types=dict(sliding_window_pattern=3), full_attention_loss=True, seed=9),
    # Gemma 2: soft-capped attention scores (2.0) and logits (5.0), small enough to bite on random weights;
    # sandwich norms, 1/√query_pre_attn_scalar, a window of 5 on the even layers (layer_types dropped:
    # Gemma2Config alternates), bf16.
    dict(name="gemma2_softcap", model_type="gemma2", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6,
                  query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=2.0,
                  final_logit_softcapping=5.0, tie_word_embeddings=True, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=True, full_attention_loss=True, seed=10),
    # OLMo 2: norms after the attention and the MLP only (no input norms), q and k RMS-normalised over
    # the whole projection (64 and 32 wide), untied, pad_token_id left to the class default (1).
    dict(name="olmo2_post_norm", model_type="olmo2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
         seed=11),
    # Granite 3: LLaMA with multipliers: embeddings × 3, scores × 0.3 (not 1/√head_dim), each block's
    # attention and MLP outputs × 0.4 before the residual adds, logits / 2.5; tied, GQA, bf16.
    dict(name="granite_multipliers", model_type="granite", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.4,
                  logits_scaling=2.5, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=16),
    # Granite 3 MoE (granitemoe): Granite's multipliers (embeddings × 2, scores × 0.25, residual branches
    # × 0.5, logits / 1.5) with a mixture of 5 experts on every layer, the top 2 softmaxed among
    # themselves (renormalised), stored as the hub's block_sparse_moe.input_linear [experts, 2 inter,
    # hidden] (gate then up), output_linear and router.layer; untied, f32.
    dict(name="granitemoe_experts", model_type="granitemoe", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, num_local_experts=5,
                  num_experts_per_tok=2, embedding_multiplier=2.0, attention_multiplier=0.25,
                  residual_multiplier=0.5, logits_scaling=1.5, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=70),
    # Granite 4 MoE's shared expert (granitemoeshared): as above with a shared MLP of 40
    # (shared_mlp.input_linear [2 × 40, hidden], output_linear) added to the mixture's output; 4 experts,
    # top 2, q/k/v/o biases, tied, bf16.
    dict(name="granitemoeshared_shared_mlp", model_type="granitemoeshared", dtype=torch.bfloat16,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-5, num_local_experts=4,
                  num_experts_per_tok=2, shared_intermediate_size=40, attention_bias=True,
                  tie_word_embeddings=True, embedding_multiplier=4.0, attention_multiplier=0.2,
                  residual_multiplier=0.3, logits_scaling=2.0, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=71),
    # Granite SWA (granite_swa): Granite's multipliers, a learned sink logit per head in every softmax
    # (self_attn.sinks), a window of 5 on every layer but each 4th (layer_types dropped from config.json:
    # the class's pattern, layer 0 full), the rotary θ per layer (layer_rope_theta: 10⁴ on the full layer,
    # none on layer 1, 5·10⁵ on the other windowed ones); GQA, MLP biases, tied (the class default), f32.
    dict(name="granite_swa_sinks", model_type="granite_swa", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, sliding_window=5,
                  mlp_bias=True, embedding_multiplier=2.0, attention_multiplier=0.3,
                  residual_multiplier=0.6, logits_scaling=1.5, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, layer_rope_theta=[10000.0, 0.0, 500000.0, 500000.0],
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=True, full_attention_loss=True, seed=72),
    # Granite MoE SWA (granitemoe_swa): GraniteMoeShared's mixture (4 experts, top 2, a shared MLP of 24)
    # with Granite SWA's sinks and windows (6, on layers 0 and 2 by layer_types); bf16, untied.
    dict(name="granitemoe_swa_sinks", model_type="granitemoe_swa", dtype=torch.bfloat16,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, num_local_experts=4,
                  num_experts_per_tok=2, shared_intermediate_size=24, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  embedding_multiplier=3.0, attention_multiplier=0.25, residual_multiplier=0.5,
                  logits_scaling=2.0, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=73),
    # GPT-OSS (gpt_oss): a learned sink logit per head, a window of 5 on the even layers (layer_types
    # dropped: the class's pattern), YaRN × 32 with truncate false and θ 1.5·10⁵ (rope_parameters dropped:
    # the class's), q/k/v/o biases; every MLP a mixture of 4 experts stored fused and inputs first
    # (mlp.experts.gate_up_proj [experts, hidden, 2 inter], gate and up interleaved, with biases), the
    # router with a bias, top 2 softmaxed among themselves, the clamped SwiGLU with a limit of 1.5 (so
    # that the clamps bite on random weights); untied, f32.
    dict(name="gpt_oss_sinks", model_type="gpt_oss", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5,
                  num_local_experts=4, num_experts_per_tok=2, sliding_window=5, swiglu_limit=1.5,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
         drop_layer_types=True, drop_keys=["rope_parameters"], full_attention_loss=True, seed=74),
    # Qwen3 with block-scaled FP8 projections (transformers' fine-grained FP8, DeepSeek-V3's and Qwen3-FP8's
    # format): every q/k/v/o and gate/up/down weight e4m3 with a `_scale_inv` per block of 16 × 16 (f32),
    # quantization_config quant_method fp8; the rest bf16, tied.
    dict(name="qwen3_fp8_blocks", model_type="qwen3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         fp8_block=(16, 16), seed=75),
    # HunYuan dense (hunyuan_v1_dense: Hunyuan 0.5B–7B): LLaMA with per-head q/k RMSNorms on the rotated
    # q and k (self_attn.query_layernorm / key_layernorm), NTK-alpha rope ("dynamic" with alpha 50: a
    # fixed θ × 50^(d/(d−2))), q/k/v/o biases, pad 0 (the class default), untied.
    dict(name="hunyuan_dense_ntk_alpha", model_type="hunyuan_v1_dense", dtype=torch.float32,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5,
                  attention_bias=True,
                  rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, alpha=50.0, factor=1.0)),
         seed=76),
    # HunYuan MoE (hunyuan_v1_moe: Hunyuan-A13B): HunYuan's attention (q/k norms after the rotary
    # embedding, NTK-alpha rope), every MLP a mixture of 4 experts of intermediate_size (hub names per
    # expert), the softmax's top 2 renormalised (moe_topk as a per-layer list of one value), a shared
    # MLP (mlp.shared_mlp) on every token, the router mlp.gate.wg; bf16, untied.
    dict(name="hunyuan_moe_shared", model_type="hunyuan_v1_moe", dtype=torch.bfloat16,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5, num_experts=4,
                  moe_topk=[2, 2, 2],
                  rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, alpha=20.0, factor=1.0)),
         seed=78),
    # Llama 4 (llama4_text: Llama 4 Scout's and Maverick's language model): MLPs named feed_forward, a
    # mixture on the odd layers (interleave_moe_layer_step 2, as Maverick's) of 4 experts stored fused and
    # inputs first (gate_up_proj [experts, hidden, 2 inter], gate and up in halves), the top 2 logits each
    # weighting its token's input to the expert by σ, a shared expert of intermediate_size; dense layers
    # of intermediate_size_mlp; interleaved rotary pairs, llama3 scaling, no rotary embedding on layer 2
    # (no_rope_layer_interval 3), q and k RMS-normalised without weights after the rotation on the rotary
    # layers; no_rope_layers, moe_layers and layer_types dropped (the class derives them); bf16, untied.
    dict(name="llama4_moe_nope", model_type="llama4_text", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=24, intermediate_size_mlp=40, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2,
                  interleave_moe_layer_step=2, no_rope_layer_interval=3, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)),
         drop_keys=["no_rope_layers", "moe_layers", "layer_types"], seed=80),
    # HyperCLOVA X (hyperclovax: HyperCLOVAX-SEED-Think-14B): Granite's multipliers (the logits × logits_scaling,
    # not ÷) with RMSNorms on the attention's and the MLP's outputs (post_norm1, post_norm2: use_post_norm),
    # attention_multiplier dropped (the class's 1/√head_dim); bf16, untied.
    dict(name="hyperclovax_peri_norms", model_type="hyperclovax", dtype=torch.bfloat16,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6,
                  embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=0.25, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_keys=["attention_multiplier"], seed=82),
    # EXAONE MoE (exaone_moe: K-EXAONE): EXAONE 4's attention (per-head q/k norms before the rotary
    # embedding, a window of 6 on the even layers with the rotary embedding on those only) in a pre-norm
    # block, DeepSeek-V3's mixture from layer 2 on (first_k_dense_replace 2; mlp_layer_types and
    # layer_types dropped: the class derives them): 8 experts in 2 groups keeping 1, σ + the correction
    # bias, the top 2 renormalised × 2.5, one shared expert; bf16, untied.
    dict(name="exaone_moe_window", model_type="exaone_moe", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5,
                  moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  routed_scaling_factor=2.5, num_shared_experts=1, first_k_dense_replace=2,
                  sliding_window=6, sliding_window_pattern=2, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         drop_keys=["mlp_layer_types", "layer_types"], full_attention_loss=True, seed=83),
    # AFMoE (afmoe: Arcee Trinity): q/k norms per head, the rotary embedding and a window of 6 on the
    # sliding layers only (every 2nd layer full: global_attn_every_n_layers 2; layer_types dropped), the
    # attention's output × σ(gate_proj x), four norms (post_attention_layernorm on the attention's output,
    # pre_mlp_layernorm before the MLP), embeddings × √hidden (mup_enabled); layer 0 dense, then a mixture
    # of 8 experts: σ + mlp.expert_bias choosing the top 2, their σ renormalised × 2, one shared expert;
    # bf16, untied.
    dict(name="afmoe_gated_window", model_type="afmoe", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
                  num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  rms_norm_eps=1e-5, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                  route_scale=2.0, global_attn_every_n_layers=2, sliding_window=6, mup_enabled=True,
                  pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_keys=["layer_types"], full_attention_loss=True, seed=84),
    # Apertus (apertus: Apertus 8B / 70B): per-head q/k norms, the MLP up → xIELU → down with xIELU's two
    # learned scalars per layer (mlp.act_fn.alpha_p, alpha_n; random here, so that their gradients are
    # checked) and its beta and eps buffers, its norms named attention_layernorm and feedforward_layernorm,
    # llama3 rope (the class's default: rope_parameters dropped), pad 3 (the class's); bf16, untied.
    dict(name="apertus_xielu", model_type="apertus", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64),
         drop_keys=["rope_parameters"], seed=85),
    # HY V3 (hy_v3): Apertus's attention (per-head q/k norms) in LLaMA's block, layer 0 dense (the class's
    # mlp_layer_types), then a mixture of 8 experts: σ + the correction bias choosing the top 2, σ
    # renormalised × router_scaling_factor, one shared expert; saved under the hub's names
    # (mlp.router.gate, mlp.expert_bias, mlp.shared_mlp); bf16, untied.
    dict(name="hy_v3_moe", model_type="hy_v3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  rms_norm_eps=1e-5, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                  router_scaling_factor=2.5, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_keys=["mlp_layer_types"], seed=86),
    # MiniCPM 5 MoE (minicpm5_moe): LLaMA's attention whose query projection (the hub's q_proj, transformers'
    # q_gate_proj) also gives each head a gate, the output × σ(gate) before o_proj; layer 0 dense
    # (mlp_layer_types dropped: the class's first_k_dense_replace 1), then DeepSeek-V3's mixture of 8
    # experts in 2 groups keeping 1, σ + the correction bias, the top 2 renormalised × 3.66, one shared
    # expert; 2 key/value heads (the class's); bf16, untied.
    dict(name="minicpm5_moe_gated", model_type="minicpm5_moe", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, head_dim=8, vocab_size=128, rms_norm_eps=1e-6,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  rope_parameters=dict(rope_type="default", rope_theta=5000000.0)),
         drop_keys=["mlp_layer_types", "num_key_value_heads"], seed=87),
    # GPT-Neo: GPT-2's block (LayerNorms with biases, learned positions, tied) with unscaled attention
    # scores, separate q/k/v without biases and an out_proj with one (attn.attention.*), Linear
    # c_fc/c_proj, tanh-GELU; a local window of 5 on layer 1 (attention_types: global, local, global).
    dict(name="gpt_neo_local", model_type="gpt_neo", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, vocab_size=128,
                  max_position_embeddings=32, window_size=5, layer_norm_epsilon=1e-5,
                  attention_types=[[["global", "local"], 1], [["global"], 1]], bos_token_id=1, eos_token_id=2),
         seed=79),
    # VaultGemma: Gemma 2's attention (soft-capped scores and logits, query_pre_attn_scalar 16, a window
    # of 5 on the even layers: layer_types dropped, the class's pattern) in LLaMA's pre-norm block, the
    # MLP's norm named pre_feedforward_layernorm; GeGLU, gains 1 + w, tied, bf16.
    dict(name="vaultgemma_pre_norms", model_type="vaultgemma", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6, sliding_window=5,
                  query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=True, full_attention_loss=True, seed=77),
    # OLMo 3: OLMo 2's post-norms and whole-projection q/k norms, a window of 5 on every layer but each
    # 4th (layer_types dropped from config.json: OlmoConfig's pattern, layers 0-2 sliding, 3 full); YaRN
    # (×4 from 64 tokens, head_dim 16, θ 5·10⁵: the ramp between frequency indices 0 and 2, cos/sin ×
    # 1.139) on the full-attention layer only. Written in the 4.x form the hub's Olmo-3 configs have: top-level
    # rope_theta for both kinds, rope_scaling for the full-attention layers. bf16, untied.
    dict(name="olmo3_yarn_window", model_type="olmo3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6, sliding_window=5,
                  max_position_embeddings=256,
                  rope_parameters={"full_attention": dict(rope_type="yarn", rope_theta=500000.0, factor=4.0,
                                                          original_max_position_embeddings=64),
                                   "sliding_attention": dict(rope_type="default", rope_theta=500000.0)}),
         per_kind_old_config=True, drop_layer_types=True, full_attention_loss=True, reload=True, seed=26),
    # SmolLM3: LLaMA with no rotary embedding on each 2nd layer (no_rope_layer_interval 2; no_rope_layers
    # dropped from config.json, so it is derived: layers 1 and 3 NoPE), a window of 5 on those layers
    # (use_sliding_window, layer_types dropped too), dynamic NTK rope (×2 past max_position_embeddings 8
    # < 16 tokens: θ grows), tied (the class default), pad_token_id 0.
    dict(name="smollm3_nope", model_type="smollm3", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, pad_token_id=0,
                  no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5,
                  max_position_embeddings=8,
                  rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
         drop_layer_types=True, drop_keys=["no_rope_layers"], full_attention_loss=True, reload=True,
         seed=27),
    # StableLM 2 (1.6B-style): LLaMA's names and gated SiLU MLP with LayerNorms (biases), q/k/v biases
    # (use_qkv_bias), rotary on a quarter of each head (4 of 16 values), the attention and the MLP one
    # after the other; the 4.x config form (top-level partial_rotary_factor), bf16, untied.
    dict(name="stablelm_sequential", model_type="stablelm", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, use_qkv_bias=True,
                  use_parallel_residual=False,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
         old_config=True, reload=True, seed=28),
    # StableLM with the parallel residual: one LayerNorm shared by the attention and the MLP
    # (x + attn(ln x) + mlp(ln x)), no q/k/v biases, half of each head rotary.
    dict(name="stablelm_parallel", model_type="stablelm", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, use_parallel_residual=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
         seed=29),
    # StableLM 2 12B: the parallel residual, q and k LayerNorms (no bias) over each head, a module of its
    # own per head (self_attn.q_layernorm.norms.{h}: 4 for q, 2 for k), GQA, a quarter of each head
    # rotary; bf16.
    dict(name="stablelm_qk_layernorm", model_type="stablelm", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, use_parallel_residual=True,
                  qk_layernorm=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
         seed=52),
    # Cohere (Command R, Aya Expanse): one LayerNorm without a bias shared by the attention and the MLP
    # in parallel, the rotary embedding on interleaved pairs (2i, 2i + 1), logits × logit_scale 0.25,
    # tied (the class default), pad_token_id 0 (the default); the 4.x config form, bf16.
    dict(name="cohere_interleaved", model_type="cohere", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, logit_scale=0.25,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         old_config=True, reload=True, seed=30),
    # Cohere with use_qk_norm (Command R+): q and k LayerNorms (no bias) over each head, each head with
    # weights of its own ([heads, head_dim]: 4 for q, 2 for k), before the rotary embedding; f32.
    dict(name="cohere_qk_norm", model_type="cohere", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, logit_scale=0.5,
                  use_qk_norm=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=51),
    # Cohere 2 (Command R7B): Cohere's block, a window of 5 on the sliding layers and the rotary
    # embedding on those only (the full-attention layers are NoPE); layer_types dropped from config.json
    # and sliding_window_pattern 2 stated instead (layers 0, 2 sliding), logit_scale 0.5, f32.
    dict(name="cohere2_nope_window", model_type="cohere2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5, logit_scale=0.5,
                  sliding_window=5, sliding_window_pattern=2,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=dict(sliding_window_pattern=2), full_attention_loss=True, reload=True,
         seed=31),
    # InternLM3 (LlamaForCausalLM in transformers): head_dim 16 ≠ 32 / 4, biases on every projection
    # under the hub's names (qkv_bias, bias: InternLM3Config's attribute_map), dynamic NTK as the hub's
    # InternLM3-8B config has it (×6 past max_position_embeddings 8 < 16 tokens); the 4.x form, bf16.
    dict(name="internlm3_dynamic", model_type="internlm3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5,
                  attention_bias=True, mlp_bias=True, max_position_embeddings=8,
                  rope_parameters=dict(rope_type="dynamic", rope_theta=50000000.0, factor=6.0)),
         old_config=True, rename_keys=dict(attention_bias="qkv_bias", mlp_bias="bias"), reload=True,
         seed=32),
    # GLM (GLM-4-9B-chat-hf): the rotary embedding on interleaved pairs of the first half of each head
    # (partial_rotary_factor's default 0.5: 8 of 16 values), q/k/v biases (attention_bias's default
    # true) but none on o_proj, gate and up fused in mlp.gate_up_proj, head_dim 16 ≠ 32 / 4, untied.
    dict(name="glm_interleaved", model_type="glm", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1.5625e-07,
                  pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=33),
    # GLM-4 (GLM-4-9B-0414, GLM-4-32B-0414): GLM's attention and MLP with sandwich norms under its own
    # names (post_self_attn_layernorm, post_attention_layernorm before the MLP, post_mlp_layernorm),
    # no attention biases, bf16.
    dict(name="glm4_sandwich", model_type="glm4", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5, pad_token_id=0,
                  attention_bias=False,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=34),
    # EXAONE 4: OLMo 2's post-norms, per-head q/k RMSNorms, a window of 5 on the layers of
    # sliding_window_pattern 2 (layer_types dropped: layers 0 and 2) and the rotary embedding on those
    # only (the full-attention layers are NoPE), untied.
    dict(name="exaone4_window", model_type="exaone4", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, sliding_window=5,
                  sliding_window_pattern=2,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         drop_layer_types=dict(sliding_window_pattern=2), full_attention_loss=True, reload=True,
         seed=35),
    # Falcon-7B-style: multi-query (one key/value head: q of every head, then k, then v in
    # query_key_value), the attention and the MLP in parallel on one input_layernorm, exact-GELU MLP, no
    # biases, tied (the class defaults), bf16.
    dict(name="falcon_multi_query", model_type="falcon", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
                  layer_norm_epsilon=1e-5, multi_query=True, parallel_attn=True,
                  new_decoder_architecture=False, bias=False,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=36),
    # Falcon-40B/180B-style "new decoder architecture": 2 key/value groups of 2 query heads each
    # (query_key_value per group: q, q, k, v), the attention and the MLP on their own norms (ln_attn,
    # ln_mlp) in parallel, ffn_hidden_size 48, untied.
    dict(name="falcon_new_arch", model_type="falcon", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_kv_heads=2,
                  vocab_size=128, layer_norm_epsilon=1e-5, new_decoder_architecture=True,
                  ffn_hidden_size=48, bias=False, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=37),
    # Falcon's oldest block: q, k and v interleaved per head (multi_query false), the attention and the
    # MLP one after the other (parallel_attn false: input_layernorm, post_attention_layernorm), biases
    # on every projection.
    dict(name="falcon_sequential", model_type="falcon", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
                  layer_norm_epsilon=1e-5, multi_query=False, parallel_attn=False,
                  new_decoder_architecture=False, bias=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=38),
    # Falcon-RW: the oldest block with ALiBi in place of the rotary embedding; 6 heads, so the slopes run
    # over 4 (a power of two) and then the odd terms of the sequence for 8; bf16.
    dict(name="falcon_rw_alibi", model_type="falcon", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, vocab_size=128,
                  layer_norm_epsilon=1e-5, multi_query=False, parallel_attn=False,
                  new_decoder_architecture=False, bias=True, alibi=True),
         seed=45),
    # BLOOM: Falcon-RW's block (q, k and v per head, sequential, biases) with the tanh GELU, ALiBi on the
    # scaled scores (6 heads), a LayerNorm on the embeddings, tied; in the hub's layout (bigscience's
    # checkpoints were saved from BloomModel: `h.0.…`, `word_embeddings.weight`, no `transformer.`).
    dict(name="bloom_alibi", model_type="bloom", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=48, n_layer=3, n_head=6, vocab_size=128, layer_norm_epsilon=1e-5),
         bloom_hub_layout=True, seed=46),
    # MPT: LayerNorms without biases, q, k and v stacked in Wqkv and clamped to ±0.5 (clip_qkv: small
    # enough to bite on random weights), ALiBi over 6 heads, an exact-GELU MLP, no biases, tied.
    dict(name="mpt_alibi_clip", model_type="mpt", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(d_model=48, n_heads=6, n_layers=3, vocab_size=128, layer_norm_epsilon=1e-5,
                  attn_config=dict(alibi=True, clip_qkv=0.5)),
         reload=True, seed=47),
    # GPT-J: one LayerNorm shared by the attention and the MLP in parallel, the rotary embedding on
    # interleaved pairs of the first 8 of 12 values per head (rotary_dim), q/k/v/out without biases, an
    # MLP and lm_head with biases, untied; f16.
    dict(name="gptj_rotary_dim", model_type="gptj", dtype=torch.float16, token_dtype=np.int64,
         cfg=dict(n_embd=48, n_head=4, n_layer=3, vocab_size=128, rotary_dim=8, n_positions=64,
                  layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2),
         seed=48),
    # CodeGen: GPT-J's block with q, k and v fused in qkv_proj across 4 shards (each a quarter of the
    # queries, of the values, then of the keys: 2 of the 8 heads each), the rotary embedding on
    # interleaved pairs of the first 4 of 8 values per head, an MLP of 96, untied (the class default); f32.
    dict(name="codegen_shards", model_type="codegen", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(n_embd=64, n_head=8, n_layer=3, n_inner=96, vocab_size=128, rotary_dim=4,
                  n_positions=64, n_ctx=64, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2),
         seed=53),
    # GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's block and names with Linear projections ([out, in]),
    # multi-query (multi_query's default: c_attn holds every query, then the one key and value), the
    # tanh GELU (the class default), tied; bf16.
    dict(name="gpt_bigcode_mqa", model_type="gpt_bigcode", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(n_embd=48, n_head=4, n_layer=3, n_positions=64, vocab_size=128,
                  layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2),
         seed=49),
    # GPT-BigCode without multi_query: c_attn holds q, k and v per head; the exact GELU, unscaled scores
    # (scale_attn_weights false), an MLP of 40, untied; f32.
    dict(name="gpt_bigcode_mha", model_type="gpt_bigcode", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(n_embd=32, n_head=4, n_layer=3, n_inner=40, n_positions=64, vocab_size=128,
                  layer_norm_epsilon=1e-5, multi_query=False, activation_function="gelu",
                  scale_attn_weights=False, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2),
         seed=50),
    # OLMo (1): LayerNorms without weights or biases (eps 1e-5), q, k and v clamped to ±1.5
    # (clip_qkv, as OLMo-7B-0424's 8 on real weights: small enough to bite here), untied, pad 1.
    dict(name="olmo_clip_qkv", model_type="olmo", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  vocab_size=128, clip_qkv=1.5,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=39),
    # ERNIE 4.5 (0.3B): LLaMA's block with the rotary embedding on interleaved pairs (GLM's
    # rotate_half, the whole head), biases on every projection (use_bias), head_dim 16 ≠ 32 / 4, tied and
    # pad 0 (the class defaults), bf16.
    dict(name="ernie4_5_bias", model_type="ernie4_5", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5, use_bias=True,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
         seed=40),
    # Helium (Kyutai's Helium-1): LLaMA's block with interleaved rotary pairs, q/k/v biases
    # (attention_bias) but none on o_proj, RMSNorm eps 1e-8 (the class default), pad 3, untied.
    dict(name="helium_interleaved", model_type="helium", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, attention_bias=True,
                  rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
         seed=41),
    # Seed-OSS: LLaMA's block with q/k/v biases (attention_bias's default true), none on o_proj
    # (attention_out_bias), head_dim 16 ≠ 32 / 4, pad 1 (the defaults), bf16, untied.
    dict(name="seed_oss_bias", model_type="seed_oss", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type="default", rope_theta=10000000.0)),
         seed=42),
    # Arcee (AFM-4.5B): LLaMA's attention and RMSNorms with a plain MLP up_proj → ReLU² → down_proj;
    # YaRN on every layer (×4 from 8 tokens, head_dim 8: the ramp over every frequency), GQA, untied.
    dict(name="arcee_relu2", model_type="arcee", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=32,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                       original_max_position_embeddings=8)),
         seed=43),
    # InternLM2 / InternLM2.5 (remote code: transformers has no class for it, so the model is LLaMA, the
    # same network, and the checkpoint is rewritten in InternLM2's names, its per-group fused wqkv and its
    # 4.x config): GQA (2 queries per key/value head), biases on wqkv and wo (`bias`), dynamic NTK from
    # 8 positions (the sequences are 16), bf16, untied, pad_token_id 2.
    dict(name="internlm2_wqkv", model_type="llama", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=8,
                  attention_bias=True, pad_token_id=2,
                  rope_parameters=dict(rope_type="dynamic", rope_theta=1000000.0, factor=2.0)),
         internlm2=True, seed=44),
    # Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, tiny vision tower): the hub layout (model.…, visual.…,
    # lm_head), config.json rewritten flat as the hub's 4.x configs are (text fields at the top level,
    # rope_scaling {"type": "mrope"}); untied; on text alone its language model is Qwen2's.
    dict(name="qwen2_5_vl_flat", model_type="qwen2_5_vl", dtype=torch.float32, token_dtype=np.int64,
         cls="Qwen2_5_VLForConditionalGeneration",
         cfg=dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=160,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                    "rope_theta": 10000.0}),
                  vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                     out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                     temporal_patch_size=2, fullatt_block_indexes=[0], window_size=56),
                  image_token_id=151, video_token_id=152, vision_start_token_id=153,
                  tie_word_embeddings=False),
         flat_config=True, token_max=150, seed=17),
    # Phi-2: one LayerNorm (with a bias) shared by the attention and the MLP in parallel, q/k/v and dense
    # with biases, fc1 → tanh-GELU → fc2, rotary on 0.4 of each head (int(16 · 0.4) = 6 of 16 values),
    # final_layernorm, an lm_head with a bias; untied.
    dict(name="phi_parallel", model_type="phi", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                  vocab_size=128, layer_norm_eps=1e-5, hidden_act="gelu_new",
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.4)),
         seed=18),
    # StarCoder2: LLaMA's attention with biases (use_bias), LayerNorms with biases, c_fc → tanh-GELU →
    # c_proj, a window of 6 on every layer, GQA, tied (the class default), bf16.
    dict(name="starcoder2_window", model_type="starcoder2", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, norm_epsilon=1e-5, sliding_window=6,
                  rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
         full_attention_loss=True, seed=19),
    # CWM (Code World Model): LLaMA's block with a window of 6 on all but every 4th layer from the first
    # (config.json without layer_types: the class's pattern), llama3 rope scaling, GQA, untied.
    dict(name="cwm_layer_pattern", model_type="cwm", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5, sliding_window=6,
                  rope_parameters=dict(rope_type="llama3", rope_theta=1000000.0, factor=16.0,
                                       high_freq_factor=4.0, low_freq_factor=1.0,
                                       original_max_position_embeddings=8)),
         drop_layer_types=True, full_attention_loss=True, seed=71),
    # Ministral (8B): Mistral's block with the window of 6 on the layers layer_types names (0 and 2), GQA
    # (head_dim stated: MinistralModel does not derive it).
    dict(name="ministral_layer_types", model_type="ministral", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters=dict(rope_type="default", rope_theta=100000000.0)),
         full_attention_loss=True, seed=66),
    # Ministral 3: Mistral's block with YaRN × 16 and Llama 4's query scaling (llama_4_scaling_beta, 1
    # within original_max_position_embeddings 4096: every fixture position), head_dim 16 ≠ 32 / 4, pad
    # 11 (the class default), bf16.
    dict(name="ministral3_yarn", model_type="ministral3", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5,
                  max_position_embeddings=65536,
                  rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=16.0,
                                       original_max_position_embeddings=4096, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                       llama_4_scaling_beta=0.1)),
         seed=67),
    # Jais 2: LLaMA's attention with LayerNorms (with biases, gains w), Nemotron's plain MLP up_proj →
    # ReLU² → down_proj, biases on every projection (the class defaults), GQA, untied.
    dict(name="jais2_layernorm", model_type="jais2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, layer_norm_eps=1e-5,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=70),
    # EXAONE 3.5: LLaMA's block under the hub's names (transformer.h.{i}.attn.attention.*, ln_1, ln_2,
    # mlp.c_fc_0 / c_fc_1 / c_proj, transformer.wte, transformer.ln_f; as transformers saves it), the
    # hub's config names (num_layers, layer_norm_epsilon, activation_function, 4.x rope_theta and
    # llama3 rope_scaling), GQA, tied.
    dict(name="exaone_hub_names", model_type="exaone", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=1000000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8)),
         old_config=True,
         rename_keys=dict(num_hidden_layers="num_layers", rms_norm_eps="layer_norm_epsilon",
                          hidden_act="activation_function"),
         reload=True, seed=65),
    # Nemotron (Minitron, Nemotron-Mini): LayerNorm1P (LayerNorms with biases, gains 1 + w), a plain MLP
    # up_proj → ReLU² → down_proj, the rotary embedding on half of each head (the class default), heads
    # of 12 (head_dim ≠ hidden / heads), GQA, biases on the attention and the MLP, untied.
    dict(name="nemotron_layernorm1p", model_type="nemotron", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, vocab_size=128, norm_eps=1e-5,
                  attention_bias=True, mlp_bias=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=60),
    # GLM-4.5 (glm4_moe): σ routing with a random correction bias, 8 experts in 4 groups of which the
    # best 2 are searched, top 3 renormalised and × 2.5 (routed_scaling_factor), one shared expert, layer
    # 0 dense (first_k_dense_replace), q/k/v biases, per-head q/k RMSNorms, half of each head rotary
    # (rotate_half), untied.
    dict(name="glm4_moe_sigmoid", model_type="glm4_moe", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, n_routed_experts=8,
                  num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1, n_group=4,
                  topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
                  use_qk_norm=True, attention_bias=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
         seed=54),
    # DeepSeek-V3 (Kimi K2, Moonlight): multi-head latent attention (q through a rank-16 bottleneck with
    # its RMSNorm, keys and values out of a 12-value latent + one shared 4-value rotary key, heads of
    # 8 + 4 query values and 6 values), interleaved rotary pairs (rope_interleave), YaRN × 4 with
    # mscale_all_dim (the softmax scale × mscale²); GLM-4.5's σ routing (8 experts in 4 groups, best 2
    # searched, top 3 renormalised × 2.5, one shared expert), layer 0 dense, untied.
    dict(name="deepseek_v3_mla", model_type="deepseek_v3", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-6, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                  n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1,
                  n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  norm_topk_prob=True, rope_interleave=True, max_position_embeddings=64,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                       original_max_position_embeddings=16, mscale=1.0,
                                       mscale_all_dim=1.0, beta_fast=32, beta_slow=1)),
         seed=57),
    # DeepSeek-V2: MLA (the query's bottleneck of 16, a 12-value latent, heads of 8 + 4 query values and 6
    # values, interleaved rotary pairs, YaRN × 4 with mscale = mscale_all_dim = 0.707) and the softmax
    # router's group_limited_greedy choice (top 3 inside the 2 of 4 groups with the most probable
    # experts), weights × 16 not renormalised, 2 shared experts, layer 0 dense, untied.
    dict(name="deepseek_v2_grouped", model_type="deepseek_v2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-6, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                  n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                  n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                  first_k_dense_replace=1, max_position_embeddings=64,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                       original_max_position_embeddings=16, mscale=0.707,
                                       mscale_all_dim=0.707, beta_fast=32, beta_slow=1)),
         seed=59),
    # GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's MLA (values as wide as queries: 8 + 4) with GLM-4.5's
    # σ routing (6 experts, top 2 renormalised × 1.8, one shared expert), the sparse layers by
    # mlp_layer_types (layers 0 and 2 dense), untied.
    dict(name="glm4_moe_lite_mla", model_type="glm4_moe_lite", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-5, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                  n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                  routed_scaling_factor=1.8, mlp_layer_types=["dense", "sparse", "dense"],
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=61),
    # Youtu-LLM: DeepSeek-V3's MLA (query bottleneck, values 6 of 12) with a dense LLaMA MLP, tied (the
    # class default).
    dict(name="youtu_mla", model_type="youtu", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-6, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=62),
    # dots.llm1 (dots1): Qwen3's attention (per-head q/k norms) with a window of 6 from layer 1 on
    # (max_window_layers; config.json without layer_types, as the hub's), DeepSeek-V3's σ routing (8 experts in 2 groups, the best one searched, top 2
    # renormalised × 2.5, 2 shared experts), layer 0 dense, untied.
    dict(name="dots1_window", model_type="dots1", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                  n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                  first_k_dense_replace=1, sliding_window=6, max_window_layers=1,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         drop_layer_types=True, full_attention_loss=True, seed=63),
    # MiniCPM3: DeepSeek-V2's MLA with rotate_half pairs (values hidden / heads = 8 wide, queries 8 + 4),
    # LongRoPE on the 4 rotary values (long factors past 8 tokens), the embeddings × scale_emb 12, each
    # residual branch × scale_depth 1.4 / √3, the lm_head's input × dim_model_base 8 / hidden 32, a
    # LLaMA MLP, tied.
    dict(name="minicpm3_scaled", model_type="minicpm3", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-5, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=None,
                  scale_emb=12, scale_depth=1.4, dim_model_base=8, max_position_embeddings=64,
                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                       short_factor=[1.0, 1.25], long_factor=[1.5, 2.0],
                                       original_max_position_embeddings=8)),
         seed=64),
    # Mistral Small 4 (mistral4): DeepSeek-V3's MLA (interleaved pairs, heads of 4 + 4 query values and 6
    # values) with YaRN × 128 (mscale_all_dim: the softmax scale × mscale²) and Llama 4's query scaling
    # (1 within 4096 positions), the softmax router choosing inside the 2 of 4 groups whose two best
    # probabilities sum highest, top 3 renormalised × 2, one shared expert, layer 0 dense, pad 11
    # (Mistral4ForCausalLM: transformers' auto classes run it inside Mistral 3's wrapper only).
    dict(name="mistral4_mla", model_type="mistral4", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-6, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
                  n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1,
                  n_group=4, topk_group=2, routed_scaling_factor=2.0, first_k_dense_replace=1,
                  norm_topk_prob=True, max_position_embeddings=65536,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=128.0,
                                       original_max_position_embeddings=4096, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                       llama_4_scaling_beta=0.1, partial_rotary_factor=0.5)),
         cls="Mistral4ForCausalLM", eager_experts=True, seed=68),
    # DeepSeek-V3's MLA without the query's bottleneck (q_lora_rank null: one q_proj, Moonlight's form),
    # rotate_half pairs (rope_interleave false), values as wide as queries (12), no rope scaling; every
    # MLP a mixture (first_k_dense_replace 0), one group, 2 shared experts, not renormalised, bf16.
    dict(name="deepseek_v3_q_proj", model_type="deepseek_v3", dtype=torch.bfloat16,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, q_lora_rank=None,
                  kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                  n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                  n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=0,
                  norm_topk_prob=False, rope_interleave=False,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=58),
    # MiniMax-M2: every MLP a mixture of 6 experts (Mixtral's names, block_sparse_moe.experts.{e}.w1/w3/w2)
    # routed by σ + a random correction bias (block_sparse_moe.e_score_correction_bias), top 2
    # renormalised; q/k RMSNorms over the whole projections, the rotary embedding on 4 of 8 values
    # (the hub's legacy rotary_dim), θ the class default 5·10⁶, untied.
    dict(name="minimax_m2_sigmoid", model_type="minimax_m2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-6,
                  num_local_experts=6, num_experts_per_tok=2, rotary_dim=4),
         seed=55),
    # ERNIE 4.5 MoE (21B-A3B-style): ERNIE 4.5's attention (interleaved rotary pairs), layer 0 dense
    # (moe_layer_start_index 1), 6 experts chosen by softmax probability + a random correction bias
    # (mlp.moe_statics.e_score_correction_bias, [1, 6]), top 2 renormalised, one shared expert, tied,
    # pad 0.
    dict(name="ernie4_5_moe_biased", model_type="ernie4_5_moe", dtype=torch.float32,
         token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, moe_num_experts=6, moe_k=2,
                  moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
         seed=56),
    # Mixtral: every MLP a sparse mixture of 4 experts (block_sparse_moe, w1/w3/w2), each token to its top 2
    # with renormalised weights; a window of 6 on every layer, GQA, untied.
    dict(name="mixtral_moe", model_type="mixtral", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, sliding_window=6,
                  num_local_experts=4, num_experts_per_tok=2,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         full_attention_loss=True, seed=20),
    # FlexOlmo: OLMo 2's block (norms after the attention and the MLP, whole-projection q/k norms) with
    # OLMoE's mixture (5 experts of intermediate_size, top 2 not renormalised), GQA, pad 1.
    dict(name="flex_olmo_post_norms", model_type="flex_olmo", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, num_experts=5,
                  num_experts_per_tok=2, pad_token_id=1,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
         seed=69),
    # Qwen2-MoE (Qwen1.5-MoE-style): 5 experts, top 2, probabilities not renormalised, a shared expert
    # gated by σ(shared_expert_gate · x), q/k/v biases; layer 1 dense (mlp_only_layers), bf16.
    dict(name="qwen2_moe_shared", model_type="qwen2_moe", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, num_experts=5,
                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                  norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         seed=21),
    # Qwen3-MoE: per-head q/k norms, 6 experts, top 3 renormalised (norm_topk_prob), decoder_sparse_step 2
    # (layers 1 and 3 sparse, 0 and 2 dense).
    dict(name="qwen3_moe_step", model_type="qwen3_moe", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-6, num_experts=6,
                  num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=True,
                  decoder_sparse_step=2, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
         seed=22),
    # OLMoE: q and k RMS-normalised over the whole projection, then q, k and v clamped to ±1.5
    # (clip_qkv, small enough to bite), 4 experts, top 2 not renormalised, pad_token_id left to the
    # class default (1), untied.
    dict(name="olmoe_experts", model_type="olmoe", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-5, clip_qkv=1.5, num_experts=4,
                  num_experts_per_tok=2, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
         seed=23),
    # GPT-2: learned positions (no rotary), Conv1D projections stored [in, out] (q, k, v fused by columns
    # in c_attn), LayerNorms with biases, tanh-GELU MLP, tied; stored in the hub's original layout (no
    # `transformer.` prefix, the causal-mask buffers `h.{l}.attn.bias`), as the `gpt2` checkpoints are.
    dict(name="gpt2_hub_layout", model_type="gpt2", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(n_embd=32, n_layer=3, n_head=4, n_positions=24, vocab_size=128,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
         gpt2_hub_layout=True, seed=24),
    # OPT: learned positions from row 2 (no rotary), LayerNorms with biases before the attention and the
    # MLP, fc1 → ReLU → fc2, biases everywhere, tied, pad_token_id 1 (its embedding row takes no
    # gradient); stored as the hub's facebook/opt-* checkpoints are (`decoder.…`, saved from the base
    # model), bf16.
    dict(name="opt_hub_layout", model_type="opt", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
                  max_position_embeddings=20, vocab_size=128, word_embed_proj_dim=32, pad_token_id=1,
                  do_layer_norm_before=True, enable_bias=True),
         opt_hub_layout=True, seed=25),
    # GPT-NeoX (Pythia): LayerNorms with biases, q/k/v interleaved per head in one biased projection,
    # rotary on a quarter of each head (rotary_pct 0.25 → 4 of 16 values), exact-GELU MLP with biases,
    # parallel residual; untied embed_out. Written in the 4.x form Pythia's hub configs have (rotary_pct,
    # rotary_emb_base).
    dict(name="neox_parallel", model_type="gpt_neox", dtype=torch.float32, token_dtype=np.int64,
         cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                  vocab_size=128, layer_norm_eps=1e-5, use_parallel_residual=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
         neox_old_config=True, seed=14),
    # GPT-NeoX with the sequential residual (use_parallel_residual false), half the head rotary, bf16.
    dict(name="neox_sequential", model_type="gpt_neox", dtype=torch.bfloat16, token_dtype=np.int64,
         cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  vocab_size=128, layer_norm_eps=1e-5, use_parallel_residual=False,
                  rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5)),
         seed=15),
    # Gemma 3 4B-style vision-language checkpoint (Gemma3ForConditionalGeneration, tiny SigLIP tower):
    # transformers 5 saves the hub layout (language_model.model.…, tied: no lm_head); config.json's
    # text_config cut to what google/gemma-3-4b-it's states (4.x rope_scaling, no vocab_size... but the
    # tiny sizes), so 8 heads, 4 key/value heads, query_pre_attn_scalar 256, rope θ 10⁶ / 10⁴ and the layer
    # pattern 6 come from the class defaults (7 layers: layer 5 full attention, linear rope ×8), bf16.
    dict(name="gemma3_vision", model_type="gemma3", dtype=torch.bfloat16, token_dtype=np.int64,
         cls="Gemma3ForConditionalGeneration",
         cfg=dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=16, vocab_size=128,
                                   sliding_window=5,
                                   rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                           rope_theta=1000000.0),
                                                    "sliding_attention": dict(rope_type="default",
                                                                              rope_theta=10000.0)}),
                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=28, patch_size=14),
                  mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126, image_token_index=127),
         sparse_text_config=dict(keep=["hidden_size", "intermediate_size", "model_type", "num_hidden_layers",
                                       "sliding_window", "head_dim", "vocab_size"],
                                 add={"rope_scaling": {"factor": 8.0, "rope_type": "linear"}}),
         token_max=125, seed=12),
    # Mistral 3 (Mistral Small 3.1-style: Mistral3ForConditionalGeneration, tiny Pixtral tower), untied,
    # stored in the layout transformers 4.52-4.57 saved (model.language_model.…, lm_head.weight).
    dict(name="mistral3_vision", model_type="mistral3", dtype=torch.float32, token_dtype=np.int64,
         cls="Mistral3ForConditionalGeneration",
         cfg=dict(text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128, sliding_window=None,
                                   rope_parameters=dict(rope_type="default", rope_theta=1000000000.0)),
                  vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                                     head_dim=8),
                  image_token_index=127, spatial_merge_size=1, tie_word_embeddings=False),
         relayout=True, token_max=127, seed=13),
    # Llama 4 Scout's wrapper (llama4): the language model (language_model.model.…,
    # language_model.lm_head) beside a one-layer vision tower and projector; a mixture on every layer
    # (moe_layers stated, as long as the layer count), the top 1 of 4 experts, no_rope_layers stated,
    # f32.
    dict(name="llama4_vision", model_type="llama4", dtype=torch.float32, token_dtype=np.int64,
         cls="Llama4ForConditionalGeneration",
         cfg=dict(text_config=dict(model_type="llama4_text", hidden_size=32, intermediate_size=24,
                                   intermediate_size_mlp=40, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=128, rms_norm_eps=1e-5,
                                   num_local_experts=4, num_experts_per_tok=1, no_rope_layers=[1, 0, 1],
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14,
                                     vision_output_dim=16, projector_input_dim=16, projector_output_dim=16,
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                  image_token_index=127, boi_token_index=125, eoi_token_index=126,
                  tie_word_embeddings=False),
         eager_experts=True, token_max=125, seed=81),
]


def model_class(spec):
    """The model class: the spec's (a vision-language wrapper), else the causal LM of the model type."""
    if "cls" in spec:
        return getattr(transformers, spec["cls"])
    return transformers.AutoModelForCausalLM


def text_model(model):
    """The decoder (embed_tokens, layers, norm): a vision-language wrapper's language model; GPT-NeoX's
    and GPT-2's under other names."""
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox
    if hasattr(model, "transformer"):
        return model.transformer
    if not hasattr(model, "model"):
        return model.language_model.model  # Llama 4's wrapper: the causal LM inside
    if hasattr(model.model, "decoder"):
        return model.model.decoder  # OPT
    return getattr(model.model, "language_model", model.model)


def layers_name(text):
    """The attribute holding the decoder's layers: GPT-2's `h`, MPT's `blocks`, else `layers`."""
    for name in ("h", "blocks"):
        if hasattr(text, name):
            return name
    return "layers"


def embedding(model):
    text = text_model(model)
    for name in ("embed_in", "wte", "word_embeddings", "embed_tokens"):
        if hasattr(text, name):
            return getattr(text, name)
    raise AttributeError("no embedding")


def lm_head(model):
    if hasattr(model, "embed_out"):
        return model.embed_out
    return model.lm_head if hasattr(model, "lm_head") else model.language_model.lm_head


def final_norm(model):
    text = text_model(model)
    for name in ("final_layer_norm", "final_layernorm", "ln_f", "norm_f", "norm"):
        if hasattr(text, name):
            return getattr(text, name)
    raise AttributeError("no final norm")


def make_model(spec):
    cfg_cls = transformers.AutoConfig.for_model(spec["model_type"]).__class__
    config = cfg_cls(**spec["cfg"], attn_implementation="eager")
    torch.manual_seed(spec["seed"])
    cls = model_class(spec)
    # Eager experts for the mixtures of experts (the default grouped_mm refuses float64).
    if "cls" not in spec:
        model = cls.from_config(config, experts_implementation="eager")
    elif spec.get("eager_experts"):
        model = cls._from_config(config, experts_implementation="eager")
    else:
        model = cls(config)
    # Random, non-trivial values everywhere (HF's init leaves norms at 1 and biases at 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or p.dim() == 1 and not name.endswith("bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        # GLM-4.5's router correction bias (a buffer, zero at init): random, so that the choice reads it.
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
        # Round to the stored dtype so the f64 reference sees exactly the checkpoint's values.
        for p in model.parameters():
            p.copy_(p.to(spec["dtype"]).to(torch.float32))
        round_embed_scale(model, spec["dtype"])
    model.eval()
    return model


def round_embed_scale(model, dtype):
    """Gemma's √hidden embedding factor as transformers uses it on the checkpoint: cast to the weights'
    dtype (`embed_scale.to(self.weight.dtype)`; a bf16 checkpoint loads in bf16). A non-persistent buffer:
    a model given the state_dict needs this too."""
    emb = embedding(model)
    if hasattr(emb, "embed_scale"):
        with torch.no_grad():
            emb.embed_scale.copy_(emb.embed_scale.to(dtype).to(torch.float32))


def config_rewrite(edit):
    """`edit(c, ...)` as a rewrite of the config.json at `path` in place: `f(path, ...)` loads it into the
    dict `c`, edits it and writes it back."""
    @functools.wraps(edit)
    def rewrite(path, *args, **kwargs):
        with open(path) as f:
            c = json.load(f)
        edit(c, *args, **kwargs)
        with open(path, "w") as f:
            json.dump(c, f, indent=2)
    return rewrite


@config_rewrite
def to_old_config(c):
    """Rewrite config.json in the transformers 4.x form: top-level rope_theta, partial_rotary_factor and
    rope_scaling."""
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        c["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None


@config_rewrite
def to_per_kind_old_config(c):
    """Rewrite a config.json whose rope_parameters are keyed by layer kind (OLMo 3) in the 4.x form:
    top-level rope_theta (both kinds) and rope_scaling (the full-attention layers')."""
    rp = c.pop("rope_parameters")
    full, sliding = rp["full_attention"], rp["sliding_attention"]
    assert full["rope_theta"] == sliding["rope_theta"] and sliding["rope_type"] == "default"
    c["rope_theta"] = full.pop("rope_theta")
    c["rope_scaling"] = full


@config_rewrite
def rename_keys(c, names):
    """Rename config.json's keys (old → new: the names a hub config uses for a class attribute)."""
    for old, new in names.items():
        c[new] = c.pop(old)


@config_rewrite
def drop_keys(c, keys):
    """Remove `keys` from config.json (the config class derives them again)."""
    for k in keys:
        del c[k]


@config_rewrite
def to_neox_old_config(c):
    """Rewrite a GPT-NeoX config.json in the form Pythia's hub configs have: rotary_pct and
    rotary_emb_base."""
    rp = c.pop("rope_parameters")
    c["rotary_pct"] = rp["partial_rotary_factor"]
    c["rotary_emb_base"] = rp["rope_theta"]
    c["rope_scaling"] = None


@config_rewrite
def drop_layer_types(c, extra):
    """Remove `layer_types` from config.json (transformers derives it again from max_window_layers, or
    Gemma 3 from `sliding_window_pattern`, which `extra` adds)."""
    del c["layer_types"]
    if isinstance(extra, dict):
        c.update(extra)


@config_rewrite
def sparsify_text_config(c, keep, add):
    """Cut config.json's text_config to the `keep` fields plus `add`, and drop the wrapper's
    tie_word_embeddings, as hub vision-language configs written by transformers 4.x are: the rest comes
    from the text config class's defaults."""
    c["text_config"] = dict({k: c["text_config"][k] for k in keep}, **add)
    c.pop("tie_word_embeddings", None)


@config_rewrite
def flatten_config(c):
    """Rewrite a Qwen2.5-VL config.json in the hub's 4.x form: the text fields at the top level beside
    vision_config, rope_scaling {"type": "mrope", "mrope_section": …} and a top-level rope_theta."""
    text = c.pop("text_config")
    text.pop("model_type")
    rp = text.pop("rope_parameters")
    text["rope_theta"] = rp["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
    c.update(text)


def relayout(d):
    """Rename a vision-language checkpoint's tensors from the hub layout transformers 5 saves
    (language_model.model.…, language_model.lm_head, vision_tower, multi_modal_projector) to the one 4.52-4.57
    saved (model.language_model.…, lm_head, model.vision_tower, model.multi_modal_projector)."""
    from safetensors.torch import load_file
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)

    def name(k):
        for old, new in [("language_model.model.", "model.language_model."),
                         ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")]:
            if k.startswith(old):
                return new + k[len(old):]
        raise ValueError(k)
    save_file({name(k): v for k, v in sd.items()}, path, metadata={"format": "pt"})


def gpt2_hub_layout(d, config):
    """Rewrite a GPT-2 checkpoint as the hub's `gpt2` ones are stored: tensor names without the
    `transformer.` prefix, and each layer's causal-mask buffer `h.{l}.attn.bias` [1, 1, n_positions,
    n_positions] that older transformers saved."""
    from safetensors.torch import load_file
    path = os.path.join(d, "model.safetensors")
    sd = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    n = config.n_positions
    mask = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n).to(torch.float32)
    for l in range(config.n_layer):
        sd[f"h.{l}.attn.bias"] = mask.clone()
    save_file(sd, path, metadata={"format": "pt"})


def strip_prefix(d, prefix):
    """Drop `prefix` from every tensor name of the checkpoint (the names of a base model's state_dict)."""
    from safetensors.torch import load_file
    path = os.path.join(d, "model.safetensors")
    sd = {k.removeprefix(prefix): v for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"format": "pt"})


def to_torch_save(d, tied, inv_freq=None):
    """Rewrite the checkpoint in `d` as older ones are published: `torch.save` files (`pytorch_model.bin`,
    or `pytorch_model-0000i-of-0000n.bin` shards listed in `pytorch_model.bin.index.json`). A tied
    `lm_head.weight` is saved beside the embedding, sharing its storage, and with `inv_freq` each layer
    carries the rotary buffer `…rotary_emb.inv_freq`, as LLaMA checkpoints of 2023 did."""
    from safetensors.torch import load_file
    names = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        sd = load_file(os.path.join(d, f))
        g = "pytorch_model" + f[len("model"):-len(".safetensors")] + ".bin"
        if tied and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        if inv_freq is not None:
            for k in [k for k in sd if k.endswith("self_attn.q_proj.weight")]:
                sd[k.replace("q_proj.weight", "rotary_emb.inv_freq")] = inv_freq.clone()
        torch.save(sd, os.path.join(d, g))
        names.update({k: g for k in sd})
        os.remove(os.path.join(d, f))
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            idx = json.load(fh)
        idx["weight_map"] = dict(sorted(names.items()))
        with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as fh:
            json.dump(idx, fh, indent=2)
        os.remove(index)


def to_internlm2(d, cfg):
    """Rewrite the LLaMA checkpoint in `d` as InternLM2's remote code saves it: `model.tok_embeddings`,
    `attention_norm`, `attention.wqkv` (per key/value head: its queries, its key, its value, weights and
    biases), `attention.wo`, `ffn_norm`, `feed_forward.w1/w3/w2` (gate, up, down), `output`; config.json in
    InternLM2Config's form (`bias`, top-level `rope_theta`, 4.x `rope_scaling` with "type")."""
    from safetensors.torch import load_file
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    hd, g = hidden // heads, heads // kv
    out = {}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        for kind in ["weight", "bias"]:
            if p + f"self_attn.q_proj.{kind}" not in sd:
                continue
            rest = (hidden,) if kind == "weight" else ()
            q = sd.pop(p + f"self_attn.q_proj.{kind}").reshape(kv, g, hd, *rest)
            k = sd.pop(p + f"self_attn.k_proj.{kind}").reshape(kv, 1, hd, *rest)
            v = sd.pop(p + f"self_attn.v_proj.{kind}").reshape(kv, 1, hd, *rest)
            out[p + f"attention.wqkv.{kind}"] = torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()
    names = [("model.embed_tokens.", "model.tok_embeddings."), ("self_attn.o_proj.", "attention.wo."),
             ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.up_proj.", "feed_forward.w3."),
             ("mlp.down_proj.", "feed_forward.w2."), ("input_layernorm.", "attention_norm."),
             ("post_attention_layernorm.", "ffn_norm."), ("lm_head.", "output.")]
    for key, t in sd.items():
        for old, new in names:
            key = key.replace(old, new)
        out[key] = t
    os.remove(path)
    save_file(out, path, metadata={"format": "pt"})
    rp = cfg.rope_parameters
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "attn_implementation": "eager", "bias": cfg.attention_bias,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": cfg.pad_token_id, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": cfg.intermediate_size, "initializer_range": 0.02,
        "max_position_embeddings": cfg.max_position_embeddings, "num_attention_heads": heads,
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": kv,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": rp["rope_theta"],
        "rope_scaling": {"type": rp["rope_type"], "factor": rp["factor"]},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def check_reload(spec, d, model, ids):
    """transformers reads the rewritten checkpoint (cut config, other layout) as the model it came from:
    every tensor found, the same logits."""
    loaded, info = model_class(spec).from_pretrained(d, attn_implementation="eager", dtype=torch.float32,
                                                     output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "mismatched_keys" or k == "mismatched_keys" and v}
    assert not bad, f"{spec['name']}: reloading: {bad}"
    round_embed_scale(loaded, spec["dtype"])
    with torch.no_grad():
        diff = (loaded.eval()(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, f"{spec['name']}: the reloaded checkpoint's logits differ by {diff}"


# Types whose layer kinds also pick each layer's rotary embedding or mask pattern: their full-attention
# loss keeps the kinds and lengthens the window instead of dropping it.
KIND_PATTERN_TYPES = ("gemma2", "gemma3_text", "olmo3", "cohere2", "exaone4", "ministral", "cwm", "granite_swa",
                      "gpt_oss", "vaultgemma", "exaone_moe", "afmoe")


def full_attention_loss(spec, model, ids):
    """Loss of the same weights with every layer on plain causal attention (no sliding window)."""
    cfg = dict(spec["cfg"], sliding_window=None)
    if spec["model_type"] in ("qwen2", "qwen3", "smollm3"):
        cfg["use_sliding_window"] = False
    if spec["model_type"] in KIND_PATTERN_TYPES:
        # The same layer kinds (so the same rotary embedding per layer), a window longer than the
        # sequences: nothing is masked beyond the causal mask.
        cfg["sliding_window"] = 4096
    cfg_cls = transformers.AutoConfig.for_model(spec["model_type"]).__class__
    full = transformers.AutoModelForCausalLM.from_config(cfg_cls(**cfg, attn_implementation="eager"),
                                                         experts_implementation="eager")
    full.load_state_dict(model.state_dict())
    round_embed_scale(full, spec["dtype"])
    full = full.double().eval()
    if spec["model_type"] in KIND_PATTERN_TYPES:
        assert full.config.sliding_window == 4096
    else:
        assert full.config.sliding_window is None
        assert all(t == "full_attention" for t in getattr(full.config, "layer_types", None) or [])
    with torch.no_grad():
        logits = full(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(loss)


def decoder_layers(model):
    text = text_model(model)
    return getattr(text, layers_name(text))


def reference(model, ids, tied):
    """f64 loss, per-layer gradient norms, extras, for one batch."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()

    def norm(params):
        # OLMo's final LayerNorm has no parameters: 0.
        # A parameter that takes no gradient (ERNIE 4.5's router bias, requires_grad False) counts 0.
        sq = sum(((p.grad.double() ** 2).sum() for p in params if p.requires_grad),
                 torch.zeros((), dtype=torch.float64))
        return float(torch.sqrt(sq))

    per_layer = [norm(list(layer.parameters())) for layer in decoder_layers(model)]
    embed = norm([embedding(model).weight])
    fnorm = norm(list(final_norm(model).parameters()))
    head = -1.0 if tied else norm(list(lm_head(model).parameters()))
    return float(loss.detach()), per_layer, [embed, fnorm, head]


def hidden_states(model, ids):
    """Decoder layer 0's input (the embedding output; Granite's × embedding_multiplier) and every decoder
    layer's output (before the final norm), via hooks."""
    hs = {}

    def hook(i):
        def f(_mod, _inp, out):
            hs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return f

    if any(hasattr(text_model(model), a) for a in ("embedding_multiplier", "wpe", "embed_positions",
                                                   "word_embeddings_layernorm")) \
            or getattr(model.config, "mup_enabled", False):
        # Granite and AFMoE (mup_enabled) scale the embedding outside its module, GPT-2 and OPT add their
        # positions, BLOOM normalises it: state 0 is what decoder layer 0 reads.
        def pre(_mod, args, kwargs):
            hs[0] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handles = [decoder_layers(model)[0].register_forward_pre_hook(pre, with_kwargs=True)]
    else:
        handles = [embedding(model).register_forward_hook(hook(0))]
    for l, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_hook(hook(l + 1)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return hs


def fp8_quantize(model, block):
    """Transformers' fine-grained FP8 (DeepSeek-V3's format) on every decoder projection: per block of
    block[0] × block[1] values, scale = absmax / 448, q = e4m3(w / scale); the model's weight becomes
    q × scale (in f32, as transformers dequantises), so the reference runs on what the checkpoint
    holds. Returns {name: (q, scale)}."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." not in name or not name.endswith("proj.weight") or p.dim() != 2:
                continue
            rows, cols = p.shape
            br, bc = block
            assert rows % br == 0 and cols % bc == 0, (name, p.shape, block)
            w = p.detach().float().reshape(rows // br, br, cols // bc, bc)
            scale = (w.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
            q = (w / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            deq = (q.float() * scale[:, None, :, None]).reshape(rows, cols)
            p.copy_(deq.to(p.dtype))
            assert torch.equal(p.float(), deq), name
            out[name] = (q.reshape(rows, cols).contiguous(), scale.contiguous())
    return out


def write_fp8(d, quantized, block):
    """Replace the checkpoint's projections by their FP8 values and `_scale_inv` block scales (f32), and
    state the quantization in config.json (quant_method fp8, e4m3, the block)."""
    from safetensors.torch import load_file
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    for name, (q, scale) in quantized.items():
        assert name in tensors, name
        tensors[name] = q
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, path, metadata={"format": "pt"})
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    c["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                    weight_block_size=list(block))
    with open(cfg_path, "w") as f:
        json.dump(c, f, indent=2)


def loss_without_layer(model, ids, skip):
    """The loss with decoder layer `skip` removed; every other layer keeps its attention kind and rotary
    θ (Gemma 3 picks a layer's mask and rotary embedding by its position in config.layer_types, Granite
    SWA its θ by its position in config.layer_rope_theta)."""
    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != skip])
    config = model.config.get_text_config()
    per_layer = {key: getattr(config, key, None) for key in ("layer_types", "layer_rope_theta")}
    per_layer = {key: v for key, v in per_layer.items() if v is not None}
    for key, v in per_layer.items():
        setattr(config, key, [t for i, t in enumerate(v) if i != skip])
    setattr(text_model(model), layers_name(text_model(model)), kept)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    setattr(text_model(model), layers_name(text_model(model)), layers)
    for key, v in per_layer.items():
        setattr(config, key, v)
    return float(loss)


def build(spec, out_root):
    d = os.path.join(out_root, spec["name"])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model = make_model(spec)
    fp8 = fp8_quantize(model, spec["fp8_block"]) if spec.get("fp8_block") else None
    tied = lm_head(model).weight.data_ptr() == embedding(model).weight.data_ptr()
    kw = dict(safe_serialization=True)
    if "shard" in spec:
        kw["max_shard_size"] = spec["shard"]
    # Save a converted copy: `.to(bf16)` would also round the rotary inv_freq buffer, which a checkpoint
    # loaded with from_pretrained never has, so the reference runs on the f32 model (weights pre-rounded).
    copy.deepcopy(model).to(spec["dtype"]).save_pretrained(d, **kw)
    for extra in ["generation_config.json"]:
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    if spec.get("old_config"):
        to_old_config(os.path.join(d, "config.json"))
    if spec.get("neox_old_config"):
        to_neox_old_config(os.path.join(d, "config.json"))
    if spec.get("per_kind_old_config"):
        to_per_kind_old_config(os.path.join(d, "config.json"))
    if spec.get("rename_keys"):
        rename_keys(os.path.join(d, "config.json"), spec["rename_keys"])
    if spec.get("drop_keys"):
        drop_keys(os.path.join(d, "config.json"), spec["drop_keys"])
    if spec.get("drop_layer_types"):
        drop_layer_types(os.path.join(d, "config.json"), spec["drop_layer_types"])
    if spec.get("sparse_text_config"):
        sparsify_text_config(os.path.join(d, "config.json"), **spec["sparse_text_config"])
    if spec.get("relayout"):
        relayout(d)
    if spec.get("flat_config"):
        flatten_config(os.path.join(d, "config.json"))
    if spec.get("gpt2_hub_layout"):
        gpt2_hub_layout(d, model.config)
    if spec.get("opt_hub_layout"):
        strip_prefix(d, "model.")
    if spec.get("bloom_hub_layout"):
        strip_prefix(d, "transformer.")
    if spec.get("internlm2"):
        to_internlm2(d, model.config)
    if spec.get("torch_save"):
        rotary = model.model.rotary_emb.inv_freq if spec.get("inv_freq") else None
        to_torch_save(d, tied, rotary)
    if fp8 is not None:
        write_fp8(d, fp8, spec["fp8_block"])

    rng = np.random.default_rng(spec["seed"])
    # Vision-language fixtures keep their image tokens out of the text.
    vocab = spec.get("token_max", model.config.get_text_config().vocab_size)
    tokens = rng.integers(0, vocab, size=(SEQS, TOKENS)).astype(spec["token_dtype"])
    np.save(os.path.join(d, "tokens.npy"), tokens)
    if "cls" in spec or any(spec.get(k) for k in ("neox_old_config", "gpt2_hub_layout", "opt_hub_layout",
                                                   "bloom_hub_layout", "reload", "torch_save")):
        check_reload(spec, d, model, torch.from_numpy(tokens.astype(np.int64)))

    model = model.double()
    ids = torch.from_numpy(tokens.astype(np.int64))
    ref = {}
    hs = hidden_states(model, ids)
    for i, h in hs.items():
        ref[f"hidden.{i}"] = h.double().contiguous()
    for k, start in enumerate(range(0, SEQS, BATCH)):
        loss, per_layer, extra = reference(model, ids[start:start + BATCH], tied)
        ref[f"loss.b{k}"] = torch.tensor([loss], dtype=torch.float64)
        ref[f"gradnorm.b{k}"] = torch.tensor(per_layer, dtype=torch.float64)
        ref[f"extra.b{k}"] = torch.tensor(extra, dtype=torch.float64)
    ref["loss_skip1"] = torch.tensor([loss_without_layer(model, ids, 1)], dtype=torch.float64)
    if spec.get("short_loss"):
        short = ids[:, :spec["short_loss"]]
        with torch.no_grad():
            logits = model(input_ids=short, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), short[:, 1:].reshape(-1))
        ref["loss_short"] = torch.tensor([float(loss)], dtype=torch.float64)
    if spec.get("full_attention_loss"):
        ref["loss_full_attention"] = torch.tensor([full_attention_loss(spec, model, ids)],
                                                  dtype=torch.float64)
    save_file(ref, os.path.join(d, "reference.safetensors"), metadata={"batch": str(BATCH)})
    files = sorted(os.listdir(d))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    print(f"{spec['name']}: {files} {size / 1024:.0f} KiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="build only this fixture (repeatable); default: all")
    args = ap.parse_args()
    names = [spec["name"] for spec in FIXTURES]
    for name in args.only or []:
        if name not in names:
            ap.error(f"--only {name}: no such fixture ({', '.join(names)})")
    torch.set_num_threads(1)
    for spec in FIXTURES:
        if not args.only or spec["name"] in args.only:
            build(spec, args.out)


if __name__ == "__main__":
    main()
