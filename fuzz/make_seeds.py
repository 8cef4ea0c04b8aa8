#!/usr/bin/env python3
"""Write the seed inputs of every fuzz target into fuzz/corpus/<target>/ (standard library only).

Each seed is a small valid input in the layout `sglp_engine::fuzz_entry` expects (a selector byte, and for
multi-file targets u16-length-prefixed parts). Run once before the first `cargo fuzz run`; the committed
corpora grew from these and were minimised with `cargo fuzz cmin`.
"""
import json
import math
import os
import random
import struct
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")
FIX = os.path.join(ROOT, "tests", "fixtures")
rng = random.Random(13)

PACK = {"F32": "<f", "F64": "<d", "I64": "<q", "I32": "<i"}


def half_bits(x, bf16):
    if bf16:
        return struct.unpack("<I", struct.pack("<f", x))[0] >> 16
    return struct.unpack("<H", struct.pack("<e", x))[0]


def tensor_bytes(dtype, values):
    if dtype in ("F16", "BF16"):
        return b"".join(struct.pack("<H", half_bits(v, dtype == "BF16")) for v in values)
    if dtype.startswith("I"):
        values = [int(v * 10) for v in values]
    return b"".join(struct.pack(PACK[dtype], v) for v in values)


def safetensors(tensors, layers=None):
    """tensors: list of (name, dtype, shape); values are random."""
    header, data = {}, b""
    if layers is not None:
        header["__metadata__"] = {"layers": ",".join(layers)}
    for name, dtype, shape in tensors:
        n = math.prod(shape)
        b = tensor_bytes(dtype, [rng.uniform(-3, 3) for _ in range(n)])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def npy(descr, shape, values, fortran=False, version=1):
    d = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
        descr, "True" if fortran else "False", "".join(f"{s}, " for s in shape) if len(shape) != 1 else f"{shape[0]},")
    pre = 10 if version == 1 else 12
    text = d.encode() + b" " * (-(pre + len(d) + 1) % 64) + b"\n"
    if version == 1:
        head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text))
    else:
        head = b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text))
    code = {"<f4": "<f", "<f8": "<d", "<f2": "<e", "<i8": "<q", "<i4": "<i"}[descr]
    return head + text + b"".join(struct.pack(code, v) for v in values)


def parts(*ps):
    """Selector byte (len(ps) - 1) then each part but the last prefixed by its u16 length."""
    out = bytes([len(ps) - 1])
    for p in ps[:-1]:
        out += struct.pack("<H", len(p)) + p
    return out + ps[-1]


def save(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def read(*p):
    with open(os.path.join(FIX, *p), "rb") as f:
        return f.read()


def rnd(n):
    return [rng.uniform(-2, 2) for _ in range(n)]


def main():
    # safetensors: one shard, every dtype, 2-D and 3-D, with and without the `layers` key; two shards.
    a = safetensors([("layer0", "F32", [4, 3]), ("layer1", "F32", [4, 2])], ["layer0", "layer1"])
    save("safetensors", "f32", parts(a))
    for dt in ("F16", "BF16", "F64"):
        save("safetensors", dt.lower(), parts(safetensors([("h.0", dt, [5, 2]), ("h.1", dt, [5, 2])])))
    save("safetensors", "3d", parts(safetensors([("a", "F32", [2, 3, 2]), ("b", "F32", [2, 3, 1])])))
    save("safetensors", "i64", parts(safetensors([("ids", "I64", [3])])))
    b = safetensors([("layer0", "F32", [2, 3]), ("layer1", "F32", [2, 2])], ["layer0", "layer1"])
    save("safetensors", "two-shards", parts(a, b))
    # npy directories.
    save("npy", "f32", parts(npy("<f4", [5, 3], rnd(15))))
    save("npy", "f64-f16", parts(npy("<f8", [4, 2], rnd(8)), npy("<f2", [4, 3], rnd(12))))
    save("npy", "3d-v2", parts(npy("<f4", [2, 2, 3], rnd(12), version=2)))
    save("npy", "fortran-1d", parts(npy("<f4", [6], rnd(6), fortran=True)))
    # config.json of every fixture.
    for d in sorted(os.listdir(FIX)):
        if os.path.exists(os.path.join(FIX, d, "config.json")):
            save("config", d, read(d, "config.json"))
    # index.json.
    save("weight_index", "mistral", read("mistral_sharded", "model.safetensors.index.json"))
    save("weight_index", "small", json.dumps(
        {"metadata": {"total_size": 8}, "weight_map": {"a": "model-1.safetensors", "b": "model-10.safetensors",
                                                        "c": "model-2.safetensors"}}).encode())
    # token arrays.
    save("tokens", "fixture", read("llama_bf16_tied", "tokens.npy"))
    save("tokens", "i32", npy("<i4", [2, 3], [1, 2, 3, 4, 5, 6]))
    # images and labels.
    save("images", "i64", parts(npy("<f4", [2, 1, 2, 2], rnd(8)), npy("<i8", [2], [0, 1])))
    save("images", "i32", parts(npy("<f4", [3, 2, 1, 1], rnd(6)), npy("<i4", [3], [2, 0, 1])))
    # matrices (selector: bits 0-1 the extension json/csv/npy/txt, bit 2 gradient norms).
    m = [[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 1.0]]
    engine = {"format": "sglp-cka/1", "layers": ["a", "b", "c"], "estimator": "unbiased",
              "kernel": {"type": "linear"}, "batch_size": 4, "n_samples": 8, "n_batches": 2, "route": "gram",
              "backend": "cpu", "cka": m, "hsic": m, "warnings": []}
    save("matrix", "engine-json", b"\x00" + json.dumps(engine).encode())
    save("matrix", "plain-json", b"\x00" + json.dumps({"cka": m, "layers": ["x", "y", "z"]}).encode())
    save("matrix", "bare-json", b"\x03" + json.dumps(m).encode())
    csv = "layer,a,b,c\n" + "".join(f"{n}," + ",".join(map(str, r)) + "\n" for n, r in zip("abc", m))
    save("matrix", "csv", b"\x01" + csv.encode())
    save("matrix", "ws-csv", b"\x03" + "\n".join(" ".join(map(str, r)) for r in m).encode())
    save("matrix", "npy", b"\x02" + npy("<f8", [3, 3], sum(m, [])))
    save("matrix", "gradnorm-json", b"\x04" + json.dumps({"gradnorm": [0.5, 1.5, 2.0], "layers": ["a", "b", "c"]}).encode())
    save("matrix", "gradnorm-list", b"\x07" + b"[1, 2.5, 3e-3]")
    save("matrix", "gradnorm-npy", b"\x06" + npy("<f4", [3], [1.0, 2.0, 0.5]))
    # tokenizer.json (selector even) and text through the fixture tokenizer (selector odd).
    save("tokenizer", "fixture", b"\x00" + read("tokenizer", "tokenizer.json"))
    wordlevel = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "b": 2},
                                             "unk_token": "[UNK]"},
                 "pre_tokenizer": {"type": "Whitespace"}}
    save("tokenizer", "wordlevel", b"\x00" + json.dumps(wordlevel).encode())
    save("tokenizer", "text", bytes([1 | 2 << 1]) + read("tokenizer", "sample.txt"))
    save("tokenizer", "jsonl", bytes([1 | 3 << 1 | 0x80 | 0x40 | 1 << 4]) + read("tokenizer", "sample.jsonl"))
    # torch.save files (scripts/make_torch_save_fixtures.py; a zip starts with "PK"), and the pickle of one
    # alone (selector byte 0).
    for f in ["acts.pt", "acts_list.pt", "acts_proto4.pt", "bad_view.pt", "bad_legacy.pt"]:
        save("torch", f[:-3], read("torch_save", f))
    save("torch", "checkpoint", read("llama_torch_bin", "pytorch_model.bin"))
    with zipfile.ZipFile(os.path.join(FIX, "torch_save", "acts.pt")) as z:
        save("torch", "pickle", b"\x00" + z.read("acts/data.pkl"))
    with zipfile.ZipFile(os.path.join(FIX, "torch_save", "acts_proto4.pt")) as z:
        save("torch", "pickle4", b"\x00" + z.read("acts_proto4/data.pkl"))


if __name__ == "__main__":
    sys.exit(main())
