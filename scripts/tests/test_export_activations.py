"""scripts/export_activations.py on padded input: the attention mask reaches the model, padding positions are
not samples, and an encoder loads as an encoder (no causal-LM head). Needs torch and transformers; a tiny
random BERT made here from a seed.

    pytest scripts/tests -q
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "export_activations.py")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    transformers.BertModel(cfg).eval().save_pretrained(d)
    return d


def padded_ids(rng):
    lens = [12, 5, 9, 3]
    ids = np.zeros((len(lens), 12), dtype=np.int64)
    for i, n in enumerate(lens):
        ids[i, :n] = rng.integers(1, 50, size=n)
    return ids, lens


def export(bert, tmp_path, ids, *extra):
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "acts"
    return subprocess.run([sys.executable, SCRIPT, "--hf", str(bert), "--tokens", str(tmp_path / "ids.npy"),
                           "--modules", r"^encoder\.layer\.\d+$", "--batch-size", "4", "--out", str(out),
                           *extra], capture_output=True, text=True), out


def test_padded_tokens_equal_unpadded_forwards(bert, tmp_path):
    ids, lens = padded_ids(np.random.default_rng(1))
    r, out = export(bert, tmp_path, ids, "--pad-id", "0")
    assert r.returncode == 0, r.stderr
    acts = load_file(str(out) + ".safetensors")
    # An encoder: module names without the `bert.` prefix of a causal-LM wrapper.
    assert sorted(acts) == [f"encoder.layer.{i}" for i in range(3)]
    model = transformers.AutoModel.from_pretrained(bert).eval()
    with torch.no_grad():
        want = [model(input_ids=torch.from_numpy(ids[i:i + 1, :n]), output_hidden_states=True).hidden_states
                for i, n in enumerate(lens)]
    for l in range(3):
        got = acts[f"encoder.layer.{l}"]
        assert got.shape == (sum(lens), 32), got.shape  # padding positions are not samples
        ref = np.concatenate([w[l + 1][0].numpy() for w in want])
        assert np.abs(got - ref).max() < 1e-4


def test_unmasked_padding_would_differ(bert, tmp_path):
    # Why the mask matters: without it the short sentence's real tokens move.
    ids, lens = padded_ids(np.random.default_rng(2))
    model = transformers.AutoModel.from_pretrained(bert).eval()
    with torch.no_grad():
        padded = model(input_ids=torch.from_numpy(ids)).last_hidden_state[3, :lens[3]]
        alone = model(input_ids=torch.from_numpy(ids[3:4, :lens[3]])).last_hidden_state[0]
    assert (padded - alone).abs().max() > 1e-3


def test_features_mode_refuses_padding(bert, tmp_path):
    ids, _ = padded_ids(np.random.default_rng(3))
    r, _ = export(bert, tmp_path, ids, "--pad-id", "0", "--token-mode", "features")
    assert r.returncode != 0
    assert "padded input with --token-mode features" in r.stderr
