#!/usr/bin/env python3
"""Export per-layer activations of any PyTorch model in sglp-engine's input format.

Forward hooks on the modules whose qualified names match a regular expression capture each module's output
on calibration batches; the outputs are written as safetensors shards holding one tensor per layer, shape
[n, ...] (axis 0 = samples), with the metadata key `layers` listing the tensor names comma-separated in
module order. `sglp-engine cka/segment/run --input SHARD [--input SHARD ...]` then works on any
architecture (CNNs, ViTs, encoders, LLMs...).

Outputs that are not tensors are reduced to one: a tuple or list gives its first tensor, a transformers
ModelOutput (or dict) its `last_hidden_state` when present, else its first tensor value.

Models and data:
  --hf DIR_OR_NAME          a transformers model; its class from the config's `architectures` (a
                            ...ForCausalLM loads as AutoModelForCausalLM, anything else — BERT, other
                            encoders — as AutoModel), or forced with --hf-auto causal-lm|model
  --factory MODULE:FUNC     any model: FUNC() returns a torch.nn.Module (MODULE is a file path or an
                            importable module name)
  --tokens FILE.npy         integer ids [sequences, tokens] (language models), fed as input_ids
  --text FILE               one sentence/document per line, tokenised with the checkpoint's tokenizer
                            (padded per batch; the attention mask goes to the model)

Padding (--text, or --tokens with --attention-mask FILE.npy or --pad-id N): the attention mask is passed to
the model, and with --token-mode samples (default) only the real tokens' outputs are kept (padding
positions are not samples); --token-mode features refuses padded input (every sequence would mix real and
padding features).
  --inputs FILE.npy|FILE.pt float inputs [n, ...] (e.g. images [n, 3, 32, 32]), fed positionally
  --data MODULE:FUNC        FUNC(batch_size) yields batches: a tensor, a tuple of positional args, or a dict
                            of keyword args

Examples:
  # LLaMA-family checkpoint, decoder layer outputs on calibration tokens, one shard per 64 sequences:
  python scripts/export_activations.py --hf ./my-llama --tokens calib.npy \\
      --modules 'model\\.layers\\.\\d+' --batch-size 8 --shard-samples 64 --out acts/llama
  sglp-engine run --input acts/llama-00000.safetensors --input acts/llama-00001.safetensors

  # torchvision ResNet-18 block outputs on CIFAR-like images:
  python scripts/export_activations.py --factory mymodels.py:resnet18 --inputs images.npy \\
      --modules '^(conv1|layer\\d\\.\\d)$' --out acts/resnet
"""
import argparse
import importlib
import importlib.util
import os
import re
import sys

import numpy as np
import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def load_callable(spec):
    """'path/to/file.py:func' or 'package.module:func' → the function."""
    mod_name, _, func = spec.rpartition(":")
    if not mod_name or not func:
        sys.exit(f"error: '{spec}' is not MODULE:FUNC")
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        s = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0],
                                                   mod_name)
        if s is None:
            sys.exit(f"error: cannot import {mod_name}")
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    try:
        return getattr(module, func)
    except AttributeError:
        sys.exit(f"error: {mod_name} has no '{func}'")


def first_tensor(out):
    """The tensor a module's output stands for (see the module docstring); None if there is none."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):  # dict and transformers ModelOutput
        if "last_hidden_state" in out.keys() and torch.is_tensor(out["last_hidden_state"]):
            return out["last_hidden_state"]
        for v in out.values():
            t = first_tensor(v)
            if t is not None:
                return t
        return None
    if isinstance(out, (tuple, list)):
        for v in out:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def batches_from_array(arr, batch_size, as_ids, mask=None):
    for i in range(0, arr.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size]))
        if not as_ids:
            yield (x,)
        elif mask is None:
            yield {"input_ids": x.long()}
        else:
            m = torch.from_numpy(np.ascontiguousarray(mask[i:i + batch_size])).long()
            yield {"input_ids": x.long(), "attention_mask": m}


def batches_from_text(path, tokenizer, batch_size):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f if l.strip()]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], padding=True, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def model_class(transformers, path, forced):
    """AutoModelForCausalLM for a causal LM, AutoModel for anything else (e.g. a BERT encoder, which as a
    causal LM would get a random head and `bert.`-prefixed names), from the config's `architectures`."""
    if forced == "causal-lm":
        return transformers.AutoModelForCausalLM
    if forced == "model":
        return transformers.AutoModel
    archs = transformers.AutoConfig.from_pretrained(path).architectures or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def keep_real_tokens(outputs, mask, token_mode):
    """Per layer, the outputs of the real (unmasked) tokens: [batch, tokens, ...] → [real tokens, ...]."""
    if mask is None or bool(mask.all()):
        return outputs
    if token_mode == "features":
        sys.exit("error: padded input with --token-mode features: every sequence would mix real and padding "
                 "features; use --token-mode samples (padding positions are dropped) or unpadded sequences")
    keep = mask.bool().cpu()
    out = {}
    for name, t in outputs.items():
        if t.dim() < 2 or tuple(t.shape[:2]) != tuple(keep.shape):
            sys.exit(f"error: module '{name}' output {list(t.shape)} is not [batch, tokens, ...] "
                     f"{list(keep.shape)}: cannot drop padding positions")
        out[name] = t[keep]
    return out


def load_array(path):
    if path.endswith(".pt"):
        t = torch.load(path, map_location="cpu")
        return t.numpy() if torch.is_tensor(t) else np.asarray(t)
    return np.load(path)


class Capture:
    """Forward hooks that keep each matched module's output of the current batch."""

    def __init__(self, model, pattern, dtype):
        self.names = [n for n, _ in model.named_modules() if n and pattern.search(n)]
        if not self.names:
            sys.exit(f"error: no module name matches '{pattern.pattern}' "
                     f"(first names: {[n for n, _ in model.named_modules() if n][:12]})")
        self.dtype = dtype
        self.current = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            t = first_tensor(output)
            if t is None:
                raise RuntimeError(f"module '{name}' returned no tensor ({type(output).__name__})")
            # A module called several times per forward (shared blocks) keeps its last output.
            self.current[name] = t.detach().to("cpu", self.dtype)
        return hook

    def take(self):
        missing = [n for n in self.names if n not in self.current]
        if missing:
            raise RuntimeError(f"modules not called in the forward pass: {missing[:5]}")
        out, self.current = self.current, {}
        return out


class ShardWriter:
    """Accumulates samples per layer and writes `{out}-{i:05d}.safetensors` every `shard_samples` samples
    (or one `{out}.safetensors` when everything fits in one shard)."""

    def __init__(self, out, names, shard_samples):
        self.out, self.names, self.shard_samples = out, names, shard_samples
        self.pending = {n: [] for n in names}
        self.rows = 0
        self.paths = []
        self.shapes = None

    def add(self, outputs):
        shapes = {n: tuple(outputs[n].shape[1:]) for n in self.names}
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            bad = [n for n in self.names if shapes[n] != self.shapes[n]][0]
            raise RuntimeError(f"layer '{bad}' changed shape between batches: {self.shapes[bad]} → "
                               f"{shapes[bad]} (pad or crop the calibration data to one shape)")
        for n in self.names:
            self.pending[n].append(outputs[n])
        self.rows += outputs[self.names[0]].shape[0]
        while self.shard_samples and self.rows >= self.shard_samples:
            self._flush(self.shard_samples)

    def _flush(self, rows):
        tensors, rest = {}, {}
        for n in self.names:
            cat = torch.cat(self.pending[n], 0)
            tensors[n] = cat[:rows].contiguous()
            rest[n] = cat[rows:]
        path = f"{self.out}-{len(self.paths):05d}.safetensors"
        save_file(tensors, path, metadata={"layers": ",".join(self.names), "format": "pt"})
        self.paths.append(path)
        self.pending = {n: [rest[n]] if rest[n].shape[0] else [] for n in self.names}
        self.rows -= rows

    def finish(self):
        if self.rows:
            self._flush(self.rows)
        if len(self.paths) == 1:  # a single shard gets the plain name
            single = f"{self.out}.safetensors"
            os.replace(self.paths[0], single)
            self.paths = [single]
        return self.paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="transformers model directory or hub name")
    src.add_argument("--factory", help="MODULE:FUNC returning a torch.nn.Module")
    ap.add_argument("--hf-auto", choices=["auto", "causal-lm", "model"], default="auto")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--tokens", help=".npy integer ids [sequences, tokens]")
    data.add_argument("--text", help="text file, one sequence per line (needs --hf: its tokenizer)")
    data.add_argument("--inputs", help=".npy or .pt float inputs [n, ...]")
    data.add_argument("--data", help="MODULE:FUNC(batch_size) yielding batches")
    ap.add_argument("--modules", required=True, help="regular expression on qualified module names "
                    "(re.search; anchor with ^...$ for exact matches)")
    ap.add_argument("--out", required=True, help="output prefix: PREFIX.safetensors or PREFIX-NNNNN.safetensors")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--shard-samples", type=int, default=0,
                    help="samples (axis 0) per shard; 0 = one file")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention-mask", help="with --tokens: .npy 0/1 mask [sequences, tokens]")
    ap.add_argument("--pad-id", type=int, default=None, help="with --tokens: ids equal to this are padding")
    ap.add_argument("--token-mode", choices=["samples", "features"], default="samples",
                    help="with padding: samples drops padding positions; features refuses padded input")
    a = ap.parse_args()

    if a.hf:
        import transformers
        model = model_class(transformers, a.hf, a.hf_auto).from_pretrained(a.hf)
    else:
        model = load_callable(a.factory)()
        if not isinstance(model, torch.nn.Module):
            sys.exit(f"error: {a.factory} returned {type(model).__name__}, not a torch.nn.Module")
    model = model.to(a.device).eval()

    if a.text:
        if not a.hf:
            sys.exit("error: --text needs --hf (the checkpoint's tokenizer)")
        import transformers
        batches = batches_from_text(a.text, transformers.AutoTokenizer.from_pretrained(a.hf), a.batch_size)
    elif a.tokens:
        ids = load_array(a.tokens)
        mask = None
        if a.attention_mask:
            mask = load_array(a.attention_mask)
            if mask.shape != ids.shape:
                sys.exit(f"error: --attention-mask shape {list(mask.shape)} is not the tokens' {list(ids.shape)}")
        elif a.pad_id is not None:
            mask = (ids != a.pad_id).astype(np.int64)
        batches = batches_from_array(ids, a.batch_size, as_ids=True, mask=mask)
    elif a.inputs:
        batches = batches_from_array(load_array(a.inputs).astype(np.float32), a.batch_size, as_ids=False)
    else:
        batches = load_callable(a.data)(a.batch_size)

    cap = Capture(model, re.compile(a.modules), DTYPES[a.dtype])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    writer = ShardWriter(a.out, cap.names, a.shard_samples)
    to_dev = lambda x: x.to(a.device) if torch.is_tensor(x) else x
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if a.max_batches is not None and i >= a.max_batches:
                break
            mask = None
            if isinstance(batch, dict):
                mask = batch.get("attention_mask")
                model(**{k: to_dev(v) for k, v in batch.items()})
            elif isinstance(batch, (tuple, list)):
                model(*[to_dev(v) for v in batch])
            else:
                model(to_dev(batch))
            writer.add(keep_real_tokens(cap.take(), mask, a.token_mode))
    if writer.rows == 0 and not writer.paths:
        sys.exit("error: no calibration batch was run")
    paths = writer.finish()
    shapes = ", ".join(f"{n} {list(s)}" for n, s in list(writer.shapes.items())[:3])
    print(f"{len(cap.names)} layers ({shapes}{', ...' if len(cap.names) > 3 else ''}) → "
          f"{len(paths)} file(s): {' '.join(paths)}")


if __name__ == "__main__":
    main()
