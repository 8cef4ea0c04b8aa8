#!/usr/bin/env python3
"""One forward + backward of a ~100M-parameter LLaMA-shaped model on the CPU: PyTorch against the engine's
runtime (`sglp-engine gradnorm --timing`), same model, same tokens, same machine, one run.

    /work/venvs/torch/bin/python scripts/bench_runtime_torch.py [--engine target/release/sglp-engine]

Builds a random LlamaForCausalLM (hidden 768, 12 layers, intermediate 2048, 12 heads / 4 kv heads,
vocab 32000: ~125M parameters), saves it as an f32 safetensors checkpoint, times PyTorch's forward +
backward (loss = mean next-token cross-entropy, f32) on 4 sequences of 256 tokens, then runs the engine on
the same checkpoint and tokens and reports the median times and their ratio. The first step of each is a
warm-up and is not counted; PyTorch's timed steps are split before and after the engine's run.

With `--experts N --top-k K` the model is a Mixtral (MixtralForCausalLM) instead: every MLP a mixture of N
experts of `--intermediate` each, K per token (PyTorch runs transformers' default experts implementation,
named in the report; `--experts-impl eager` picks its per-expert loop).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--engine", default=os.path.join(here, "..", "target", "release", "sglp-engine"))
    ap.add_argument("--reps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--attn", default="sdpa", help="PyTorch attention implementation (sdpa or eager)")
    ap.add_argument("--workdir", default=None, help="where to save the checkpoint (default: a temp dir)")
    ap.add_argument("--experts", type=int, default=0, help="a Mixtral with this many experts per layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (with --experts)")
    ap.add_argument("--experts-impl", default=None, help="transformers' experts implementation")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    shape = dict(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        rms_norm_eps=1e-5, max_position_embeddings=4096,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    if args.experts:
        config = transformers.MixtralConfig(**shape, num_local_experts=args.experts,
                                            num_experts_per_tok=args.top_k, sliding_window=None)
        kw = {} if args.experts_impl is None else dict(experts_implementation=args.experts_impl)
        model = transformers.MixtralForCausalLM._from_config(config, attn_implementation=args.attn, **kw)
        family = f"Mixtral ({args.experts} experts, top {args.top_k})"
    else:
        config = transformers.LlamaConfig(**shape)
        config._attn_implementation = args.attn
        model = transformers.LlamaForCausalLM(config)
        family = "LLaMA"
    model = model.float()
    n_params = sum(p.numel() for p in model.parameters())

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(args.seqs, args.tokens)).astype(np.int64)
    ids = torch.from_numpy(tokens)

    def torch_step():
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    torch_step()
    torch_times, torch_loss = [], None

    def time_torch(reps):
        nonlocal torch_loss
        for _ in range(reps):
            t, torch_loss = torch_step()
            torch_times.append(t)

    # Half of PyTorch's steps before the engine and half after, so a change in machine load during the run
    # shows up on both sides.
    time_torch((args.reps + 1) // 2)

    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        model.save_pretrained(d, safe_serialization=True)
        tok_path = os.path.join(d, "tokens.npy")
        # reps + 1 batches of the same sequences: the first is the warm-up.
        np.save(tok_path, np.tile(tokens, (args.reps + 1, 1)))
        # Flush the ~500 MB just written before timing: otherwise the kernel writes those dirty pages back
        # while the engine runs (it maps the same file), and the engine's steps pay for the benchmark's save.
        os.sync()
        out = os.path.join(d, "g.json")
        cmd = [args.engine, "gradnorm", "--model", d, "--tokens", tok_path, "--batch", str(args.seqs),
               "--out", out, "--timing"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        engine_wall = time.perf_counter() - t0
        with open(out) as f:
            res = json.load(f)
    engine_times = res["timing"]["forward_backward_s"][1:]
    time_torch(args.reps // 2)

    tm, em = statistics.median(torch_times), statistics.median(engine_times)
    report = {
        "workload": f"{family} {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
                    f"inter {args.intermediate}, {args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}), "
                    f"{args.seqs}x{args.tokens} tokens, f32, forward+backward",
        "cpu_threads_torch": threads,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_attn": args.attn,
        "torch_experts_impl": getattr(model.config, "_experts_implementation", None) if args.experts else None,
        "torch_s": torch_times,
        "engine_s": engine_times,
        "torch_median_s": tm,
        "engine_median_s": em,
        "engine_over_torch": em / tm,
        # On a shared machine load only adds time: the minimum is the least disturbed step of each.
        "torch_min_s": min(torch_times),
        "engine_min_s": min(engine_times),
        "engine_over_torch_min": min(engine_times) / min(torch_times),
        "load_average_after": os.getloadavg(),
        "torch_loss": torch_loss,
        "engine_loss": res["loss"],
        "engine_process_wall_s": engine_wall,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
