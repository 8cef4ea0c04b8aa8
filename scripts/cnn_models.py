"""The CNN families the engine reads, in plain PyTorch, with the state_dict key layouts the engine expects.

Shared by `make_cnn_fixtures.py` (tiny random models and their float64 reference), `train_cnn_digits.py`
(a small trained CIFAR ResNet-20) and `bench_cnn_torch.py` (PyTorch's time for the runtime bench). The
layouts are those of the widely used implementations:

* `CifarResNet`: He et al.'s CIFAR ResNets as in the common CIFAR implementations and SGLP's code:
  `conv1`, `bn1`, `layer{1,2,3}.{i}.conv1/bn1/conv2/bn2`, option A (zero-pad, no keys) or option B
  (`shortcut.0/1`, 1×1 conv + BN) shortcuts, `linear`.
* `TvResNet`: torchvision's `resnet{18,34,50,101,152}` (`downsample.0/1`, `fc`), with a width multiplier so
  that fixtures stay small.
* `Vgg`: torchvision's `vgg{11,13,16,19}[_bn]` (`features.{i}`, adaptive 7×7 average pool, `classifier.0/3/6`)
  or the CIFAR layout (one linear `classifier` on the flattened 1×1 map).

Width and depth are parameters; the engine reads channel counts from the tensors, depth from `--arch`. The
residual blocks come from `rebuild_cnn.py` (which must stay standalone for users).
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The residual blocks are those of the standalone rebuild script, so both build the same modules.
from rebuild_cnn import BasicBlock, Bottleneck  # noqa: E402

CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
TV_RESNETS = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True),
              101: ([3, 4, 23, 3], True), 152: ([3, 8, 36, 3], True)}
VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512,
         512, "M"],
}


def CifarBasicBlock(c_in, c_out, stride, option):
    """He et al.'s CIFAR basic block: option A (zero-pad) or B (`shortcut.0/1`) when the shape changes."""
    return BasicBlock(c_in, c_out, stride, option, "shortcut")


class CifarResNet(nn.Module):
    def __init__(self, depth=20, widths=(16, 32, 64), num_classes=10, option="A", in_channels=3):
        super().__init__()
        n = CIFAR_DEPTHS[depth]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for s, w in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(c, w, 2 if s > 0 and i == 0 else 1, option))
                c = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(c, num_classes)
        self.stages = [self.layer1, self.layer2, self.layer3]

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TvResNet(nn.Module):
    def __init__(self, depth=18, base=64, num_classes=1000, in_channels=3):
        super().__init__()
        blocks, bottleneck = TV_RESNETS[depth]
        self.conv1 = nn.Conv2d(in_channels, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        c = base
        for s, n in enumerate(blocks):
            mid = base * 2 ** s
            layer = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                layer.append(Bottleneck(c, mid, stride) if bottleneck
                             else BasicBlock(c, mid, stride, "B", "downsample"))
                c = mid * (4 if bottleneck else 1)
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(c, num_classes)
        self.stages = [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x):
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)

    def head(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Vgg(nn.Module):
    """torchvision's VGG layout (`cifar=False`: adaptive 7×7 pool, classifier.0/3/6 with `hidden` units and
    dropout) or the CIFAR layout (`cifar=True`: flatten, one linear `classifier`)."""

    def __init__(self, depth=16, batch_norm=False, width_div=1, num_classes=1000, cifar=False,
                 hidden=4096, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        self.convs = []  # (index of the conv in features, pool after it)
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                self.convs[-1][1] = True
                continue
            out = v // width_div
            self.convs.append([len(layers), False])
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=False))
            c = out
        self.features = nn.Sequential(*layers)
        self.batch_norm = batch_norm
        self.cifar = cifar
        if cifar:
            self.classifier = nn.Linear(c, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(c * 49, hidden), nn.ReLU(False), nn.Dropout(),
                nn.Linear(hidden, hidden), nn.ReLU(False), nn.Dropout(),
                nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.features(x)
        if not self.cifar:
            x = self.avgpool(x)
        return self.classifier(x.flatten(1))


def units(model):
    """The model's units in order: (name, key prefixes, fn(x) -> unit output, removable, after(x))."""
    if isinstance(model, Vgg):
        out = []
        for idx, pool in model.convs:
            conv = model.features[idx]
            mods = [conv] + ([model.features[idx + 1]] if model.batch_norm else [])
            prefixes = [f"features.{idx}"] + ([f"features.{idx + 1}"] if model.batch_norm else [])

            def f(x, mods=mods):
                for m in mods:
                    x = m(x)
                return F.relu(x)
            after = (lambda x: F.max_pool2d(x, 2, 2)) if pool else (lambda x: x)
            out.append((f"features.{idx}", prefixes, f, conv.in_channels == conv.out_channels, after))
        return out
    out = []
    for s, stage in enumerate(model.stages):
        for i, block in enumerate(stage):
            out.append((f"layer{s + 1}.{i}", [f"layer{s + 1}.{i}"], block, block.identity, lambda x: x))
    return out


def run(model, x, skip=(), on_hidden=None):
    """Logits of `x` with the units in `skip` replaced by the identity; `on_hidden(i, h)` as the engine
    reports: i = 0 the first unit's input, i = u + 1 unit u's output (before a VGG pool)."""
    us = units(model)
    if isinstance(model, Vgg):
        h = x
    else:
        h = model.stem(x)
    if on_hidden:
        on_hidden(0, h)
    for u, (_, _, f, _, after) in enumerate(us):
        if u not in skip:
            h = f(h)
        if on_hidden:
            on_hidden(u + 1, h)
        h = after(h)
    if isinstance(model, Vgg):
        if not model.cifar:
            h = model.avgpool(h)
        return model.classifier(h.flatten(1))
    return model.head(h)


def group_of(model, key):
    """The gradient-norm group of parameter `key`: unit index, 'stem' or 'head'."""
    for u, (_, prefixes, _, _, _) in enumerate(units(model)):
        if any(key.startswith(p + ".") for p in prefixes):
            return u
    if key.startswith(("linear.", "fc.", "classifier")):
        return "head"
    return "stem"


def randomise_bn(model, gen):
    """Non-trivial inference statistics and affine parameters, so BN is exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
