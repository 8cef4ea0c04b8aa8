#!/usr/bin/env python3
"""Tokenizer fixtures for `--text` (tests/text_input.rs), made with Hugging Face's Python `tokenizers`.

Writes:
* tests/fixtures/tokenizer/: a small byte-level BPE (`tokenizer.json`, trained here on a few files of the
  running Python's standard library, with a template that puts `<s>` in front of every encoded text, as
  LLaMA's does), two inputs (`sample.txt`, `sample.jsonl` with a `text` and a `body` field, both with
  non-ASCII text), and the ids Python's `tokenizers` gives for them, cut the way the engine cuts them
  (`expected_*.npy`, int64 [sequences, seq_len]; `meta.json` says which seq_len and field).
* tests/fixtures/trained_llama/tokenizer.json: the byte-level vocabulary the trained fixture was trained on
  (token = byte value, no BOS), so that `--text` works on that model.

The engine's rule, written plainly here: every document (the whole file for plain text; each line's field
for .jsonl) is encoded with the tokenizer's own template (`add_special_tokens=True`, no truncation or
padding), the ids of all documents are concatenated, and cut into consecutive sequences of `seq_len`; the
remainder is dropped.

    pip install tokenizers numpy && python3 scripts/make_tokenizer_fixtures.py
"""
import json
import os
import sys
import sysconfig

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers.pre_tokenizers import ByteLevel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TRAINED = os.path.join(ROOT, "tests", "fixtures", "trained_llama")
SEQ_LEN = 16

SAMPLE_TXT = (
    "def greet(name):\n"
    "    \"\"\"Say hello — in three languages: héllo, 你好, здравствуй.\"\"\"\n"
    "    return f\"Hello, {name}!\"  # 👋\n\n"
    "for i in range(3):\n\tprint(greet('wörld'), i ** 2)\n"
) * 3

SAMPLE_RECORDS = [
    {"text": "import os\nprint(os.getcwd())", "body": "first body", "id": 1},
    {"text": "Naïve café résumé — déjà vu.", "body": "zweiter Körper", "id": 2},
    {"text": "x = [i * i for i in range(10)]  # squares", "body": "третье", "id": 3},
    {"text": "class A:\n    pass\n", "body": "第四", "id": 4},
    {"text": "while True:\n    break", "body": "fifth body, the last", "id": 5},
]


def cut(ids, seq_len):
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def encode_documents(tok, docs):
    ids = []
    for d in docs:
        ids.extend(tok.encode(d, add_special_tokens=True).ids)
    return ids


def train_bpe():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, f) for f in ("this.py", "textwrap.py", "string.py", "keyword.py")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def byte_tokenizer():
    """Token id = byte value: a BPE without merges over the byte-level alphabet, ordered by byte."""
    from tokenizers.models import BPE

    # ByteLevel maps each byte to a printable character; the GPT-2 table, rebuilt here.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char_of = dict(zip(bs, (chr(c) for c in cs)))
    vocab = {char_of[b]: b for b in range(256)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = train_bpe()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(SAMPLE_TXT)
    with open(os.path.join(OUT, "sample.jsonl"), "w", encoding="utf-8") as f:
        for r in SAMPLE_RECORDS:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.write("\n")  # a trailing blank line, which the engine skips

    tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))  # what the engine reads
    tok.no_truncation()
    tok.no_padding()
    np.save(os.path.join(OUT, "expected_text.npy"), cut(encode_documents(tok, [SAMPLE_TXT]), SEQ_LEN))
    for field in ("text", "body"):
        docs = [r[field] for r in SAMPLE_RECORDS]
        np.save(os.path.join(OUT, f"expected_jsonl_{field}.npy"), cut(encode_documents(tok, docs), SEQ_LEN))
    meta = {
        "seq_len": SEQ_LEN,
        "bos_id": tok.token_to_id("<s>"),
        "vocab_size": tok.get_vocab_size(),
        "tokenizers_version": __import__("tokenizers").__version__,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    bt = byte_tokenizer()
    probe = SAMPLE_TXT + "".join(chr(c) for c in range(1, 256))
    assert bt.encode(probe).ids == list(probe.encode("utf-8")), "byte tokenizer must give byte values"
    bt.save(os.path.join(TRAINED, "tokenizer.json"))
    print(f"wrote {OUT} and {TRAINED}/tokenizer.json ({meta})")


if __name__ == "__main__":
    main()
