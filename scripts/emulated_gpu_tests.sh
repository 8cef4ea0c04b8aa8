#!/usr/bin/env bash
# The GPU test suites on the GPU emulator (tests/gpu_emulator: a fake libcuda.so that runs the kernel
# sources on the CPU), so that the CUDA path runs end to end on a machine without a GPU. Two schedules:
# warps forward, cp.async landing at its wait, wgmma products at their instruction, streams running work
# at once; then warps reversed, cp.async landing at once, wgmma products at their wait, streams running
# work as late as CUDA allows (tests/gpu_emulator/README.md says what
# each exposes). Needs g++ and NVRTC on LD_LIBRARY_PATH (.ci/run
# puts the wheel's there). Usage: scripts/emulated_gpu_tests.sh [cargo test filter...]
set -euo pipefail
cd "$(dirname "$0")/.."
# The engine compiles every kernel with NVRTC before it loads them, emulated or not.
have_nvrtc() {
  local d
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for d in "${dirs[@]}"; do ls "$d"/libnvrtc.so* >/dev/null 2>&1 && return 0; done
  ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'
}
if ! have_nvrtc || ! command -v "${CXX:-g++}" >/dev/null; then
  why="no NVRTC on LD_LIBRARY_PATH (.ci/run installs the nvidia-cuda-nvrtc-cu12 wheel) or no g++"
  [ "${SGLP_REQUIRE_NVRTC:-}" = 1 ] && { echo "emulated GPU tests: SGLP_REQUIRE_NVRTC=1 but $why" >&2; exit 1; }
  echo "skipping the emulated GPU tests: $why"
  exit 0
fi
emu=$(tests/gpu_emulator/build.sh)
export LD_LIBRARY_PATH="$(dirname "$emu")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SGLP_REQUIRE_GPU=1
for schedule in "forward lazy eager eager" "reverse eager lazy lazy"; do
  read -r order copies products streams <<<"$schedule"
  echo "== emulated GPU: warps $order, cp.async/TMA $copies, wgmma $products, streams $streams"
  SGLP_EMU_ORDER=$order SGLP_EMU_CP_ASYNC=$copies SGLP_EMU_WGMMA=$products SGLP_EMU_STREAMS=$streams \
    cargo test --test cuda_backend --test runtime_cuda -- "$@"
done
