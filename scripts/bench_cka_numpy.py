#!/usr/bin/env python3
"""Time all-pairs minibatch CKA in numpy and in sglp-engine on the same workload, in one run.

The numpy side is the batched formulation (Nguyen, Raghu & Kornblith 2021, Google's minibatch CKA): per batch,
the Gram of every layer (X @ X.T, which numpy routes to BLAS syrk), U-centred as one stacked (L, b, b) array,
then one matrix product G @ G.T of the stacked (L, b*b) Grams for all pairs. Both sides read the same .npy
shards (memory-mapped); numpy runs in float64 (the reference) and in float32 (the faster one), the engine
with its default Grams (`--precision f32`: column means subtracted in f64, f32 GEMM, f64 centring) or
`--precision f64`. The engine runs as the release CLI, so its time includes process start, reading and
conversion; the numpy time includes reading the memory-mapped shards too. Best of --repeats for all three.

Usage:
  cargo build --release
  python3 scripts/bench_cka_numpy.py --layers 32 --batch 1024 --width 4096 --batches 2
  python3 scripts/bench_cka_numpy.py --memory-check     # peak RSS with 1x and 4x the samples (4 shards)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_shards(root, n_shards, layers, rows_per_shard, width, seed):
    rng = np.random.default_rng(seed)
    latent = 16
    maps = [rng.standard_normal((latent, width), dtype=np.float32) for _ in range(layers)]
    dirs = []
    for s in range(n_shards):
        d = os.path.join(root, f"shard{s}")
        os.makedirs(d)
        z = rng.standard_normal((rows_per_shard, latent), dtype=np.float32)
        for l in range(layers):
            x = z @ maps[l] + (0.5 + 0.05 * l) * rng.standard_normal((rows_per_shard, width), dtype=np.float32)
            np.save(os.path.join(d, f"layer{l}.npy"), x.astype(np.float32))
        dirs.append(d)
    return dirs


def u_centre(k):
    """U-centre a stack of Grams (L, n, n) in place (Song et al. 2012)."""
    n = k.shape[-1]
    idx = np.arange(n)
    k[:, idx, idx] = 0.0
    m = k.sum(axis=-1) / (n - 2)
    m -= m.sum(axis=-1, keepdims=True) / (2 * (n - 1))
    k -= m[:, :, None] + m[:, None, :]
    k[:, idx, idx] = 0.0
    return k


def numpy_cka(dirs, layers, batch, dtype):
    arrays = [[np.load(os.path.join(d, f"layer{l}.npy"), mmap_mode="r") for l in range(layers)] for d in dirs]
    hsic = np.zeros((layers, layers))
    nb = 0
    for shard in arrays:  # batches do not straddle shards in this workload (rows % batch == 0)
        rows = shard[0].shape[0]
        for s in range(0, rows - batch + 1, batch):
            grams = np.empty((layers, batch, batch), dtype=dtype)
            for l in range(layers):
                x = np.asarray(shard[l][s:s + batch], dtype=dtype)
                grams[l] = x @ x.T
            g = u_centre(grams).reshape(layers, -1)
            hsic += (g @ g.T) / (batch * (batch - 3))
            nb += 1
    hsic /= nb
    d = np.sqrt(np.diag(hsic))
    return hsic / np.outer(d, d)


def run_engine(engine, dirs, batch, out, precision=None):
    cmd = ["/usr/bin/time", "-f", "%M %e", engine, "cka", "--estimator", "unbiased", "--cka-batch", str(batch),
           "--device", "cpu", "--out", out]
    if precision:
        cmd += ["--precision", precision]
    for d in dirs:
        cmd += ["--input", d]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"engine failed: {p.stderr}")
    rss_kb = int(p.stderr.strip().splitlines()[-1].split()[0])
    with open(out) as f:
        res = json.load(f)
    cka = np.array([[np.nan if v is None else v for v in row] for row in res["cka"]])
    return wall, rss_kb / 1024, cka


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=2, help="batches per shard")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine", default="target/release/sglp-engine")
    ap.add_argument("--memory-check", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["f32", "f64"], default=None,
                    help="the engine's --precision (default: the engine's default)")
    a = ap.parse_args()

    root = tempfile.mkdtemp(prefix="sglp-bench-")
    try:
        if a.memory_check:
            # Same shard size; 1 shard vs 4 shards: the engine's peak RSS should not grow.
            dirs = write_shards(root, 4, a.layers, a.batch * a.batches, a.width, a.seed)
            for k in (1, 4):
                wall, rss, _ = run_engine(a.engine, dirs[:k], a.batch, os.path.join(root, "out.json"))
                print(f"engine, {k} shard(s) of {a.batch * a.batches} samples: {wall:.2f} s, peak RSS {rss:.0f} MiB")
            return
        dirs = write_shards(root, a.shards, a.layers, a.batch * a.batches, a.width, a.seed)
        n = a.shards * a.batches * a.batch
        print(f"workload: L={a.layers} layers, d={a.width}, b={a.batch}, {a.shards * a.batches} batches "
              f"({n} samples), f32 on disk, float64 compute, {os.cpu_count()} CPU(s)")
        best_np, best_np32, best_eng = float("inf"), float("inf"), float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ref = numpy_cka(dirs, a.layers, a.batch, np.float64)
            best_np = min(best_np, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref32 = numpy_cka(dirs, a.layers, a.batch, np.float32)
            best_np32 = min(best_np32, time.perf_counter() - t0)
            wall, rss, cka = run_engine(a.engine, dirs, a.batch, os.path.join(root, "out.json"), a.precision)
            best_eng = min(best_eng, wall)
        diff = np.nanmax(np.abs(cka - ref))
        diff32 = np.nanmax(np.abs(ref32 - ref))
        print(f"numpy float64 (batched, syrk Grams): {best_np:.3f} s")
        print(f"numpy float32 (same):                {best_np32:.3f} s  (max |CKA diff| to float64 = {diff32:.2e})")
        print(f"sglp-engine cka --device cpu{'' if a.precision is None else ' --precision ' + a.precision}: "
              f"{best_eng:.3f} s  (peak RSS {rss:.0f} MiB, max |CKA diff| to numpy float64 = {diff:.2e})")
        print(f"engine / numpy_f32 = {best_eng / best_np32:.2f}x   engine / numpy_f64 = {best_eng / best_np:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
