#!/usr/bin/env bash
# Build this crate's release CLI, test and bench executables here, and pack them for the GPU machine
# (which has no Rust toolchain and no network).
#
#   scripts/device_pack.sh                 # from the project's root (the repository's own copy)
#   then, with the device tool:  run  command: "bash .device/run-all.sh"   carry: [".device"]
#
# .device/ holds: pack.tar.xz (stripped executables), run-all.sh (unpacks them on the GPU machine and runs
# every test executable with --include-ignored, then prints a summary). Extra arguments to run-all.sh are
# passed to every test executable (e.g. a test-name filter: bash .device/run-all.sh gpu); ONLY_TESTS="a b"
# runs only the test targets a and b.
# Environment: DEVICE_PACK_BENCHES=1 also packs the bench executables (they run only when asked:
# bash .device/run-bench.sh NAME [criterion args]).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
out="$root/.device"
grep -qxF '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf "$out"; mkdir -p "$out/bin"
export CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_BENCH_STRIP=symbols CARGO_PROFILE_BENCH_DEBUG=0
list=$(mktemp)
cargo build --release --bins --message-format=json 2>/dev/null >"$list.bins" || { cargo build --release --bins; exit 1; }
cargo test --release --no-run --message-format=json 2>/dev/null >"$list.tests" || { cargo test --release --no-run; exit 1; }
if [ "${DEVICE_PACK_BENCHES:-0}" = 1 ]; then
  cargo bench --no-run --message-format=json 2>/dev/null >"$list.benches" || { cargo bench --no-run; exit 1; }
else : >"$list.benches"; fi
python3 - "$list" "$out/bin" <<'PY'
import json, shutil, sys, os
lst, dst = sys.argv[1], sys.argv[2]
kinds = {}
for tag in ("bins", "tests", "benches"):
    for line in open(f"{lst}.{tag}"):
        try: m = json.loads(line)
        except ValueError: continue
        if m.get("reason") != "compiler-artifact" or not m.get("executable"): continue
        t = m["target"]
        if "example" in t["kind"]: continue  # an example is neither a test harness nor the CLI
        kind = "bin" if "bin" in t["kind"] and not m["profile"]["test"] else ("bench" if tag == "benches" else "test")
        name = f"{kind}-{t['name']}" + ("" if kind == "bin" else f"-{t['kind'][0]}")
        shutil.copy2(m["executable"], os.path.join(dst, name)); kinds[name] = kind
open(os.path.join(dst, "MANIFEST"), "w").write("".join(f"{k} {v}\n" for k, v in sorted(kinds.items())))
PY
rm -f "$list" "$list".*
# Fixtures and kernels travel with the repo itself; the tests may have baked in this machine's repo path.
echo "$root" > "$out/bin/ORIGIN"
(cd "$out" && tar -cJf pack.tar.xz bin && rm -rf bin)
cat > "$out/run-all.sh" <<'SH'
#!/usr/bin/env bash
# On the GPU machine, from the repo root: unpack and run every test executable. The CLI is on PATH
# afterwards within this script; SGLP_REQUIRE_GPU=1 tells tests that a GPU must be found (no skipping).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/.." && pwd)
mkdir -p /tmp/dp && tar -xJf "$here/pack.tar.xz" -C /tmp/dp
origin=$(cat /tmp/dp/bin/ORIGIN)
if [ "$origin" != "$repo" ] && [ ! -e "$origin" ]; then mkdir -p "$(dirname "$origin")" && ln -s "$repo" "$origin"; fi
while read -r name kind; do [ "$kind" = bin ] && ln -sf "/tmp/dp/bin/$name" "/tmp/dp/bin/${name#bin-}"; done < /tmp/dp/bin/MANIFEST
export PATH="/tmp/dp/bin:$PATH" SGLP_REQUIRE_GPU=${SGLP_REQUIRE_GPU:-1}
cd "$repo"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
fail=0; ran=0
while read -r name kind; do
  [ "$kind" = test ] || continue
  # ONLY_TESTS="cuda_backend runtime_cuda": just those test targets (a short device call).
  if [ -n "${ONLY_TESTS:-}" ]; then
    t=${name#test-}; t=${t%-*}
    case " $ONLY_TESTS " in *" $t "*) ;; *) continue ;; esac
  fi
  ran=$((ran+1)); echo "=== $name"
  "/tmp/dp/bin/$name" --include-ignored "$@" || { echo "!!! $name FAILED"; fail=$((fail+1)); }
done < /tmp/dp/bin/MANIFEST
echo "device-pack: $ran test executables run, $fail failed"
[ $fail -eq 0 ]
SH
cat > "$out/run-bench.sh" <<'SH'
#!/usr/bin/env bash
# On the GPU machine: bash .device/run-bench.sh BENCHNAME [criterion args]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/.." && pwd)
[ -d /tmp/dp/bin ] || { mkdir -p /tmp/dp && tar -xJf "$here/pack.tar.xz" -C /tmp/dp; }
origin=$(cat /tmp/dp/bin/ORIGIN)
if [ "$origin" != "$repo" ] && [ ! -e "$origin" ]; then mkdir -p "$(dirname "$origin")" && ln -s "$repo" "$origin"; fi
cd "$repo"; b=$1; shift; exe=$(ls /tmp/dp/bin/bench-"$b"-* 2>/dev/null | head -1)
[ -n "$exe" ] || { echo "no bench executable for $b (pack with DEVICE_PACK_BENCHES=1)"; exit 2; }
"$exe" --bench "$@"
SH
# DEVICE_PACK_PYTHON=1: the Python package as an abi3 wheel, for python/tests on the GPU machine
# (run-python.sh installs it without dependencies into /tmp/dp/py: that machine has PyTorch and NumPy).
if [ "${DEVICE_PACK_PYTHON:-0}" = 1 ]; then
  mkdir -p "$out/wheels"
  maturin build --release --quiet -m python/Cargo.toml -o "$out/wheels" >/dev/null
fi
cat > "$out/run-python.sh" <<'SH'
#!/usr/bin/env bash
# On the GPU machine: the Python tests (the CUDA-tensor path among them) against the packed wheel.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/.." && pwd)
ls "$here"/wheels/*.whl >/dev/null 2>&1 || { echo "run-python: no wheel (pack with DEVICE_PACK_PYTHON=1)"; exit 2; }
python3 -m pip install --quiet --no-deps --no-index --target /tmp/dp/py "$here"/wheels/*.whl || exit 1
cd "$repo"
python3 -c "import pytest" 2>/dev/null || { echo "run-python: pytest is not installed on this machine"; exit 2; }
PYTHONPATH=/tmp/dp/py python3 -m pytest python/tests -q -rs "$@"
SH
chmod +x "$out/run-all.sh" "$out/run-bench.sh" "$out/run-python.sh"
echo "packed: $(du -sh "$out" | cut -f1) in .device/ (limit: 64 MiB with the rest of the working tree)"
tar -tJf "$out/pack.tar.xz" | sed 's/^/  /'
