"""`prune --arch` → `rebuild_cnn.py`: the rebuilt pruned model gives the logits of the original with the
removed units skipped (float32, max |Δ| ≤ 1e-4 relative to the logits' scale), for every family layout.

Needs the engine's binary: `SGLP_ENGINE_BIN`, else `target/debug/sglp-engine` or `target/release/...`
(built by `cargo test` / `cargo build`); skipped with the reason when there is none.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import cnn_models as cm  # noqa: E402
import rebuild_cnn  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "cnn")


def engine():
    for p in [os.environ.get("SGLP_ENGINE_BIN"), os.path.join(ROOT, "target", "debug", "sglp-engine"),
              os.path.join(ROOT, "target", "release", "sglp-engine")]:
        if p and os.path.exists(p):
            return p
    pytest.skip("no sglp-engine binary (run cargo build, or set SGLP_ENGINE_BIN)")


# fixture, arch, the PyTorch model it was made from (weights loaded from the fixture), image size, remove
CASES = [
    ("cifar_resnet20_a", "cifar-resnet20", lambda: cm.CifarResNet(20, (4, 8, 16), 10, option="A"), 8, 2),
    ("cifar_resnet20_b", "cifar-resnet20", lambda: cm.CifarResNet(20, (4, 8, 16), 7, option="B"), 8, 3),
    ("resnet18", "resnet18", lambda: cm.TvResNet(18, base=4, num_classes=5), 32, 2),
    ("resnet50", "resnet50", lambda: cm.TvResNet(50, base=2, num_classes=6), 32, 4),
    ("vgg11_bn", "vgg11_bn", lambda: cm.Vgg(11, batch_norm=True, width_div=16, num_classes=4, hidden=16),
     32, 1),
    ("vgg16_cifar", "vgg16", lambda: cm.Vgg(16, width_div=16, num_classes=10, cifar=True), 32, 3),
]


@pytest.mark.parametrize("name,arch,make,hw,remove", CASES, ids=[c[0] for c in CASES])
def test_rebuilt_model_matches_skipped_original(tmp_path, name, arch, make, hw, remove):
    exe = engine()
    model_path = os.path.join(FIX, name, "model.safetensors")
    original = make()
    original.load_state_dict(load_file(model_path), strict=True)
    original.eval()
    classes = original.state_dict()[[k for k in original.state_dict() if k.endswith(".weight")][-1]].shape[0]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, hw, hw, generator=gen)
    y = torch.randint(0, classes, (12,), generator=gen)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "pruned"
    r = subprocess.run([exe, "-q", "prune", "--model", model_path, "--arch", arch,
                        "--images", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                        "--remove", str(remove), "--cka-batch", "4", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(out / "sglp-report.json") as f:
        removed = json.load(f)["removed"]
    assert len(removed) == remove
    rebuilt = rebuild_cnn.load(str(out))
    with torch.no_grad():
        want = cm.run(original, x, skip=removed)
        got = rebuilt(x)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale, (name, removed)
    n_params = sum(p.numel() for p in rebuilt.parameters())
    assert n_params < sum(p.numel() for p in original.parameters())


def test_rebuild_refuses_other_files(tmp_path):
    (tmp_path / "sglp-arch.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="sglp-arch/1"):
        rebuild_cnn.build(json.loads((tmp_path / "sglp-arch.json").read_text()), {})
