"""PyTorch tensors of every dtype, and capture() with forward hooks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import sglp_engine  # noqa: E402
from sglp_engine.torch import capture  # noqa: E402


def make(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    return {f"l{i}": z @ torch.randn(4, 6, generator=g) + 0.3 * torch.randn(n, 6, generator=g) for i in range(3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_dtype_matches_numpy_of_the_same_values(dtype):
    acts = {k: v.to(dtype) for k, v in make().items()}
    res = sglp_engine.cka(acts, batch_size=32, device="cpu")
    ref = sglp_engine.cka({k: v.double().numpy() for k, v in acts.items()}, batch_size=32, device="cpu")
    np.testing.assert_allclose(res.cka, ref.cka, atol=1e-6)


def test_requires_grad_and_integer_tensors():
    acts = {k: v.requires_grad_() for k, v in make().items()}
    sglp_engine.cka(acts, batch_size=32, device="cpu")
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        sglp_engine.cka({"a": torch.ones(8, 2, dtype=torch.int32)}, device="cpu")


def test_cuda_tensors_are_read_on_the_host():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the copy-to-host path for CUDA tensors is untested")
    acts = {k: v.cuda() for k, v in make().items()}
    with pytest.warns(sglp_engine.CopyWarning):
        sglp_engine.cka(acts, batch_size=32, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_are_read_in_place_by_the_cuda_backend(dtype):
    """CUDA tensors with device="cuda": no CopyWarning, the same CKA as the CPU on the same values (1e-4: f32
    tiles on the GPU), over updates of sizes that are not multiples of the batch (rows carried across). The
    Gram route explicitly: these narrow layers would take the feature route, which copies to the host."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the in-place CUDA path is untested")
    import warnings

    host = {k: v.to(dtype) for k, v in make(n=200, seed=3).items()}
    want = sglp_engine.cka({k: v.float().numpy() for k, v in host.items()}, batch_size=32, device="cpu")
    acc = sglp_engine.CkaAccumulator(batch_size=32, device="cuda", route="gram")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sglp_engine.CopyWarning)
        for s, e in [(0, 45), (45, 150), (150, 200)]:
            acc.update({k: v[s:e].cuda() for k, v in host.items()})
    got = acc.finish()
    assert got.backend.startswith("cuda")
    assert not [w for w in got.warnings if "copied to host memory" in w], got.warnings
    assert got.n_samples == 200 and got.n_batches == want.n_batches
    np.testing.assert_allclose(got.cka, want.cka, atol=1e-4)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        return (x + torch.tanh(self.lin(x)), None)  # a tuple, as HF decoder layers return


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block() for _ in range(4)])

    def forward(self, x):
        for b in self.layers:
            x = b(x)[0]
        return x


def test_capture_streams_module_outputs_like_a_one_shot_call():
    torch.manual_seed(0)
    net = Net()
    data = torch.randn(10, 12, 6)  # 10 batches of [12 tokens?, 6] -> here [batch=12, 6]
    acc = sglp_engine.CkaAccumulator(batch_size=40, device="cpu")
    capture(net, r"^layers\.\d+$", list(data), acc)
    res = acc.finish()
    outs = {f"layers.{i}": [] for i in range(4)}
    with torch.no_grad():
        for x in data:
            for i, b in enumerate(net.layers):
                x = b(x)[0]
                outs[f"layers.{i}"].append(x)
    whole = sglp_engine.cka({k: torch.cat(v) for k, v in outs.items()}, batch_size=40, device="cpu")
    assert res.layers == whole.layers == [f"layers.{i}" for i in range(4)]
    np.testing.assert_allclose(res.cka, whole.cka, atol=1e-12)
