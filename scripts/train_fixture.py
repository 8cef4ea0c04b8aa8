#!/usr/bin/env python3
"""Train the `tests/fixtures/trained_llama` fixture: a small LLaMA (12 layers, hidden 128, GQA 4/2 heads,
byte vocabulary of 256) that has actually learned something, for pruning-quality benchmarks where layers
must matter differently, as they do in a real language model.

Data: the running Python's own standard library sources, byte level (token = byte value 0..255). The files
are the top-level `*.py` files of `os.path.dirname(os.__file__)`, sorted by name, skipping any that are not
valid UTF-8:
  training files   first letter of the name (lower-cased) in a..p
  held-out files   first letter in r..z   (disjoint from training; names starting with `_` or `q` unused)
The files of each split are concatenated (in name order) into one byte stream; windows are drawn from it.

Model: `transformers.LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=12,
num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
rms_norm_eps=1e-5, rope_theta=10000, tie_word_embeddings=False)`, torch.manual_seed(0), float32 training.
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1.0), linear warmup (30 steps)
then cosine decay to 10% of the peak over the wall-clock budget (the schedule follows elapsed time, so the
step count depends on the machine), batches of 32 random 128-byte windows of the training stream.

Output, in --out (default tests/fixtures/trained_llama):
  config.json, model.safetensors   `save_pretrained(safe_serialization=True)` with float16 weights
  calib.npy      int32 [32, 128]   random windows of the training stream (seed 1)
  heldout.npy    int32 [64, 128]   random windows of the held-out stream (seed 2)
  meta.json      steps, wall time, final train loss, held-out loss / perplexity of the SAVED float16 weights
                 (reloaded, upcast to float64, eager attention; mean next-token cross-entropy over all
                 64 x 127 predicted positions of heldout.npy), unigram baseline, file lists, python version

Rerun (CPU, 2 threads; the default budget of 12 minutes of training plus ~1 minute of setup/evaluation):
    python3 scripts/train_fixture.py [--minutes 12] [--out tests/fixtures/trained_llama] [--threads 2]
Needs torch, numpy, safetensors, transformers. The result is not bit-reproducible across machines (the
number of steps follows the wall clock), only statistically.
"""
import argparse
import glob
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

SEQ = 128
BATCH = 32
CALIB_SEQS = 32
HELD_SEQS = 64
SEED = 0
WARMUP = 30


def stdlib_split():
    root = os.path.dirname(os.__file__)
    train, held, skipped = [], [], []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        name = os.path.basename(path)
        first = name[0].lower()
        if "a" <= first <= "p":
            bucket = train
        elif "r" <= first <= "z":
            bucket = held
        else:
            continue
        data = open(path, "rb").read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(name)
            continue
        bucket.append((name, data))
    return root, train, held, skipped


def windows(stream, n, rng):
    starts = rng.integers(0, len(stream) - SEQ, size=n)
    return np.stack([stream[s:s + SEQ] for s in starts]).astype(np.int32)


def make_model():
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def mean_ce(model, tokens, batch=16):
    """Mean next-token cross-entropy over every predicted position of `tokens` [n, len]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            x = torch.as_tensor(tokens[i:i + batch], dtype=torch.long)
            logits = model(input_ids=x).logits
            dt = logits.dtype
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, 256).to(dt), x[:, 1:].reshape(-1), reduction="sum")
            total += ce.item()
            count += x[:, 1:].numel()
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget")
    ap.add_argument("--out", default="tests/fixtures/trained_llama")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences per training step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)

    root, train_files, held_files, skipped = stdlib_split()
    train = np.frombuffer(b"".join(d for _, d in train_files), dtype=np.uint8)
    held = np.frombuffer(b"".join(d for _, d in held_files), dtype=np.uint8)
    print(f"stdlib {root}: {len(train_files)} training files ({len(train)} bytes), "
          f"{len(held_files)} held-out files ({len(held)} bytes), skipped {skipped}", flush=True)

    calib = windows(train, CALIB_SEQS, np.random.default_rng(1))
    heldout = windows(held, HELD_SEQS, np.random.default_rng(2))
    # unigram baseline: training byte frequencies (add-one), scored on the held-out predicted positions
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    unigram_ce = float(-logp[heldout[:, 1:]].mean())

    model = make_model()
    model.config._attn_implementation = "eager"  # faster than sdpa on CPU at this size
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters; unigram held-out CE {unigram_ce:.4f} "
          f"(ppl {math.exp(unigram_ce):.2f})", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(SEED)
    budget = a.minutes * 60.0
    t0 = time.time()
    step, ema = 0, None
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        if step < WARMUP:
            lr = a.lr * (step + 1) / WARMUP
        else:
            frac = min(1.0, elapsed / budget)
            lr = a.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.as_tensor(windows(train, a.batch, rng), dtype=torch.long)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss = out.loss.item()
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        if step % 20 == 0 or step == 1:
            print(f"step {step:5d}  t {time.time() - t0:7.1f}s  lr {lr:.2e}  loss {loss:.4f}  ema {ema:.4f}",
                  flush=True)
    wall = time.time() - t0
    print(f"trained {step} steps in {wall:.1f}s; final train loss {loss:.4f} (ema {ema:.4f})", flush=True)

    # save float16 weights
    os.makedirs(a.out, exist_ok=True)
    model.eval()
    model.config._attn_implementation = "eager"
    model.half()
    model.save_pretrained(a.out, safe_serialization=True)
    np.save(os.path.join(a.out, "calib.npy"), calib)
    np.save(os.path.join(a.out, "heldout.npy"), heldout)

    # evaluate the saved float16 weights, upcast: float64 and float32
    saved = transformers.LlamaForCausalLM.from_pretrained(a.out, torch_dtype=torch.float64,
                                                          attn_implementation="eager")
    saved.eval()
    held_ce64 = mean_ce(saved, heldout)
    held_ce32 = mean_ce(saved.float(), heldout)
    calib_ce = mean_ce(saved.double(), calib)
    print(f"held-out CE (saved f16 weights): f64 {held_ce64:.6f} ppl {math.exp(held_ce64):.6f}; "
          f"f32 {held_ce32:.6f} ppl {math.exp(held_ce32):.6f}; calib CE {calib_ce:.4f}; "
          f"unigram ppl {math.exp(unigram_ce):.3f}", flush=True)

    meta = dict(
        description="byte-level LLaMA trained on the Python standard library's own sources "
                    "(scripts/train_fixture.py)",
        seed=SEED, python_version=platform.python_version(), torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        stdlib_dir=root,
        split_rule="top-level *.py of os.path.dirname(os.__file__), sorted by name, UTF-8 only; "
                   "training: first letter (lower-cased) a..p; held-out: r..z; each split concatenated",
        train_files=[n for n, _ in train_files], heldout_files=[n for n, _ in held_files],
        skipped_not_utf8=skipped, train_bytes=int(len(train)), heldout_bytes=int(len(held)),
        parameters=n_params, seq_len=SEQ, batch=a.batch, peak_lr=a.lr, warmup_steps=WARMUP,
        weight_decay=0.1, grad_clip=1.0, minutes_budget=a.minutes, threads=a.threads,
        train_steps=step, train_wall_seconds=round(wall, 1), train_tokens=step * a.batch * SEQ,
        final_train_loss=loss, final_train_loss_ema=ema,
        calib=dict(file="calib.npy", shape=list(calib.shape), dtype="int32", source="training stream",
                   rng="numpy default_rng(1)", loss=calib_ce),
        heldout=dict(file="heldout.npy", shape=list(heldout.shape), dtype="int32",
                     source="held-out stream", rng="numpy default_rng(2)",
                     predicted_tokens=int(heldout[:, 1:].size),
                     loss_f64=held_ce64, perplexity_f64=math.exp(held_ce64),
                     loss_f32=held_ce32, perplexity_f32=math.exp(held_ce32),
                     note="saved float16 weights upcast, eager attention, mean next-token cross-entropy "
                          "over all positions"),
        unigram_baseline=dict(loss=unigram_ce, perplexity=math.exp(unigram_ce),
                              note="add-one training byte frequencies scored on heldout.npy"),
    )
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("wrote", a.out, flush=True)


if __name__ == "__main__":
    main()
