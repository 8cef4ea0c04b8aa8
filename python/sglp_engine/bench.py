"""``python -m sglp_engine.bench``: one minibatch-CKA workload (all pairs of L layers, unbiased HSIC₁ over batches
of b samples, float64 arithmetic) through ``sglp_engine.cka`` from NumPy arrays, NumPy's batched formulation, and
the PyPI packages ``ckatorch`` and ``pytorch-cka`` (when installed), on the same threads, in one run.

    OMP_NUM_THREADS=2 python -m sglp_engine.bench --layers 12 --width 768 --batch 256 --batches 8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _pin_threads(n: int) -> None:
    # Before NumPy / PyTorch load their BLAS.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)


def _numpy_batched(acts, b):
    """Google's minibatch CKA, batched: per batch the stacked Grams, U-centred, all pairs as one product."""
    import numpy as np

    L, n = len(acts), acts[0].shape[0]
    hsic = np.zeros((L, L))
    idx = np.arange(b)
    for s in range(0, n - b + 1, b):
        k = np.stack([x[s:s + b].astype(np.float64) @ x[s:s + b].astype(np.float64).T for x in acts])
        k[:, idx, idx] = 0.0
        m = k.sum(axis=-1) / (b - 2)
        m -= m.sum(axis=-1, keepdims=True) / (2 * (b - 1))
        k -= m[:, :, None] + m[:, None, :]
        k[:, idx, idx] = 0.0
        g = k.reshape(L, -1)
        hsic += g @ g.T / (b * (b - 3))
    d = np.sqrt(np.diag(hsic))
    return hsic / np.outer(d, d)


def _ckatorch(acts, b):
    """ckatorch's minibatch CKA (``cka_batch``) for every pair of layers."""
    import numpy as np
    import torch
    from ckatorch.core import cka_batch

    L, n = len(acts), acts[0].shape[0]
    nb = n // b
    t = [torch.from_numpy(x[: nb * b]).reshape(nb, b, -1) for x in acts]
    out = np.eye(L)
    for i in range(L):
        for j in range(i + 1, L):
            out[i, j] = out[j, i] = float(cka_batch(t[i], t[j]))
    return out


def _pytorch_cka(acts, b):
    """pytorch-cka's accumulation (as its ``CKA`` class does for one model): per batch the stacked Grams and
    ``hsic_cross``, summed; CKA from the sums (without its clamp to [0, 1])."""
    import torch
    from cka.hsic import hsic_cross

    L, n = len(acts), acts[0].shape[0]
    t = [torch.from_numpy(x).double() for x in acts]
    h = torch.zeros(L, L, dtype=torch.float64)
    for s in range(0, n - b + 1, b):
        grams = torch.stack([x[s:s + b] @ x[s:s + b].T for x in t])
        h += hsic_cross(grams, grams)
    d = torch.sqrt(torch.diagonal(h))
    return (h / torch.outer(d, d)).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    _pin_threads(a.threads)

    import numpy as np

    import sglp_engine

    try:
        import torch

        torch.set_num_threads(a.threads)
    except ImportError:
        torch = None

    rng = np.random.default_rng(0)
    n = a.batch * a.batches
    z = rng.standard_normal((n, 16), dtype=np.float32)
    acts = [(z @ rng.standard_normal((16, a.width), dtype=np.float32)
             + rng.standard_normal((n, a.width), dtype=np.float32)) for _ in range(a.layers)]
    named = {f"layer{i}": x for i, x in enumerate(acts)}

    def engine(_acts, b):
        return sglp_engine.cka(named, batch_size=b, device="cpu", threads=a.threads).cka

    runs = [("sglp_engine.cka (NumPy f32 in place)", engine), ("NumPy batched (f64)", _numpy_batched)]
    if torch is not None:
        for name, fn, mod in [("ckatorch.core.cka_batch, all pairs (f64)", _ckatorch, "ckatorch"),
                              ("pytorch-cka hsic_cross (f64)", _pytorch_cka, "cka.hsic")]:
            try:
                __import__(mod)
                runs.append((name, fn))
            except ImportError:
                print(f"skipped {name}: not installed (pip install ckatorch pytorch-cka)")
    print(f"workload: L={a.layers} layers × d={a.width}, {a.batches} batches of b={a.batch} "
          f"({n} samples, f32 arrays), {a.threads} threads, {os.cpu_count()} CPUs visible")
    ref = _numpy_batched(acts, a.batch)
    times = {}
    for name, fn in runs:
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn(acts, a.batch)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
        print(f"{name:45s} {best:8.3f} s   max |CKA − NumPy| = {np.nanmax(np.abs(out - ref)):.1e}")
    eng = times[runs[0][0]]
    others = {k: v for k, v in times.items() if k != runs[0][0]}
    fastest = min(others, key=others.get)
    print(f"ratio: fastest other ({fastest}) / sglp_engine = {others[fastest] / eng:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
