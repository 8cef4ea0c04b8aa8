#!/usr/bin/env python3
"""Write tests/fixtures/torch_save/: activation files saved with `torch.save`, for the torch reader's tests
(tests/io_readers.rs) and the `torch` fuzz target's seeds.

    .ci-cache/pyenv/bin/python scripts/make_torch_save_fixtures.py

* acts.pt: a dict of four layers (f32, f16 [n, 3, 2, 1], bf16, f64) in a deliberate non-alphabetical order,
  with non-tensor entries (a step count, a string, a nested dict of floats) the reader skips;
  acts.safetensors holds the same layers (its `layers` metadata in the same order), so both must read the
  same values.
* acts_list.pt: a list of three f32 layers, one a contiguous slice of a larger tensor (a storage offset),
  one an nn.Parameter; acts_list.safetensors: the same as layer0..layer2.
* acts_proto4.pt: acts.pt's layers pickled with protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE).
* resnet20.pt: tests/fixtures/cnn/cifar_resnet20_a/model.safetensors as `torch.save(state_dict)`, for
  `prune --arch` on a .pt state_dict.
* bad_view.pt (a transposed layer), bad_int.pt (an int64 layer), bad_single.pt (one bare tensor),
  bad_legacy.pt (the pre-1.6 format): each must be refused with its own message.

Values are multiples of 1/16 in [-8, 8], exact in every dtype.
"""
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "torch_save")


def exact(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-128, 129, shape, generator=g).to(torch.float64) / 16).to(dtype)


def main():
    os.makedirs(OUT, exist_ok=True)
    n = 20
    layers = {
        "blocks.1": exact((n, 6), 1),
        "blocks.0": exact((n, 3, 2, 1), 2, torch.float16),
        "embed": exact((n, 6), 3, torch.bfloat16),
        "head": exact((n, 5), 4, torch.float64),
    }
    torch.save(dict(layers, step=3, note="calibration", meta={"lr": 0.1, "n": n}),
               os.path.join(OUT, "acts.pt"))
    save_file({k: v.contiguous() for k, v in layers.items()}, os.path.join(OUT, "acts.safetensors"),
              metadata={"layers": ",".join(layers)})
    torch.save(layers, os.path.join(OUT, "acts_proto4.pt"), pickle_protocol=4)

    base = exact((n + 8, 4), 5)
    lst = [exact((n, 4), 6), base[8:], torch.nn.Parameter(exact((n, 4), 7))]
    assert lst[1].storage_offset() == 32
    torch.save(lst, os.path.join(OUT, "acts_list.pt"))
    save_file({f"layer{i}": t.detach().contiguous() for i, t in enumerate(lst)},
              os.path.join(OUT, "acts_list.safetensors"))

    torch.save({"a": exact((n, 4), 8), "b": exact((4, n), 9).t()}, os.path.join(OUT, "bad_view.pt"))
    torch.save({"a": exact((n, 4), 10), "b": torch.arange(n * 4).reshape(n, 4)},
               os.path.join(OUT, "bad_int.pt"))
    torch.save(exact((n, 4), 11), os.path.join(OUT, "bad_single.pt"))
    torch.save({"a": exact((n, 4), 12)}, os.path.join(OUT, "bad_legacy.pt"),
               _use_new_zipfile_serialization=False)
    cnn = os.path.join(OUT, "..", "cnn", "cifar_resnet20_a", "model.safetensors")
    torch.save(load_file(cnn), os.path.join(OUT, "resnet20.pt"))
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
