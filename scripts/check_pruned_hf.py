#!/usr/bin/env python3
"""Check `sglp-engine prune` against Hugging Face transformers, and store the result for the Rust tests.

For each fixture model (tests/fixtures/<name>/, made by scripts/make_fixtures.py):
  1. run `sglp-engine prune` on it (calibration = evaluation = the fixture's tokens.npy);
  2. load the pruned checkpoint with transformers (AutoModelForCausalLM, or AutoModelForImageTextToText for a
     vision-language one, float64; every tensor read, none missing) and run it on the tokens;
  3. build the same pruned model by surgery on the original in PyTorch (drop the removed decoder layers) and
     check both give the same logits: the checkpoint writer renamed, kept and renumbered the right tensors
     (and left a vision tower's alone);
  4. compare the engine's perplexity before/after (from sglp-report.json, and from `sglp-engine eval`)
     with PyTorch's;
  5. write tests/fixtures/pruned_reference/<name>.json (the prune arguments, removed layers, PyTorch's losses
     and perplexities) and <name>.logits.npy (float64 [sequences, tokens, vocab] logits of the pruned
     checkpoint), which tests/pruning_hf.rs compares against without Python.

    cargo build --release
    python3 scripts/check_pruned_hf.py [--engine target/release/sglp-engine]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

from make_fixtures import layers_name, lm_head, text_model  # the decoder's modules, by family (same folder)

# name → prune arguments (kept in the reference so the Rust test prunes the same way).
# The published chain's choices are pinned (column-sum features, proportional allocation, gradient-norm or
# subset selection), so the removed layers do not move when the default method changes.
PINNED = ["--features", "colsum", "--allocation", "proportional"]
# One layer out, chosen by gradient norm, batches of 2 sequences.
ONE_BY_GRADNORM = ["--remove", "1", "--batch", "2", "--cka-batch", "16", "--selection", "gradnorm"] + PINNED
# Two layers out, likewise (dense layers, layer bounds and layer kinds rewritten in more cases).
TWO_BY_GRADNORM = ["--remove", "2", "--batch", "2", "--cka-batch", "16", "--selection", "gradnorm"] + PINNED
# One layer out, chosen by the calibration loss without it (where that picks the layer whose removal
# moves the kept layers' kinds).
ONE_BY_LOSS = ["--remove", "1", "--batch", "2", "--cka-batch", "16", "--selection", "loss"] + PINNED
CASES = {
    "llama_llama3_rope": ONE_BY_GRADNORM,
    "llama_bf16_tied": ONE_BY_GRADNORM,
    "mistral_sharded": ["--target-layers", "2", "--batch", "2", "--cka-batch", "16",
                        "--selection", "subset"] + PINNED,
    # torch.save checkpoints: pruned into safetensors (shards and index for the sharded one).
    "llama_torch_bin": ONE_BY_GRADNORM,
    "mistral_torch_sharded": ["--target-layers", "2", "--batch", "2", "--cka-batch", "16",
                              "--selection", "subset"] + PINNED,
    # ALiBi: Falcon-RW (bf16), BLOOM (the hub's layout, without `transformer.`) and MPT (`n_layers`).
    "falcon_rw_alibi": ONE_BY_GRADNORM,
    "bloom_alibi": ONE_BY_GRADNORM,
    "mpt_alibi_clip": ONE_BY_GRADNORM,
    "gptj_rotary_dim": ONE_BY_GRADNORM,
    # Per-head q/k norm weights: Cohere's (Command R+) and StableLM 2 12B's (a module per head).
    "cohere_qk_norm": ONE_BY_GRADNORM,
    "stablelm_qk_layernorm": ONE_BY_GRADNORM,
    "codegen_shards": ONE_BY_GRADNORM,
    # GPT-BigCode: multi-query (bf16, tied) and per-head (untied); `n_layer` rewritten.
    "gpt_bigcode_mqa": ONE_BY_GRADNORM,
    "gpt_bigcode_mha": ONE_BY_GRADNORM,
    "qwen2_f16_bias": ["--remove", "1", "--batch", "3", "--cka-batch", "16",
                       "--selection", "gradnorm"] + PINNED,
    "qwen3_qk_norm": ONE_BY_GRADNORM,
    "phi3_longrope": ONE_BY_GRADNORM,
    "gemma_geglu": ONE_BY_GRADNORM,
    "gemma3_sandwich": ONE_BY_GRADNORM,
    "gemma2_softcap": ONE_BY_GRADNORM,
    "olmo2_post_norm": ONE_BY_GRADNORM,
    "gemma3_vision": TWO_BY_GRADNORM,
    "mistral3_vision": ONE_BY_GRADNORM,
    "granite_multipliers": ONE_BY_GRADNORM,
    "qwen2_5_vl_flat": ONE_BY_GRADNORM,
    "phi_parallel": ONE_BY_GRADNORM,
    "starcoder2_window": ONE_BY_GRADNORM,
    "neox_parallel": ONE_BY_GRADNORM,
    "neox_sequential": ONE_BY_GRADNORM,
    "mixtral_moe": ONE_BY_GRADNORM,
    "minimax_m2_sigmoid": ONE_BY_GRADNORM,
    "ernie4_5_moe_biased": TWO_BY_GRADNORM,
    # DeepSeek-V3: two of three layers out (first_k_dense_replace rewritten when the dense layer 0 goes).
    "deepseek_v3_mla": TWO_BY_GRADNORM,
    "deepseek_v3_q_proj": ONE_BY_GRADNORM,
    "deepseek_v2_grouped": ONE_BY_GRADNORM,
    "nemotron_layernorm1p": ONE_BY_GRADNORM,
    "jais2_layernorm": ONE_BY_GRADNORM,
    "ministral_layer_types": ONE_BY_GRADNORM,
    # CWM: the layer kinds its config only implies written out, so that each kept layer keeps its own.
    "cwm_layer_pattern": TWO_BY_GRADNORM,
    "ministral3_yarn": ONE_BY_GRADNORM,
    # Mistral 4: the kept mixture's experts fused as transformers 5 saves them, copied whole.
    "mistral4_mla": ONE_BY_GRADNORM,
    # EXAONE: the hub's num_layers rewritten, the hub's tensor names kept.
    "exaone_hub_names": ONE_BY_GRADNORM,
    # GLM-4.7-Flash and dots1: two of three layers out (mlp_layer_types sliced; first_k_dense_replace
    # and max_window_layers rewritten).
    "glm4_moe_lite_mla": TWO_BY_GRADNORM,
    "youtu_mla": ONE_BY_GRADNORM,
    # MiniCPM3: scale_depth rewritten so that each kept layer's residual scale (scale_depth / √layers)
    # stays the same.
    "minicpm3_scaled": ONE_BY_GRADNORM,
    "dots1_window": TWO_BY_GRADNORM,
    # GLM-4.5: two of three layers out (first_k_dense_replace rewritten when the dense layer 0 goes).
    "glm4_moe_sigmoid": TWO_BY_GRADNORM,
    "qwen2_moe_shared": ONE_BY_GRADNORM,
    "qwen3_moe_step": TWO_BY_GRADNORM,
    "olmoe_experts": ONE_BY_GRADNORM,
    "flex_olmo_post_norms": ONE_BY_GRADNORM,
    "granitemoe_experts": ONE_BY_GRADNORM,
    "granitemoeshared_shared_mlp": ONE_BY_GRADNORM,
    # Layer 1 out (the layer without a rotary embedding): the later layers' θs and kinds move up a place.
    "granite_swa_sinks": ["--remove", "1", "--batch", "2", "--cka-batch", "16", "--selection", "loss",
                          "--features", "rows", "--allocation", "adaptive"],
    "granitemoe_swa_sinks": ONE_BY_GRADNORM,
    # Layer 0 out (windowed): the kept layers' kinds, full then windowed, written out.
    "hunyuan_dense_ntk_alpha": ONE_BY_GRADNORM,
    "vaultgemma_pre_norms": ONE_BY_GRADNORM,
    "hunyuan_moe_shared": ONE_BY_GRADNORM,
    "gpt_neo_local": ONE_BY_GRADNORM,
    # HyperCLOVA X: the output norms kept under their own names (post_norm1, post_norm2).
    "hyperclovax_peri_norms": ONE_BY_GRADNORM,
    # Apertus: xIELU's parameters and buffers renumbered with their layers.
    "apertus_xielu": ONE_BY_GRADNORM,
    # HY V3: the dense layer 0 out, so that both kept layers are mixtures (mlp_layer_types written out: the
    # class would make the first dense), the hub's names kept.
    "hy_v3_moe": ONE_BY_LOSS,
    # MiniCPM 5 MoE: the dense layer 0 out (mlp_layer_types written out: the class would make the first kept
    # layer dense), the fused query and gate kept under the hub's name.
    "minicpm5_moe_gated": ONE_BY_LOSS,
    # EXAONE MoE: the windowed layer 2 out, so that the full layer 3 follows the full layer 1 (layer_types
    # written out: the pattern would window it), the router bias kept under the hub's name.
    "exaone_moe_window": ONE_BY_LOSS,
    # AFMoE: the dense layer 0 and the windowed layer 2 out: two full layers left (layer_types written out:
    # the pattern would window the first), num_dense_layers 0, the four norms and the router kept under
    # their own names.
    "afmoe_gated_window": ["--remove", "2", "--batch", "2", "--cka-batch", "16", "--selection", "loss"] + PINNED,
    # Llama 4: layer 1 (a mixture) out: the NoPE layer 2 and the mixture on layer 3 move up a place (the
    # derived no_rope_layers written out, moe_layers restated by the new indices, the fused experts
    # copied whole).
    "llama4_moe_nope": ONE_BY_LOSS,
    # Llama 4's wrapper: its text_config's moe_layers (as long as the layer count) restated, the vision tower
    # and projector copied.
    "llama4_vision": ONE_BY_GRADNORM,
    # FP8 blocks kept as stored (e4m3 + scales), quantization_config kept.
    "qwen3_fp8_blocks": ONE_BY_GRADNORM,
    "gpt_oss_sinks": ["--remove", "1", "--batch", "2", "--cka-batch", "16", "--selection", "loss",
                      "--features", "rows", "--allocation", "adaptive"],
    "opt_hub_layout": TWO_BY_GRADNORM,
    "gpt2_hub_layout": TWO_BY_GRADNORM,
    # Layers 1 and 2 out: the full-attention layer 3 (YaRN) becomes layer 1 of 2.
    "olmo3_yarn_window": ["--remove", "2", "--batch", "2", "--cka-batch", "16", "--selection", "subset"] + PINNED,
    # Layer 1 out: the NoPE, windowed layer 3 becomes layer 2 of 3 (the derived no_rope_layers written out).
    "smollm3_nope": ONE_BY_LOSS,
    "stablelm_sequential": ONE_BY_GRADNORM,
    "stablelm_parallel": ONE_BY_GRADNORM,
    "cohere_interleaved": ONE_BY_GRADNORM,
    "internlm3_dynamic": ONE_BY_GRADNORM,
    "falcon_multi_query": ONE_BY_GRADNORM,
    "ernie4_5_bias": ONE_BY_GRADNORM,
    "helium_interleaved": ONE_BY_GRADNORM,
    "seed_oss_bias": ONE_BY_GRADNORM,
    "arcee_relu2": ONE_BY_GRADNORM,
    "olmo_clip_qkv": ONE_BY_LOSS,
    # Layer 1 out: layer 2 renumbered under transformer.h.
    "falcon_new_arch": ONE_BY_LOSS,
    "falcon_sequential": ONE_BY_GRADNORM,
    "glm_interleaved": ONE_BY_GRADNORM,
    "glm4_sandwich": ONE_BY_GRADNORM,
    # Layers 0 and 3 out: the NoPE full-attention layer 1 becomes layer 0 (the pattern written out).
    "exaone4_window": ["--remove", "2", "--batch", "2", "--cka-batch", "16", "--selection", "subset"] + PINNED,
    "cohere2_nope_window": ONE_BY_LOSS,
}


def next_token_loss(logits, ids):
    """Mean next-token cross-entropy over every predicted position, float64."""
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    tgt = ids[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(pred, tgt, reduction="mean").item()


def load_f64(path):
    """The checkpoint in float64; every tensor of the file read and every parameter found in it."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
        vision_language = "text_config" in c or "vision_config" in c
    cls = transformers.AutoModelForImageTextToText if vision_language else transformers.AutoModelForCausalLM
    # A causal LM the auto classes know only inside a vision-language wrapper: its config's class.
    if not vision_language and c.get("architectures") == ["Mistral4ForCausalLM"]:
        cls = transformers.Mistral4ForCausalLM
    # Eager experts for a mixture of experts: the default grouped_mm refuses float64.
    # FP8 checkpoints: dequantised straight into float64 (q × scale in f32, as the engine reads them);
    # on a machine without a GPU transformers' default would round them to bf16.
    kw = dict(dtype=torch.float64) if c.get("quantization_config") else {}
    m, info = cls.from_pretrained(path, attn_implementation="eager", experts_implementation="eager",
                                  output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{path}: {bad}"
    return m.double().eval()




def surgery(model, kept):
    """The original model with only the `kept` decoder layers (reference for the checkpoint writer)."""
    text = text_model(model)
    layers = getattr(text, layers_name(text))
    setattr(text, layers_name(text), torch.nn.ModuleList([layers[i] for i in kept]))
    for new, layer in enumerate(getattr(text, layers_name(text))):
        for attn in ("self_attn", "self_attention", "attention", "attn"):
            if hasattr(layer, attn):
                getattr(layer, attn).layer_idx = new
                break
    config = model.config.get_text_config()
    config.num_hidden_layers = len(kept)
    # Per-layer settings read by position (Gemma 3's kinds, Granite SWA's rotary θs) follow their layers.
    for key in ("layer_types", "layer_rope_theta"):
        if getattr(config, key, None) is not None:
            setattr(config, key, [getattr(config, key)[i] for i in kept])
    return model


def other_modalities_diff(pruned, original):
    """Max |difference| of the parameters outside the language model (a vision tower, a projector), and
    their count (0 for a plain decoder)."""
    text = {id(p) for m in (text_model(pruned), lm_head(pruned)) for p in m.parameters()}
    theirs = dict(original.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in pruned.named_parameters() if id(p) not in text]
    return max(diffs, default=0.0), len(diffs)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="target/release/sglp-engine")
    ap.add_argument("--fixtures", default="tests/fixtures")
    ap.add_argument("--out", default="tests/fixtures/pruned_reference")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ok = True
    for name in a.cases:
        model_dir = os.path.join(a.fixtures, name)
        tokens_path = os.path.join(model_dir, "tokens.npy")
        ids = torch.from_numpy(np.load(tokens_path).astype(np.int64))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "pruned")
            cmd = [a.engine, "prune", "--model", model_dir, "--tokens", tokens_path, "--out", out,
                   "--eval-tokens", tokens_path] + CASES[name]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            report = json.load(open(os.path.join(out, "sglp-report.json")))
            removed, kept = report["removed"], report["kept"]
            eval_json = os.path.join(tmp, "eval.json")
            subprocess.run([a.engine, "eval", "--model", out, "--tokens", tokens_path, "--batch",
                            "2", "-o", eval_json], check=True, stdout=subprocess.DEVNULL)
            engine_eval_after = json.load(open(eval_json))["perplexity"]

            with torch.no_grad():
                pruned = load_f64(out)
                assert pruned.config.get_text_config().num_hidden_layers == len(kept)
                logits = pruned(ids).logits
                loss_after = next_token_loss(logits, ids)
                original = load_f64(model_dir)
                vision_diff, vision_tensors = other_modalities_diff(pruned, original)
                loss_before = next_token_loss(original(ids).logits, ids)
                ref_logits = surgery(original, kept)(ids).logits
            surgery_diff = (logits - ref_logits).abs().max().item()

        ppl_before, ppl_after = math.exp(loss_before), math.exp(loss_after)
        checks = {
            "checkpoint == surgery (max |Δlogit|)": (surgery_diff, surgery_diff < 1e-10),
            f"other modalities unchanged ({vision_tensors} tensors, max |Δ|)": (vision_diff,
                                                                                vision_diff == 0.0),
            "engine ppl before (report)": (rel(report["perplexity_before"], ppl_before),
                                           rel(report["perplexity_before"], ppl_before) < 1e-4),
            "engine ppl after (report)": (rel(report["perplexity_after"], ppl_after),
                                          rel(report["perplexity_after"], ppl_after) < 1e-4),
            "engine ppl after (eval on checkpoint)": (rel(engine_eval_after, ppl_after),
                                                      rel(engine_eval_after, ppl_after) < 1e-4),
        }
        print(f"{name}: removed {removed}, ppl {ppl_before:.6f} → {ppl_after:.6f}")
        for k, (v, good) in checks.items():
            print(f"  {k}: {v:.3e} {'ok' if good else 'FAIL'}")
            ok &= good
        ref = {
            "format": "sglp-pruned-reference/1",
            "model": name,
            "prune_args": CASES[name],
            "removed": removed,
            "kept": kept,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "perplexity_before": ppl_before,
            "perplexity_after": ppl_after,
            "logits_shape": list(logits.shape),
            "surgery_max_abs_diff": surgery_diff,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(ref, f, indent=2)
            f.write("\n")
        np.save(os.path.join(a.out, f"{name}.logits.npy"), logits.numpy().astype(np.float64))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
