#!/usr/bin/env python3
"""GPU runtime benchmark (issue 10): the engine's CUDA runtime against PyTorch on the same GPU, in one run.

For each model shape a random LLaMA-family checkpoint is built with `transformers` from a config and a
seed (the GPU machine has PyTorch and transformers but no network), saved as bf16 safetensors, then:

  torch_eager    one forward + backward of the loss on S sequences x T tokens (sdpa attention, bf16
                 weights and activations), timed with CUDA events, median of --reps after a warm-up;
  torch_compile  the same through torch.compile (when it works on that machine; the error is recorded
                 otherwise);
  engine         `sglp-engine --matmul bf16|f32 gradnorm --device cuda --timing` on the same tokens (its
                 per-batch forward + backward wall times; activations in f32, the linear products on
                 tensor cores from bf16-rounded operands, or in f32 throughout); engine_bf16_wgmma: the
                 bf16 products by the Hopper candidate (SGLP_LINEAR_KERNEL=wgmma);
  torch_gemm     cuBLAS (bf16, through PyTorch) on the linear shapes of benches/runtime_gpu.rs, the reference
                 rate for the engine's linear kernels (forward, and dx + dW together);
  agreement      engine loss, per-layer gradient norms and hidden states (`capture`, 2 sequences) against
                 PyTorch's, computed in float32 by PyTorch on the same weights (relative differences
                 reported, not asserted: the f32 mode should be within 1e-4, bf16 within about 1e-2);
  prune          with --prune: `sglp-engine prune --device cuda --remove 8` on --prune-seqs x T
                 calibration tokens, wall time and the stage timings from its report.

Shapes: `1b` (hidden 2048, 16 layers, intermediate 5632, 32 heads / 8 KV heads, vocab 32000) and `8b`
(hidden 4096, 32 layers, intermediate 14336, 32 / 8, vocab 128256).

Checked here without a GPU: python3 scripts/bench_runtime_gpu.py --cpu --shapes tiny --seqs 2 --tokens 16
--reps 2 --engine target/release/sglp-engine --prune --prune-seqs 4 --prune-remove 1 --out /tmp/rtb

Usage (GPU machine, repository root, after `bash .device/run-all.sh` unpacked the CLI into /tmp/dp/bin):
  python3 scripts/bench_runtime_gpu.py --shapes 1b --out $OUT
  python3 scripts/bench_runtime_gpu.py --shapes 1b,8b --prune --out $OUT
Writes runtime_gpu.json into --out.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # For --cpu: a dry run of this script's own logic on a machine without a GPU.
    "tiny": dict(hidden_size=128, num_hidden_layers=3, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=256),
}

DEVICE = "cuda"


def engine_exe(given):
    if given:
        return given
    for pattern in ("/tmp/dp/bin/sglp-engine", "target/release/sglp-engine"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return shutil.which("sglp-engine") or "sglp-engine"


def cuda_time(fn, reps):
    import torch
    if DEVICE == "cpu":
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], times
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2], times


# The linear shapes of benches/runtime_gpu.rs (a LLaMA-3-8B layer and its lm_head, 8 x 512 tokens): (what, k, m).
GEMM_SHAPES = [("q/o proj 4096->4096", 4096, 4096), ("mlp up 4096->14336", 4096, 14336),
               ("mlp down 14336->4096", 14336, 4096), ("lm_head 4096->128256", 4096, 128256)]


def torch_gemms(n, reps):
    """cuBLAS through PyTorch on the linear shapes of benches/runtime_gpu.rs, bf16 operands: the forward
    y = x W^T and the backward dx = dy W plus dW = dy^T x (timed together, as the engine's bench does), in
    ms and TFLOP/s. The engine's `linear` lines (bench.log) divide by these for the ratio against cuBLAS."""
    import torch
    out = {}
    for what, k, m in GEMM_SHAPES:
        x = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        dy = torch.randn(n, m, device=DEVICE, dtype=torch.bfloat16)
        flops = 2.0 * n * k * m
        t_f, _ = cuda_time(lambda: x @ w.t(), reps)
        t_b, _ = cuda_time(lambda: (dy @ w, dy.t() @ x), reps)
        out[what] = dict(forward_ms=t_f * 1e3, forward_tflops=flops / t_f / 1e12,
                         backward_ms=t_b * 1e3, backward_tflops=2 * flops / t_b / 1e12)
        del x, w, dy
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prune", action="store_true")
    ap.add_argument("--prune-seqs", type=int, default=64)
    ap.add_argument("--prune-remove", type=int, default=8)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cpu", action="store_true",
                    help="dry run on the CPU (e.g. --shapes tiny --seqs 2 --tokens 16): checks this script")
    a = ap.parse_args()
    global DEVICE
    DEVICE = "cpu" if a.cpu else "cuda"

    import numpy as np
    import torch
    import transformers

    os.makedirs(a.out, exist_ok=True)
    exe = engine_exe(a.engine)
    report = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, seqs=a.seqs, tokens=a.tokens, engine=exe, shapes={})
    if DEVICE == "cuda":
        report["torch_gemm_bf16"] = torch_gemms(a.seqs * a.tokens, a.reps)
        print("torch bf16 GEMMs (cuBLAS):", json.dumps(report["torch_gemm_bf16"]), flush=True)
    for name in a.shapes.split(","):
        cfg = transformers.LlamaConfig(**SHAPES[name], rms_norm_eps=1e-5, max_position_embeddings=4096,
                                       tie_word_embeddings=False, torch_dtype="bfloat16")
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        rng = np.random.default_rng(0)
        ids_np = rng.integers(0, cfg.vocab_size, size=(a.seqs, a.tokens)).astype(np.int64)
        ids = torch.from_numpy(ids_np).to(DEVICE)
        entry = dict(params=n_params, config=SHAPES[name])
        report["shapes"][name] = entry
        shown = set()

        def save(stage):
            # After each stage: the JSON so far and a line with what is new (a timeout keeps what was measured).
            with open(os.path.join(a.out, "runtime_gpu.json"), "w") as f:
                json.dump(report, f, indent=1)
            new = {k: v for k, v in entry.items() if k not in shown}
            shown.update(new)
            print(f"{name} {stage}: {json.dumps(new)}", flush=True)

        def step(m=model):
            m.zero_grad(set_to_none=True)
            logits = m(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            loss.backward()
            return loss

        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        entry["torch_eager_s"], entry["torch_eager_all_s"] = cuda_time(step, a.reps)
        if DEVICE == "cuda":
            entry["torch_eager_peak_bytes"] = torch.cuda.max_memory_allocated()
        compiled = None
        try:
            if DEVICE == "cpu":
                raise RuntimeError("not tried in a CPU dry run")
            compiled = torch.compile(model)
            entry["torch_compile_s"], _ = cuda_time(lambda: step(compiled), a.reps)
        except Exception as e:  # recorded, not fatal: torch.compile needs a working toolchain there
            entry["torch_compile_error"] = f"{type(e).__name__}: {e}"[:400]
        save("torch")

        # Reference loss, gradient norms and hidden states in float32 on the same weights, with gradient
        # checkpointing (same values; an 8B model's f32 weights and gradients alone take 64 GB). Out of
        # memory is recorded, and the comparisons are left out. The last step's gradients go first, or
        # .float() converts them too (8B: 30 GiB more, outside the try).
        model.zero_grad(set_to_none=True)
        ref = model.float()
        per_layer, torch_hidden = None, None
        try:
            ref.gradient_checkpointing_enable()
            ref.zero_grad(set_to_none=True)
            logits = ref(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            del logits
            loss.backward()
            per_layer = []
            for layer in ref.model.layers:
                per_layer.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in layer.parameters()))))
            entry["torch_f32_loss"] = float(loss)
            del loss
            ref.zero_grad(set_to_none=True)
            ref.gradient_checkpointing_disable()
            # Hidden states of the first 2 sequences: HF's hidden_states[l + 1] is layer l's output for
            # l < L − 1 (the last entry is after the final norm, so it is left out).
            with torch.no_grad():
                hs = ref(input_ids=ids[:2], use_cache=False, output_hidden_states=True).hidden_states
                torch_hidden = [h.float().cpu().numpy() for h in hs[1:-1]]
                del hs
        except RuntimeError as e:  # out of memory above all (cuBLAS reports its own as a plain RuntimeError)
            entry["torch_f32_error"] = f"{type(e).__name__}: {e}"[:300]
        logits = loss = None  # what an out-of-memory left (the graph of a failed backward)
        ref.zero_grad(set_to_none=True)
        model = ref.to(torch.bfloat16)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        save("torch_f32")

        with tempfile.TemporaryDirectory(dir=a.workdir) as d:
            model.save_pretrained(d, safe_serialization=True)
            # The engine gets the GPU: `ref`, step's default argument and the compiled wrapper (and dynamo's
            # graphs) hold this same module, so `del model` alone freed nothing; its weights go to the CPU.
            model.to("cpu")
            del model, ref, step, compiled
            if DEVICE == "cuda":
                import torch._dynamo
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            tok = os.path.join(d, "tokens.npy")
            np.save(tok, np.tile(ids_np, (a.reps + 1, 1)))
            os.sync()
            # Tensor cores (the default, mma.sync), the Hopper candidate (wgmma on bf16 copies of the
            # operands; on other GPUs the engine runs mma.sync), then f32 SIMT products.
            variants = [("bf16", "bf16", {}), ("f32", "f32", {})]
            if DEVICE == "cuda":
                variants.insert(1, ("bf16_wgmma", "bf16", {"SGLP_LINEAR_KERNEL": "wgmma"}))
            for variant, matmul, env in variants:
                out = os.path.join(d, f"g-{variant}.json")
                key = f"engine_{variant}"
                t0 = time.perf_counter()
                p = subprocess.run([exe, "--matmul", matmul, "gradnorm", "--device", DEVICE, "--model", d,
                                    "--tokens", tok, "--batch", str(a.seqs), "--timing", "--out", out],
                                   capture_output=True, text=True, env={**os.environ, **env})
                entry[f"{key}_process_s"] = time.perf_counter() - t0
                if p.returncode != 0:
                    entry[f"{key}_error"] = p.stderr[-2000:]
                    save(key)
                    continue
                g = json.load(open(out))
                steps = g["timing"]["forward_backward_s"][1:]
                entry[f"{key}_s"] = sorted(steps)[len(steps) // 2]
                entry[f"{key}_all_s"] = steps
                entry[f"{key}_loss"] = g["loss"]
                entry[f"{key}_over_torch_eager"] = entry[f"{key}_s"] / entry["torch_eager_s"]
                save(key)
                if per_layer is None:
                    continue  # no f32 reference to compare with
                rel = [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(g["gradnorm"], per_layer)]
                entry[f"{key}_gradnorm_max_rel_diff_vs_torch_f32"] = max(rel)
                entry[f"{key}_loss_rel_diff_vs_torch_f32"] = abs(g["loss"] - entry["torch_f32_loss"]) / entry["torch_f32_loss"]
                # Hidden states: `capture` on the same 2 sequences, max |engine − torch| / max |torch| per layer.
                tok2 = os.path.join(d, "tokens2.npy")
                np.save(tok2, ids_np[:2])
                hfile = os.path.join(d, f"h-{variant}.safetensors")
                p = subprocess.run([exe, "--matmul", matmul, "capture", "--device", DEVICE, "--model", d,
                                    "--tokens", tok2, "--batch", "2", "--out", hfile],
                                   capture_output=True, text=True, env={**os.environ, **env})
                if p.returncode != 0:
                    entry[f"{key}_capture_error"] = p.stderr[-2000:]
                elif torch_hidden is not None:
                    from safetensors.numpy import load_file
                    got = load_file(hfile)
                    rel_h = [float(np.abs(got[f"model.layers.{l}"] - th).max() / np.abs(th).max())
                             for l, th in enumerate(torch_hidden)]
                    entry[f"{key}_hidden_max_rel_diff_vs_torch_f32"] = max(rel_h)
                    os.remove(hfile)
                save(f"{key} agreement")
            if a.prune:
                calib = os.path.join(d, "calib.npy")
                np.save(calib, rng.integers(0, cfg.vocab_size, size=(a.prune_seqs, a.tokens)).astype(np.int64))
                pdir = os.path.join(d, "pruned")
                t0 = time.perf_counter()
                p = subprocess.run([exe, "prune", "--device", DEVICE, "--model", d, "--tokens", calib,
                                    "--remove", str(a.prune_remove), "--out", pdir], capture_output=True, text=True)
                entry["prune_wall_s"] = time.perf_counter() - t0
                if p.returncode != 0:
                    entry["prune_error"] = p.stderr[-2000:]
                else:
                    rep = json.load(open(os.path.join(pdir, "sglp-report.json")))
                    entry["prune_timings"] = rep.get("timings") or rep.get("timing")
                save("prune")
        report["shapes"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    with open(os.path.join(a.out, "runtime_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
