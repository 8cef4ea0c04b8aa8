#!/usr/bin/env bash
# Builds the GPU emulator: a fake libcuda.so (driver.cpp) that runs kernels/*.cu compiled for the host
# (cuda_host.h, runtime.cpp), then runs its self-test (self_test.cpp; exits 1 if a check fails).
# Usage: tests/gpu_emulator/build.sh [OUT_DIR] (default target/gpu-emulator).
# Then: LD_LIBRARY_PATH=OUT_DIR:<NVRTC's folder> cargo test ... (scripts/emulated_gpu_tests.sh does it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/gpu-emulator}
mkdir -p "$out/obj"
CXX=${CXX:-g++}
# -fsanitize=alignment: a misaligned typed access (a float4 / uint4 load from an address that is not
# 16-aligned) faults on a GPU; here UBSan stops with the file and line.
flags=(-std=c++20 -O2 -g -fPIC -fno-strict-aliasing -Wall -Wno-unknown-pragmas -Wno-unused-function
  -Wno-unused-variable -Wno-unused-but-set-variable -fsanitize=alignment -fno-sanitize-recover=alignment
  -I"$here" -I"$root/kernels" ${SGLP_EMU_CXXFLAGS:-})

pids=()
for cu in "$root"/kernels/*.cu; do
  name=$(basename "$cu" .cu)
  (
    # Pass 1 finds the file's kernels (its extern "C" functions); pass 2 compiles it with a registration each.
    section=(-DSGLP_EMU_SECTION_ID="sglp_shared_$name")
    "$CXX" "${flags[@]}" "${section[@]}" -O0 -g0 -include cuda_host.h -x c++ -c "$cu" -o "$out/obj/$name.names.o"
    kernels=$(nm -g --defined-only "$out/obj/$name.names.o" | awk '$2 == "T" { print $3 }')
    {
      echo "#include \"runtime.h\""
      echo "#include \"$cu\""
      for k in $kernels; do echo "SGLP_EMU_REGISTER($k)"; done
    } >"$out/obj/$name.reg.cpp"
    "$CXX" "${flags[@]}" "${section[@]}" -c "$out/obj/$name.reg.cpp" -o "$out/obj/$name.o"
  ) &
  pids+=($!)
done
"$CXX" "${flags[@]}" -c "$here/runtime.cpp" -o "$out/obj/runtime.o" &
pids+=($!)
"$CXX" "${flags[@]}" -c "$here/driver.cpp" -o "$out/obj/driver.o" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

objs=("$out"/obj/runtime.o "$out"/obj/driver.o)
for cu in "$root"/kernels/*.cu; do objs+=("$out/obj/$(basename "$cu" .cu).o"); done
"$CXX" -shared -fsanitize=alignment -o "$out/libcuda.so" "${objs[@]}" ${SGLP_EMU_LDFLAGS:-}
ln -sf libcuda.so "$out/libcuda.so.1"
# The emulator's own tests (self_test.cpp): each thing it claims to catch, caught.
"$CXX" "${flags[@]}" -DSGLP_EMU_SECTION_ID=sglp_shared_self_test "$here/self_test.cpp" "$out/obj/runtime.o" \
  "$out/obj/driver.o" -o "$out/self_test"
"$out/self_test" >"$out/self_test.log" 2>&1 || { cat "$out/self_test.log" >&2; exit 1; }
echo "$out/libcuda.so"
