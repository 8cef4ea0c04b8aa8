#!/usr/bin/env python3
"""Build the CNN runtime's test fixtures: tiny random models of every family the engine reads (plain PyTorch
from a seed, layouts in `cnn_models.py`), calibration images and PyTorch's float64 reference numbers.

    python3 scripts/make_cnn_fixtures.py [--out tests/fixtures/cnn] [--only NAME ...]

Each fixture directory holds `model.safetensors` (the state_dict, float32), `images.npy` (float32
[N, C, H, W]), `labels.npy` (int64 [N]) and `reference.safetensors` (float64), metadata `arch` (the
`--arch` name) and `skip` (comma-separated units):
  hidden.{i}    [N, C·H·W]: i = 0 the first unit's input (the stem's output; the images for VGG),
                i = u + 1 unit u's output (before a VGG pool)
  loss          [1]: mean cross-entropy of the batch (model in eval mode: BN on running statistics)
  correct       [1]: images whose arg-max logit is their label
  gradnorm      [U]: sqrt(sum of squared gradients of unit u's parameters: convs, BN affine, projection)
  extra         [2]: the same for the stem and for the head (classifier)
  logits_skip   [N, classes]: logits with the units in `skip` replaced by the identity
  removable     [U]: 1 where the unit's input and output shapes match
The reference runs in float64 on the stored float32 values.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_models as cm  # noqa: E402

FIXTURES = [
    dict(name="cifar_resnet20_a", arch="cifar-resnet20", seed=11, n=4, hw=8, classes=10, skip=[1, 7],
         make=lambda: cm.CifarResNet(20, (4, 8, 16), 10, option="A")),
    dict(name="cifar_resnet20_b", arch="cifar-resnet20", seed=12, n=3, hw=8, classes=7, skip=[4],
         make=lambda: cm.CifarResNet(20, (4, 8, 16), 7, option="B")),
    dict(name="resnet18", arch="resnet18", seed=13, n=2, hw=32, classes=5, skip=[1, 5],
         make=lambda: cm.TvResNet(18, base=4, num_classes=5)),
    dict(name="resnet50", arch="resnet50", seed=14, n=2, hw=32, classes=6, skip=[2, 9],
         make=lambda: cm.TvResNet(50, base=2, num_classes=6)),
    dict(name="vgg11_bn", arch="vgg11_bn", seed=15, n=2, hw=32, classes=4, skip=[5],
         make=lambda: cm.Vgg(11, batch_norm=True, width_div=16, num_classes=4, hidden=16)),
    dict(name="vgg16_cifar", arch="vgg16", seed=16, n=3, hw=32, classes=10, skip=[1, 9],
         make=lambda: cm.Vgg(16, batch_norm=False, width_div=16, num_classes=10, cifar=True)),
]


def build(spec, out_root):
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    model = spec["make"]()
    cm.randomise_bn(model, gen)
    model.eval()
    n, hw, classes = spec["n"], spec["hw"], spec["classes"]
    images = torch.randn(n, 3, hw, hw, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    out = os.path.join(out_root, spec["name"])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"))
    np.save(os.path.join(out, "images.npy"), images.numpy().astype(np.float32))
    np.save(os.path.join(out, "labels.npy"), labels.numpy().astype(np.int64))

    model = model.double()
    x = images.double()
    hidden = {}
    logits = cm.run(model, x, on_hidden=lambda i, h: hidden.__setitem__(i, h.detach().clone()))
    loss = F.cross_entropy(logits, labels)
    model.zero_grad()
    loss.backward()
    us = cm.units(model)
    sums = {u: 0.0 for u in range(len(us))}
    sums.update(stem=0.0, head=0.0)
    for k, p in model.named_parameters():
        sums[cm.group_of(model, k)] += float((p.grad ** 2).sum())
    with torch.no_grad():
        logits_skip = cm.run(model, x, skip=spec["skip"])
    ref = {f"hidden.{i}": h.reshape(n, -1).contiguous() for i, h in hidden.items()}
    ref.update(
        loss=loss.detach().reshape(1),
        correct=torch.tensor([float((logits.argmax(1) == labels).sum())], dtype=torch.float64),
        gradnorm=torch.tensor([sums[u] ** 0.5 for u in range(len(us))], dtype=torch.float64),
        extra=torch.tensor([sums["stem"] ** 0.5, sums["head"] ** 0.5], dtype=torch.float64),
        logits_skip=logits_skip.contiguous(),
        removable=torch.tensor([float(u[3]) for u in us], dtype=torch.float64),
    )
    meta = dict(arch=spec["arch"], skip=",".join(map(str, spec["skip"])),
                units=json.dumps([u[0] for u in us]))
    save_file({k: v.double().contiguous() for k, v in ref.items()},
              os.path.join(out, "reference.safetensors"), metadata=meta)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{spec['name']}: {len(us)} units, loss {loss.item():.6f}, {size / 1024:.0f} KB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                  "cnn"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    for spec in FIXTURES:
        if args.only and spec["name"] not in args.only:
            continue
        build(spec, args.out)


if __name__ == "__main__":
    main()
