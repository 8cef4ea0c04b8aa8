#!/usr/bin/env bash
# Are the outputs of every command byte-identical between two builds? For refactors that must not change
# behaviour.
#
#   scripts/check_outputs_identical.sh record DIR [BIN_DIR]   run every command, outputs into DIR
#   scripts/check_outputs_identical.sh diff BEFORE AFTER      normalise both, then `diff -r`
#
# BIN_DIR holds `sglp-engine` and `make_activations` (default: build this tree with
# `cargo build --release --bin sglp-engine --example make_activations` and use target/release). Typical use:
#
#   cp target/release/{sglp-engine,examples/make_activations} /tmp/bin-before   # before the change
#   scripts/check_outputs_identical.sh record /tmp/before /tmp/bin-before
#   scripts/check_outputs_identical.sh record /tmp/after                        # after it
#   scripts/check_outputs_identical.sh diff /tmp/before /tmp/after
#
# Each command's stdout, stderr and exit code are saved as NAME.out / NAME.err / NAME.rc, its files beside.
# `diff` strips what legitimately differs between two runs: wall-clock timings (JSON keys ending in `_s`,
# `seconds` or `per_s`; "... s" / "tok/s" figures in text and the HTML report's wall-time row; progress
# bars), the order of keys in safetensors headers (data compared by hash), and the record directory's
# path. Everything else must match byte for byte.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

record() {
    local dir=$1 bins=${2:-}
    if [ -z "$bins" ]; then
        (cd "$repo" && cargo build --release --bin sglp-engine --example make_activations) || exit 1
        local target=${CARGO_TARGET_DIR:-$repo/target}
        bins=$(mktemp -d)
        cp "$target/release/sglp-engine" "$target/release/examples/make_activations" "$bins/"
    fi
    rm -rf "$dir" && mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
    local sglp=$bins/sglp-engine fx=$repo/tests/fixtures
    local m=$fx/llama_llama3_rope tok=$fx/llama_llama3_rope/tokens.npy
    # NAME CMD...: run in $dir, keep stdout, stderr and the exit code.
    c() {
        local name=$1
        shift
        (cd "$dir" && NO_COLOR=1 "$@" >"$name.out" 2>"$name.err"; echo $? >"$name.rc")
        echo "$name: exit $(cat "$dir/$name.rc")"
    }
    c make_activations "$bins/make_activations" ex.safetensors
    c run_k4 "$sglp" run --input ex.safetensors --k 4 --out-dir run-k4
    c run_auto "$sglp" run --input ex.safetensors --out-dir run-auto
    c cka_json "$sglp" cka --input ex.safetensors -o cka.json
    c cka_csv "$sglp" cka --input ex.safetensors --format csv
    c cka_biased_rbf "$sglp" cka --input ex.safetensors --estimator biased --kernel rbf --device cpu -o cka-rbf.json
    c cka_layers "$sglp" cka --input ex.safetensors --input ex.safetensors --layers 'layer[12]' --route feature
    c segment "$sglp" segment --cka cka.json -o segments.json
    c segment_rows "$sglp" segment --cka cka.json --features rows --k 3 --min-len 2
    c info "$sglp" info --input ex.safetensors
    c capture "$sglp" capture --model "$m" --tokens "$tok" --out capture.safetensors --batch 3
    c capture_sharded "$sglp" capture --model "$fx/mistral_sharded" --tokens "$fx/mistral_sharded/tokens.npy" --out capture-sharded.safetensors
    c info_capture "$sglp" info --input capture.safetensors --input capture.safetensors
    c cka_model "$sglp" cka --model "$m" --tokens "$tok" --batch 2 -o cka-model.json
    c gradnorm "$sglp" gradnorm --model "$m" --tokens "$tok" --out gradnorm.json
    c eval "$sglp" eval --model "$m" --tokens "$tok" -o eval.json
    c prune "$sglp" prune --model "$m" --tokens "$tok" --remove 1 --out pruned
    c prune_sharded "$sglp" prune --model "$fx/mistral_sharded" --tokens "$fx/mistral_sharded/tokens.npy" --remove 1 --eval-tokens "$fx/mistral_sharded/tokens.npy" --out pruned-sharded
    c eval_pruned "$sglp" eval --model pruned --tokens "$tok"
    c compare "$sglp" compare --model "$m" --tokens "$tok" --eval-tokens "$tok" --remove 1 -o compare.json
    # Errors: one line, exit 2.
    c err_missing "$sglp" cka --input does-not-exist.safetensors
    c err_segment "$sglp" segment --cka ex.safetensors
    c err_cuda "$sglp" cka --input ex.safetensors --device cuda:7
    c err_model "$sglp" eval --model "$fx" --tokens "$tok"
    mkdir -p "$dir/no-weights" && cp "$m/config.json" "$dir/no-weights/"
    c err_no_weights "$sglp" eval --model no-weights --tokens "$tok"
    c err_no_weights_prune "$sglp" prune --model no-weights --tokens "$tok" --remove 1 --out pruned-none
    c err_exists "$sglp" prune --model "$m" --tokens "$tok" --remove 1 --out pruned
    c help "$sglp" --help
    for cmd in cka segment run info capture gradnorm prune eval compare; do
        c "help_$cmd" "$sglp" "$cmd" --help
    done
    echo "$dir" >"$dir/.record-dir"
}

# A normalised copy of a record directory: timings zeroed, its own path replaced by RECORD.
normalise() {
    local src=$1 dst=$2
    rm -rf "$dst" && cp -r "$src" "$dst"
    python3 - "$dst" "$(cat "$src/.record-dir" 2>/dev/null || echo "$src")" <<'PY'
import hashlib, json, os, re, sys
root, recdir = sys.argv[1], sys.argv[2]
timing_key = re.compile(r"(_s|seconds|per_s|_ms)$")
def zero(v):
    if isinstance(v, dict):
        return {k: (0 if timing_key.search(k) and isinstance(x, (int, float)) else zero(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [zero(x) for x in v]
    return v
num = r"[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?"
text_timing = [
    (re.compile(num + r"( ?(?:s|ms|tok/s|tokens/s|seconds)\b)"), r"T\1"),
    (re.compile(r"\r[^\n]*"), ""),  # progress bars
    (re.compile(r"(Wall time.*?</td>)"), lambda m: re.sub(num, "T", m.group(1))),
]
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        if f == ".record-dir":
            os.remove(p)
            continue
        with open(p, "rb") as fh:
            data = fh.read()
        if f.endswith(".safetensors"):
            # The header's JSON object order is not fixed (make_activations builds its metadata in a
            # HashMap): compare the parsed header with sorted keys, and the data bytes by hash.
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            with open(p + ".normalised", "w") as fh:
                json.dump(header, fh, indent=1, sort_keys=True)
                fh.write("\ndata sha256 " + hashlib.sha256(data[8 + n:]).hexdigest() + "\n")
            os.remove(p)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary: compared as is
        text = text.replace(recdir, "RECORD")
        if f.endswith(".json"):
            try:
                text = json.dumps(zero(json.loads(text)), indent=2, ensure_ascii=False) + "\n"
            except ValueError:
                pass
        if not f.endswith(".csv"):
            for pat, rep in text_timing:
                text = pat.sub(rep, text)
        with open(p, "w") as fh:
            fh.write(text)
PY
}

case "${1:-}" in
record) record "${2:?record DIR [BIN_DIR]}" "${3:-}" ;;
diff)
    tmp=$(mktemp -d)
    normalise "${2:?diff BEFORE AFTER}" "$tmp/before"
    normalise "${3:?diff BEFORE AFTER}" "$tmp/after"
    if diff -r "$tmp/before" "$tmp/after"; then
        echo "identical: $(find "$tmp/before" -type f | wc -l) files"
    else
        echo "DIFFERENT"
        exit 1
    fi
    ;;
*)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
