#!/usr/bin/env python3
"""Train the small CIFAR-style ResNet-20 of the CNN quality test on the handwritten digits scikit-learn
ships (1,797 images of 8×8, upsampled to 16×16, normalised), and write it with its calibration and held-out
images:

    python3 scripts/train_cnn_digits.py [--out tests/fixtures/cnn/trained_digits] [--epochs 40]

Output: `model.safetensors` (state_dict of `cifar-resnet20`, option-A shortcuts, widths 8/16/32),
`calib_images.npy` / `calib_labels.npy` (256 training images, the engine's calibration set),
`eval_images.npy` / `eval_labels.npy` (the 397 held-out images), `train.json` (accuracy, seed, settings).
Deterministic for a given seed on one machine (CPU, single-threaded kernels where PyTorch allows).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_models as cm  # noqa: E402


def data(seed):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    x = x.repeat(1, 3, 1, 1)  # three channels, as a CIFAR network reads
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def shift(x, gen):
    """Random translation by up to 2 pixels (zero fill): the augmentation."""
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    return torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((cm.run(model, x).argmax(1) == y).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                  "cnn", "trained_digits"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    (xt, yt), (xe, ye) = data(args.seed)
    model = cm.CifarResNet(20, (8, 16, 32), 10, option="A")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * ((len(yt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(cm.run(model, shift(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, train acc {accuracy(model, xt, yt):.4f}, "
                  f"held-out acc {accuracy(model, xe, ye):.4f}")
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, "model.safetensors"))
    np.save(os.path.join(args.out, "calib_images.npy"), xt[:256].numpy())
    np.save(os.path.join(args.out, "calib_labels.npy"), yt[:256].numpy())
    np.save(os.path.join(args.out, "eval_images.npy"), xe.numpy())
    np.save(os.path.join(args.out, "eval_labels.npy"), ye.numpy())
    info = dict(arch="cifar-resnet20", widths=[8, 16, 32], shortcut="A", input="digits 8x8 -> 16x16, 3 ch",
                epochs=args.epochs, seed=args.seed, seconds=round(time.time() - t0, 1),
                train_accuracy=accuracy(model, xt, yt), heldout_accuracy=accuracy(model, xe, ye),
                torch=torch.__version__)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
