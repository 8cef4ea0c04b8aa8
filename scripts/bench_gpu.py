#!/usr/bin/env python3
"""GPU benchmark: sglp-engine's CUDA backend against PyTorch on the same GPU, in one run.

Workloads (unbiased linear CKA, all layer pairs):
  resnet_like: 28 layers (10 x 16,384, 9 x 8,192, 9 x 4,096 features), b = 500, f32, 5 batches;
  llm_like:    32 layers, b = 1,024, d = 4,096, bf16, 64 batches.

Contenders:
  engine      the bench binary (benches/cka_gpu.rs, SGLP_BENCH_JSON mode): per batch, uploads from host
              memory included, stage times from CUDA events; engine_pipelined, engine_wgmma and
              engine_wgmma_tma with the candidate tensor-core Gram kernels, engine_no_split_k (ResNet-like only) without split-K Grams;
  torch_loop  (a) a per-pair loop as the popular PyTorch CKA tools do it (torch_cka / anatome style): for
              every pair (i, j) both Grams are formed and three HSIC terms computed, float32;
  torch_batch (b) the batched formulation: U-centred Grams of all layers stacked, one matmul for all pairs
              (Grams in the input dtype with fp32 accumulation, the pair product in float32).
  torch_batch_host  (b) with every batch uploaded from pinned host memory, as the engine's batches are.
The torch_loop / torch_batch inputs live on the GPU already (no upload counted), stated in the output.

Reported: time per workload, ratio vs (b), Gram-stage TFLOP/s vs measured bf16 matmul throughput
(torch.matmul on a large square), peak GPU memory. Timing with CUDA events, medians over repeats.
Usage (on the GPU machine, repository root):  python3 scripts/bench_gpu.py [--out DIR] [--loop-batches K]
The GPU machine has no Rust toolchain: pack the bench binary here with `DEVICE_PACK_BENCHES=1
scripts/device_pack.sh`; `bash .device/run-all.sh` unpacks it to /tmp/dp/bin, where this script finds
it (or pass --engine-bench). scripts/gpu_checks.sh does the whole GPU session in one call.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "resnet_like": dict(rows=500, widths=[16384] * 10 + [8192] * 9 + [4096] * 9, dtype="float32", batches=5),
    "llm_like": dict(rows=1024, widths=[4096] * 32, dtype="bfloat16", batches=64),
}


def engine_command(bench_exe):
    """The bench binary: the given executable, else the one device-pack unpacked (the GPU machine has no
    Rust toolchain), else `cargo bench`."""
    import glob
    if bench_exe:
        return [bench_exe, "--bench"]
    packed = sorted(glob.glob("/tmp/dp/bin/bench-cka_gpu-*"))
    if packed:
        return [packed[0], "--bench"]
    return ["cargo", "bench", "--bench", "cka_gpu"]


def per_batch_entry(e):
    """The report's entry for one engine run's per-batch timings (uploads from host memory included)."""
    return dict(
        total_s=e["total_s"],
        batch_ms_median=e["batch_wall_ms_median"],
        gram_ms_median=e.get("gram_kernels_ms_median", e["gram_ms_median"]),
        gram_tflops=e["gram_tflops_full_count"],
        peak_mem_bytes=e["plan_device_bytes"],
        stages_ms=dict(gram=e["gram_ms_median"], centre=e["centre_ms_median"], pairs=e["pairs_ms_median"]),
        kernels_ms=e.get("kernel_ms_median", {}),
        cka_max_abs_diff_vs_cpu=e.get("cka_max_abs_diff_vs_cpu"),
    )


# Engine variants besides the default, each a run of the bench binary with these environment settings:
# the candidate tensor-core Gram kernels (cp.async + ldmatrix; Hopper's wgmma fed by cp.async or TMA), and
# split-K switched off on the workload it is for (ResNet-like:
# 2 layers of 16,384 features per upload chunk, 72 Gram tiles, split 4 ways by default on 132 SMs).
ENGINE_VARIANTS = {
    "pipelined": dict(SGLP_GRAM_KERNEL="pipelined"),
    "wgmma": dict(SGLP_GRAM_KERNEL="wgmma"),
    "wgmma_tma": dict(SGLP_GRAM_KERNEL="wgmma_tma"),
    "no_split_k": dict(SGLP_GRAM_SPLITS="1", SGLP_BENCH_WORKLOADS="resnet_like"),
}
# The variants compare kernels: each times the per-batch path only (validated against the CPU first).
for _v in ENGINE_VARIANTS.values():
    _v["SGLP_BENCH_KERNELS_ONLY"] = "1"


def run_engine(out_dir, bench_exe=None, variant=None):
    """Run the bench binary in JSON mode; returns {workload: entry}. The default run writes engine.json and
    engine.log into `out_dir`; a `variant` (a key of ENGINE_VARIANTS) writes engine_<variant>.json/.log
    into a temporary folder (the device tool returns at most 8 files; bench_gpu.json holds its timings,
    and a failure's output is printed)."""
    stem = "engine" if variant is None else f"engine_{variant}"
    if variant is not None:
        import tempfile
        out_dir = os.path.join(tempfile.gettempdir(), "sglp-engine-variants")
        os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    env = dict(os.environ, SGLP_BENCH_JSON=os.path.abspath(path))
    if variant is not None:
        env.update(ENGINE_VARIANTS[variant])
    cmd = engine_command(bench_exe)
    print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(os.path.join(out_dir, stem + ".log"), "w") as f:
        f.write(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not os.path.exists(path):
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"engine benchmark failed, exit {proc.returncode} (see {stem}.log)")
    with open(path) as f:
        return {e["workload"]: e for e in json.load(f)}


def cuda_time_ms(torch, fn, warmup=2, repeat=5):
    """Median milliseconds of fn() measured with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bf16_matmul_tflops(torch, size=8192):
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(torch, lambda: torch.matmul(a, b), warmup=3, repeat=20)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def u_centre(torch, k):
    """U-centre a stack of Grams (L, n, n), float32 (Song et al. 2012)."""
    n = k.shape[-1]
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    m = k.sum(-1) / (n - 2)
    m = m - m.sum(-1, keepdim=True) / (2 * (n - 1))
    k = k - m[..., :, None] - m[..., None, :]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def hsic1_pair(torch, k, l):
    """Unbiased HSIC of two Grams, the closed form per-pair tools use (float32)."""
    n = k.shape[0]
    k = k.clone()
    l = l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, device=k.device, dtype=k.dtype)
    tr = torch.trace(k @ l)
    s = (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
    t = 2 / (n - 2) * (one.T @ k @ l @ one)
    return ((tr + s - t) / (n * (n - 3))).squeeze()


def torch_loop_batch(torch, xs):
    """(a) per-pair loop: for every pair both Grams and the three HSIC terms, float32."""
    nl = len(xs)
    h = torch.zeros(nl, nl, device="cuda", dtype=torch.float64)
    for i in range(nl):
        for j in range(nl):
            xi, xj = xs[i].float(), xs[j].float()
            k, l = xi @ xi.T, xj @ xj.T
            h[i, j] = hsic1_pair(torch, k, l)
    return h


def torch_batched_batch(torch, xs):
    """(b) U-centred Grams of all layers stacked, one matmul for all pairs."""
    grams = torch.stack([(x @ x.T).float() for x in xs])  # input dtype, fp32 accumulate
    g = u_centre(torch, grams).reshape(len(xs), -1)
    n = xs[0].shape[0]
    return (g @ g.T).double() / (n * (n - 3))


def make_inputs(torch, spec, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, spec["dtype"])
    return [
        (torch.rand(spec["rows"], d, device="cuda", generator=gen) * 2 - 1).to(dt)
        for d in spec["widths"]
    ]


def bench_torch(torch, name, spec, loop_batches):
    rows, widths = spec["rows"], spec["widths"]
    data = [make_inputs(torch, spec, 1), make_inputs(torch, spec, 2)]
    res = {}
    # (b) batched: every batch (alternating two input sets), events around each.
    torch.cuda.reset_peak_memory_stats()
    per_batch = cuda_time_ms(torch, lambda: torch_batched_batch(torch, data[0]), warmup=2, repeat=3)
    t0 = time.perf_counter()
    for i in range(spec["batches"]):
        torch_batched_batch(torch, data[i % 2])
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    # Gram stage alone, for its TFLOP/s.
    gram_ms = cuda_time_ms(torch, lambda: [x @ x.T for x in data[0]], warmup=2, repeat=5)
    res["torch_batch"] = dict(
        total_s=total,
        batch_ms_median=per_batch,
        gram_ms_median=gram_ms,
        peak_mem_bytes=torch.cuda.max_memory_allocated(),
    )
    # (b') the same from host memory: each batch uploaded (pinned CPU tensors), as the engine's times are.
    host = [[x.cpu().pin_memory() for x in d] for d in data]
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # the GPU copies `data`, which this contender does not use
    per_batch_h = cuda_time_ms(
        torch, lambda: torch_batched_batch(torch, [x.cuda(non_blocking=True) for x in host[0]]), warmup=2, repeat=3
    )
    t0 = time.perf_counter()
    for i in range(spec["batches"]):
        torch_batched_batch(torch, [x.cuda(non_blocking=True) for x in host[i % 2]])
    torch.cuda.synchronize()
    res["torch_batch_host"] = dict(
        total_s=time.perf_counter() - t0,
        batch_ms_median=per_batch_h,
        peak_mem_bytes=torch.cuda.max_memory_allocated() - resident,
    )
    del host
    # (a) per-pair loop: a few batches, extrapolated to all.
    torch.cuda.reset_peak_memory_stats()
    k = min(loop_batches, spec["batches"])
    ms = []
    for i in range(k):
        ms.append(cuda_time_ms(torch, lambda: torch_loop_batch(torch, data[i % 2]), warmup=0 if i else 1, repeat=1))
    res["torch_loop"] = dict(
        total_s=statistics.median(ms) * 1e-3 * spec["batches"],
        batch_ms_median=statistics.median(ms),
        extrapolated_from_batches=k,
        peak_mem_bytes=torch.cuda.max_memory_allocated(),
    )
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--loop-batches", type=int, default=2, help="batches timed for the per-pair loop")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--engine-bench", default=None,
                    help="the cka_gpu bench executable (default: device-pack's /tmp/dp/bin/bench-cka_gpu-*, "
                         "else cargo bench)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    dev = torch.cuda.get_device_name(0)
    peak_bf16 = bf16_matmul_tflops(torch)
    # The engine's device_bytes_used_* are the whole GPU's (total − free, every process): this process's
    # share (its CUDA context, torch's cache) is measured now and subtracted from them below.
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    others = total - free
    errors = {}

    def engine_run(variant=None):
        # A failing engine (the candidate kernel above all) is recorded: the PyTorch contenders still run.
        if args.skip_engine:
            return {}
        try:
            return run_engine(args.out, args.engine_bench, variant)
        except (RuntimeError, OSError) as e:
            errors["engine" if variant is None else f"engine_{variant}"] = str(e)
            return {}

    engine = engine_run()
    report = dict(device=dev, bf16_matmul_tflops=peak_bf16, workloads={}, errors=errors)
    json_path = os.path.join(args.out, "bench_gpu.json")

    def save():  # after each step: a timeout keeps what was measured
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)

    for name, spec in WORKLOADS.items():
        gram_flops = sum(spec["rows"] ** 2 * d * 2 for d in spec["widths"])
        t = bench_torch(torch, name, spec, args.loop_batches)
        entry = dict(gram_flops_per_batch=gram_flops, **t)
        entry["torch_batch"]["gram_tflops"] = gram_flops / (t["torch_batch"]["gram_ms_median"] * 1e-3) / 1e12
        if name in engine:
            entry.update(engine_entries(engine[name], spec, others))
        report["workloads"][name] = entry
        save()
    print_table(report)
    # The candidates after the table that matters (engine vs PyTorch), so that a cap on the run's time
    # cuts them rather than it.
    for v in ENGINE_VARIANTS:
        runs = engine_run(v)
        for name, e in runs.items():
            if name in report["workloads"]:
                report["workloads"][name][f"engine_{v}"] = per_batch_entry(e)
        save()
    print("with the candidate kernels and settings (engine_<variant>):")
    print_table(report)
    for who, err in errors.items():
        print(f"{who}: {err}")
    if errors:
        raise SystemExit(1)


def engine_entries(e, spec, others):
    """The report's engine entries of one workload from the default run: per batch from host memory, the
    streamed sum, page-locked buffers and activations already on the device."""
    out = dict(engine=per_batch_entry(e))
    # From the bench's own reading right after it opened the GPU (this process's share and the engine's
    # CUDA context excluded, as torch's peak excludes its context); else this process's.
    base = e.get("device_bytes_used_at_open", others)
    used_all = e["device_bytes_used_after_all_batches"] - base

    def path(total_s, **memory):  # one input path's run over the workload's batches
        return dict(total_s=total_s, batch_ms_median=total_s * 1e3 / spec["batches"], **memory)

    if "device_resident_total_s" in e:
        # Activations already on the GPU (submit_device): comparable to torch_batch (b). Memory: the
        # workspace (measured before the upload) plus its two resident batches, as (b) counts.
        itemsize = 4 if spec["dtype"] == "float32" else 2
        out["engine_on_device"] = path(
            e["device_resident_total_s"],
            peak_mem_bytes=used_all + 2 * spec["rows"] * sum(spec["widths"]) * itemsize,
        )
    if "streamed_total_s" in e:
        # The accumulator's path: submit every batch into a device-resident sum, one download.
        out["engine_streamed"] = path(
            e["streamed_total_s"],
            peak_mem_bytes=used_all,
            mem_after_16_batches=e["device_bytes_used_after_16_batches"] - base,
        )
    if e.get("page_locked_total_s"):
        # The file reader's path: batches written into page-locked buffers, uploaded in place (the copy
        # into the buffer timed too: an upper bound).
        out["engine_page_locked"] = path(e["page_locked_total_s"], peak_mem_bytes=used_all)
    return out


def print_table(report):
    peak_bf16 = report["bf16_matmul_tflops"]
    print(f"device: {report['device']}; bf16 matmul {peak_bf16:.0f} TFLOP/s (torch.matmul 8192^2)")
    print("torch_loop/torch_batch/engine_on_device inputs are already on the GPU; engine, engine_streamed, "
          "engine_page_locked and torch_batch_host upload every batch")
    hdr = f"{'workload':<12} {'contender':<18} {'total s':>9} {'ms/batch':>9} {'vs (b)':>7} {'Gram TF/s':>10} {'% bf16':>7} {'peak GiB':>9}"
    print(hdr)
    for name, entry in report["workloads"].items():
        base = entry["torch_batch"]["total_s"]
        for who in ("engine", "engine_pipelined", "engine_wgmma", "engine_wgmma_tma", "engine_no_split_k",
                    "engine_streamed",
                    "engine_page_locked", "engine_on_device", "torch_loop", "torch_batch", "torch_batch_host"):
            if who not in entry:
                continue
            r = entry[who]
            tf = r.get("gram_tflops")
            tf_s = f"{tf:10.1f}" if tf else f"{'-':>10}"
            pct = f"{100 * tf / peak_bf16:6.1f}%" if tf else f"{'-':>7}"
            print(
                f"{name:<12} {who:<18} {r['total_s']:9.3f} {r['batch_ms_median']:9.2f} "
                f"{base / r['total_s']:6.2f}x {tf_s} {pct} {r.get('peak_mem_bytes', 0) / 2**30:9.2f}"
            )
            if r.get("kernels_ms"):
                # Per-batch device time of each kernel (medians): where the time goes.
                parts = ", ".join(f"{k} {ms:.3f}" for k, ms in r["kernels_ms"].items())
                print(f"{'':<12} {'':<18} kernels ms: {parts}")


if __name__ == "__main__":
    main()
