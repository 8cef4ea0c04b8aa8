#!/usr/bin/env bash
# The Python half of the tests: a venv in .ci-cache/pyenv (reused; torch, the big one, installed only once),
# the package built into it with maturin, then pytest on python/tests and scripts/tests (export_activations.py on a tiny BERT; the CUDA test again on the GPU emulator when CI built it), then the numpy emulations of the CUDA kernels' index arithmetic (they print ALL OK, or fail). .ci/run calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci-cache/pyenv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip_install() {
  # One retry: a registry hiccup should not fail CI.
  "$py" -m pip install --quiet --disable-pip-version-check "$@" || { sleep 10; "$py" -m pip install --quiet --disable-pip-version-check "$@"; }
}
"$py" -c "import maturin, pytest, numpy" 2>/dev/null || pip_install maturin pytest numpy
"$py" -c "import torch" 2>/dev/null || pip_install torch
"$py" -c "import transformers, safetensors" 2>/dev/null || pip_install transformers safetensors
cargo fmt --check --manifest-path python/Cargo.toml
cargo clippy --manifest-path python/Cargo.toml -- -D warnings
VIRTUAL_ENV="$(cd "$venv" && pwd)" "$venv/bin/maturin" develop --release --quiet
"$py" -m pytest python/tests scripts/tests -q -rs
# The package's CUDA path on the GPU emulator, when scripts/emulated_gpu_tests.sh has built it (CI).
if [ -e target/gpu-emulator/libcuda.so ] && [ "${SGLP_REQUIRE_NVRTC:-}" = 1 ]; then
  LD_LIBRARY_PATH="$PWD/target/gpu-emulator:$LD_LIBRARY_PATH" SGLP_REQUIRE_GPU=1 \
    "$py" -m pytest python/tests -q -rs -k cuda_backend
else
  echo "the Python package's CUDA path on the GPU emulator: not run (no target/gpu-emulator, or SGLP_REQUIRE_NVRTC unset)"
fi
# The CUDA kernels' index arithmetic, tensor-core fragments included, emulated in numpy against f64
# formulas (no GPU needed).
"$py" src/similarity/cuda/emulate_kernels.py | tail -1
"$py" src/runtime/ops/emulate_runtime_kernels.py | tail -1
