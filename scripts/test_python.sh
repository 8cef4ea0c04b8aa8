#!/usr/bin/env bash
# The Python half of the tests: a venv in .ci-cache/pyenv (reused; torch, the big one, installed only once),
# the package built into it with maturin, then pytest on python/tests and scripts/tests (export_activations.py on a tiny BERT), then the numpy emulations of the CUDA kernels' index arithmetic (they print ALL OK, or fail). .ci/run calls this script.
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
# The CUDA kernels' index arithmetic, tensor-core fragments included, emulated in numpy against f64
# formulas (no GPU needed).
"$py" src/similarity/cuda/emulate_kernels.py | tail -1
"$py" src/runtime/ops/emulate_runtime_kernels.py | tail -1
