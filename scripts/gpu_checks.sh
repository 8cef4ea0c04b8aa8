#!/usr/bin/env bash
# Everything in the CUDA issue that needs a GPU, in one call on the GPU machine (it has no Rust toolchain).
#
#   here:        DEVICE_PACK_BENCHES=1 DEVICE_PACK_PYTHON=1 scripts/device_pack.sh
#   device tool: run  command: "bash scripts/gpu_checks.sh"  carry: [".device"]
#
# Writes into $OUT (at most 8 files come back): nvidia-smi.txt, tests.log (every test executable with
# SGLP_REQUIRE_GPU=1, so a GPU that is not found fails, then the CKA kernels one by one against their CPU
# twins, benches/cka_kernels.rs), engine.json/engine.log (the cka_gpu bench binary's per-batch CUDA-event
# timings; the variants' runs, SGLP_GRAM_KERNEL=pipelined, =wgmma or =wgmma_tma and ResNet-like without split-K, go into
# bench_gpu.json only), bench_gpu.json and bench.log
# (engine vs PyTorch, same GPU; the runtime's bench_runtime_gpu.py appended).
#
# `bash scripts/gpu_checks.sh first` is the call to make first (run's timeout_s 580; it ends within
# GPU_CHECKS_BUDGET = 560 s): the GPU test targets, the CKA kernels one by one, the Python CUDA path and
# the CKA benchmark against PyTorch, then with the time left the runtime's kernel harness and the runtime
# against PyTorch on the 1B shape. A machine's start takes minutes of the device tool's 15, so plan on no
# second call. `... tests` runs every test executable, `... bench` every
# benchmark (two calls that each stay inside the 600 s per command); no argument runs both. `... 8b` runs
# only the runtime benchmark on the 8B-shaped model with `prune --remove 8` (issue 10's targets).
#
# Dry run without a GPU, before spending device minutes: the same call on the GPU emulator,
#   tests/gpu_emulator/build.sh && OUT=/tmp/gpu-out LD_LIBRARY_PATH=$PWD/target/gpu-emulator:<NVRTC's folder> \
#     bash scripts/gpu_checks.sh first
# runs the packed test binaries, the kernel checks and the Python tests (all pass there); the LLM-like timing
# case runs past its cap and the PyTorch benchmark finds no CUDA, as they must on a machine without one.
set -uo pipefail
part=${1:-all}
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
# Every test and bench here must find the GPU: a missing one is a failure, not a skip.
export SGLP_REQUIRE_GPU=1
# NVRTC: the engine's cudarc (built for CUDA 12) loads libnvrtc.so, libnvrtc.so.12, .11, ...; a CUDA 13
# machine (these have 13.0) ships libnvrtc.so.13, and the toolkit's libnvrtc.so link may not be on the
# loader's path. Find one and put a `libnvrtc.so` link to it, and its own directory (for the
# libnvrtc-builtins it opens), first on LD_LIBRARY_PATH.
find_nvrtc() {
  local d f sp
  sp=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
  for d in ${LD_LIBRARY_PATH//:/ } /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
           /usr/local/cuda-*/lib64 $(for p in $sp; do echo "$p/nvidia/cu13/lib $p/nvidia/cuda_nvrtc/lib"; done); do
    for f in "$d"/libnvrtc.so "$d"/libnvrtc.so.1[0-9]; do [ -e "$f" ] && { echo "$f"; return; }; done
  done
  ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF; exit}'
}
nvrtc=$(find_nvrtc)
if [ -n "$nvrtc" ]; then
  mkdir -p /tmp/nvrtc-link && ln -sf "$(readlink -f "$nvrtc")" /tmp/nvrtc-link/libnvrtc.so
  export LD_LIBRARY_PATH="/tmp/nvrtc-link:$(dirname "$(readlink -f "$nvrtc")")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "gpu_checks: NVRTC ${nvrtc:-not found} (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})" | tee -a "$out/nvidia-smi.txt"
# What run-all.sh does first: unpack, the CLI by its own name, the repo at the path the tests baked in.
unpack() {
  [ -d /tmp/dp/bin ] && return
  mkdir -p /tmp/dp && tar -xJf .device/pack.tar.xz -C /tmp/dp
  while read -r name kind; do [ "$kind" = bin ] && ln -sf "/tmp/dp/bin/$name" "/tmp/dp/bin/${name#bin-}"; done < /tmp/dp/bin/MANIFEST
  origin=$(cat /tmp/dp/bin/ORIGIN)
  if [ "$origin" != "$PWD" ] && [ ! -e "$origin" ]; then mkdir -p "$(dirname "$origin")" && ln -s "$PWD" "$origin"; fi
}
if [ "$part" = first ]; then
  # One call that fits the device tool's 15 minutes (start included): the GPU test targets only (the rest
  # pass in CI), the CKA kernels one by one, the Python CUDA path and the CKA benchmark against PyTorch
  # (issue 9), then, in what is left of the budget, the runtime's kernel harness and the runtime against
  # PyTorch on the 1B shape (issue 10). Each step is capped by its own limit and by the budget's end, so
  # that a hang still leaves the logs of the others and the call ends inside the run's limit.
  budget_end=$(( $(date +%s) + ${GPU_CHECKS_BUDGET:-560} ))
  # step CAP CMD...: CMD under `timeout`, CAP seconds or what is left of the budget if less; skipped, and
  # said so, with under 20 s left.
  step() {
    local cap=$1 left; shift
    left=$(( budget_end - $(date +%s) ))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then echo "gpu_checks: budget spent, skipped: $*"; return 124; fi
    timeout "$cap" "$@"
  }
  rc=0
  # The wgmma kernels have never run: their tests go in a process of their own after the others, since a
  # fault can leave the CUDA context unusable for the rest of a process.
  step 160 env ONLY_TESTS="cuda_backend runtime_cuda runtime_cli" SGLP_SKIP_WGMMA=1 SGLP_REQUIRE_GPU=1 \
    bash .device/run-all.sh 2>&1 | tee "$out/tests.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  echo "=== gram_wgmma, gram_wgmma_tma, linear_wgmma (Hopper candidates)" | tee -a "$out/tests.log"
  step 40 env ONLY_TESTS="cuda_backend runtime_cuda" SGLP_REQUIRE_GPU=1 bash .device/run-all.sh candidate split_k \
    every_stage linear_on_tensor_cores a_decoder_with_bf16 \
    2>&1 | tee -a "$out/tests.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  step 100 bash .device/run-bench.sh cka_kernels 2>&1 | tee -a "$out/tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  step 60 bash .device/run-python.sh 2>&1 | tee -a "$out/tests.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  unpack
  step 200 env PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  # Issue 10 with the time left (each step usually ends well before its cap).
  step 120 bash .device/run-bench.sh runtime_gpu 2>&1 | tee -a "$out/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  step 200 env PATH="/tmp/dp/bin:$PATH" PYTHONUNBUFFERED=1 python3 scripts/bench_runtime_gpu.py --shapes 1b \
    --reps 3 --out /tmp/runtime-gpu 2>&1 | tee -a "$out/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  echo "gpu_checks first: exit $rc, $(( budget_end - $(date +%s) )) s of the budget left"
  exit $rc
fi
if [ "$part" = 8b ]; then
  unpack
  PATH="/tmp/dp/bin:$PATH" PYTHONUNBUFFERED=1 timeout 570 python3 scripts/bench_runtime_gpu.py --shapes 8b \
    --reps 3 --prune --workdir /tmp --out "$out" 2>&1 | tee "$out/bench8b.log"
  exit "${PIPESTATUS[0]}"
fi
tests=0 py=0 bench=0 kernels=0 runtime=0 stages=0
if [ "$part" != bench ]; then
SGLP_REQUIRE_GPU=1 bash .device/run-all.sh 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
# The CKA kernels one by one (benches/cka_kernels.rs): each stage against its float64 CPU twin, naming the
# kernel that fails, then every kernel's time (small cases, then one LLM-like batch).
# (Packed with DEVICE_PACK_BENCHES=1.)
timeout 150 bash .device/run-bench.sh cka_kernels 2>&1 | tee -a "$out/tests.log"
stages=${PIPESTATUS[0]}
if [ -x .device/run-python.sh ] && ls .device/wheels/*.whl >/dev/null 2>&1; then
  bash .device/run-python.sh 2>&1 | tee -a "$out/tests.log"
  py=${PIPESTATUS[0]}
else
  echo "gpu_checks: no wheel packed (DEVICE_PACK_PYTHON=1): Python CUDA path not run" | tee -a "$out/tests.log"
  py=0
fi
fi
if [ "$part" != tests ]; then
unpack
PYTHONUNBUFFERED=1 timeout 150 python3 scripts/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
# The runtime's kernels one by one (benches/runtime_gpu.rs: linear products in bf16 and f32 on 8B shapes,
# attention; validated, then timed), into bench.log.
timeout 240 bash .device/run-bench.sh runtime_gpu 2>&1 | tee -a "$out/bench.log"
kernels=${PIPESTATUS[0]}
# The runtime (issue 10): engine vs PyTorch forward + backward on a 1B-shaped model, printed into bench.log
# (its JSON stays on the machine: at most 8 files come back).
PATH="/tmp/dp/bin:$PATH" PYTHONUNBUFFERED=1 timeout 300 python3 scripts/bench_runtime_gpu.py --shapes 1b \
  --out /tmp/runtime-gpu 2>&1 | tee -a "$out/bench.log"
runtime=${PIPESTATUS[0]}
fi
echo "gpu_checks: tests exit $tests, CKA kernel checks exit $stages, python exit $py, bench exit $bench, kernels exit $kernels, runtime bench exit $runtime"
[ "$tests" -eq 0 ] && [ "$stages" -eq 0 ] && [ "$py" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$kernels" -eq 0 ] && [ "$runtime" -eq 0 ]
