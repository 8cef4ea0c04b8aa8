#!/usr/bin/env python3
"""Rebuild a CNN pruned by `sglp-engine prune --arch` as a plain PyTorch module, for fine-tuning.

    python3 rebuild_cnn.py OUTDIR            # prints the model and checks the state_dict loads strictly

    import rebuild_cnn
    model = rebuild_cnn.load("OUTDIR")       # nn.Module in eval mode, weights loaded (strict)

OUTDIR holds `model.safetensors` (the pruned state_dict, kept blocks renumbered) and `sglp-arch.json`
(format `sglp-arch/1`: per-stage block counts of a ResNet, or the VGG layer list). The modules below
reproduce the key layouts the engine reads: He et al.'s CIFAR ResNets (option A zero-pad or option B
projection shortcuts, `linear` head), torchvision's ResNets (`downsample`, `fc`) and VGG (`features`,
torchvision's 3-linear classifier with a 7×7 adaptive pool, or the CIFAR layout with one linear). This file
depends on PyTorch and safetensors only: copy it next to your training code.
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class _ZeroPad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """3×3 → 3×3 residual block; `projection` names the shortcut module (`shortcut` or `downsample`)."""

    def __init__(self, c_in, c_out, stride, shortcut, projection):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self._sc = projection
        changes = stride != 1 or c_in != c_out
        self.identity = not changes  # the block may be removed (input and output shapes match)
        if changes and shortcut == "A":
            setattr(self, projection, _ZeroPad((c_out - c_in) // 2))
        elif changes:
            setattr(self, projection, nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                    nn.BatchNorm2d(c_out)))
        else:
            setattr(self, projection, nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + getattr(self, self._sc)(x))


class Bottleneck(nn.Module):
    def __init__(self, c_in, mid, stride):
        super().__init__()
        out = 4 * mid
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or c_in != out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))
        self.identity = self.downsample is None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """A CIFAR ResNet (`family` cifar-resnet: 3×3 stem, no pool) or a torchvision one (7×7/2 stem + max
    pool), with `blocks[s]` blocks in stage s (the first block of each stage downsamples, as in the
    unpruned network: SGLP never removes it)."""

    def __init__(self, a):
        super().__init__()
        cifar = a["family"] == "cifar-resnet"
        self.cifar = cifar
        stem = a["stem_channels"]
        k = 3 if cifar else 7
        self.conv1 = nn.Conv2d(a["in_channels"], stem, k, 1 if cifar else 2, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        c = stem
        for s, (n, w) in enumerate(zip(a["blocks"], a["widths"])):
            layer = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                if a["bottleneck"]:
                    layer.append(Bottleneck(c, w, stride))
                    c = 4 * w
                else:
                    layer.append(BasicBlock(c, w, stride, a["shortcut"],
                                            "shortcut" if cifar else "downsample"))
                    c = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.stages = len(a["blocks"])
        setattr(self, a["head"], nn.Linear(c, a["num_classes"]))
        self.head = a["head"]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        for s in range(self.stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return getattr(self, self.head)(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGG(nn.Module):
    def __init__(self, a, state):
        super().__init__()
        layers, c = [], a["in_channels"]
        for v in a["cfg"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if a["batch_norm"]:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        pool = a["head_pool"]
        self.avgpool = nn.AdaptiveAvgPool2d(tuple(pool)) if pool else nn.Identity()
        if a["classifier"] == "cifar":
            w = state["classifier.weight"]
            self.classifier = nn.Linear(w.shape[1], w.shape[0])
        else:
            mods = []
            for i, name in enumerate(a["head"]):
                w = state[f"{name}.weight"]
                idx = int(name.split(".")[1])
                while len(mods) < idx:
                    mods.append(nn.ReLU(True) if len(mods) % 3 == 1 else nn.Dropout())
                mods.append(nn.Linear(w.shape[1], w.shape[0]))
            self.classifier = nn.Sequential(*mods)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def build(arch, state):
    """The pruned module for `sglp-arch.json`'s content `arch` (weights not loaded)."""
    if arch.get("format") != "sglp-arch/1":
        raise ValueError(f"not an sglp-arch/1 file: format {arch.get('format')!r}")
    if arch["family"] == "vgg":
        return VGG(arch, state)
    return ResNet(arch)


def load(outdir):
    """The pruned model of `prune --arch ... --out OUTDIR`, weights loaded strictly, in eval mode."""
    with open(os.path.join(outdir, "sglp-arch.json")) as f:
        arch = json.load(f)
    state = load_file(os.path.join(outdir, "model.safetensors"))
    model = build(arch, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    m = load(sys.argv[1])
    print(m)
    print(f"{sum(p.numel() for p in m.parameters())} parameters; state_dict loaded strictly")
