#!/usr/bin/env python3
"""One forward + backward of CIFAR ResNet-56 on 128 images of 3×32×32 on the CPU: PyTorch against the
engine's CNN runtime (`sglp-engine gradnorm --arch cifar-resnet56 --timing`), same weights, same images,
same threads, one run.

    python3 scripts/bench_cnn_torch.py [--engine target/release/sglp-engine] [--threads 2]

Both run batch norm on its running statistics (PyTorch in eval mode, the engine's inference-mode BN), loss
= mean cross-entropy, gradients of every parameter (the images need none). The first step of each is a
warm-up and is not counted; PyTorch's timed steps are split before and after the engine's run, and the
medians are compared.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_models as cm  # noqa: E402


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default=os.path.join(here, "..", "target", "release", "sglp-engine"))
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cm.CifarResNet(args.depth, (16, 32, 64), 10, option="A")
    cm.randomise_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(args.images, 3, 32, 32)
    y = torch.randint(0, 10, (args.images,))

    def step():
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model.head(model.layer3(model.layer2(model.layer1(model.stem(x))))), y).backward()
        return time.perf_counter() - t

    step()
    torch_s = [step() for _ in range(args.reps // 2)]
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "m.safetensors"))
        reps = args.reps + 1
        np.save(os.path.join(d, "x.npy"), x.repeat(reps, 1, 1, 1).numpy())
        np.save(os.path.join(d, "y.npy"), y.repeat(reps).numpy())
        os.sync()  # do not charge the engine for writing back what was just saved
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        subprocess.run([args.engine, "-q", "gradnorm", "--model", os.path.join(d, "m.safetensors"),
                        "--arch", f"cifar-resnet{args.depth}", "--images", os.path.join(d, "x.npy"),
                        "--labels", os.path.join(d, "y.npy"), "--batch", str(args.images), "--timing",
                        "--out", os.path.join(d, "g.json")], check=True, env=env,
                       stderr=subprocess.DEVNULL)
        with open(os.path.join(d, "g.json")) as f:
            g = json.load(f)
    engine_s = g["timing"]["forward_backward_s"][1:]
    torch_s += [step() for _ in range(args.reps - args.reps // 2)]
    tm, em = statistics.median(torch_s), statistics.median(engine_s)
    # Check that both computed the same thing: the loss.
    with torch.no_grad():
        loss = F.cross_entropy(cm.run(model, x), y).item()
    print(json.dumps(dict(
        workload=f"cifar-resnet{args.depth}, {args.images} images 3x32x32, forward+backward, "
                 f"{args.threads} threads", torch=torch.__version__,
        pytorch_s=torch_s, engine_s=engine_s, pytorch_median_s=round(tm, 4), engine_median_s=round(em, 4),
        engine_over_pytorch=round(em / tm, 3), loss_pytorch=loss, loss_engine=g["loss"]), indent=1))


if __name__ == "__main__":
    main()
