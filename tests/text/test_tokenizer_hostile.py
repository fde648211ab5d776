"""The tokenizer.json backend on hostile text: lone surrogates, and huge inputs encoded in bounded batches."""

from __future__ import annotations

import pytest

from llama4.cli.demo import default_model_path
from llama4.text import tokenizer as tokenizer_module
from llama4.text.tokenizer import MAX_ENCODE_CHARS, Tokenizer


@pytest.fixture(scope="module")
def hf_tok():
    return Tokenizer(default_model_path())  # a tokenizer.json


def test_lone_surrogates_work_as_in_tiktoken(hf_tok):
    # tiktoken replaces a lone surrogate with U+FFFD; the tokenizers library raised TypeError on it.
    for text in ("a\udcffb", "\ud800", "x\udfff\ud83d"):
        assert hf_tok.encode(text) == hf_tok.encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    meta = Tokenizer()
    assert meta.encode("a\udcffb") == meta.encode("a\ufffdb")


def test_huge_input_in_batches_equals_one_shot(hf_tok, monkeypatch):
    """Segments go to the Rust side a few at a time (bounded memory); the ids equal one call on all of them."""
    text = ("The red circle is at the top left.\n" * 9000 + "x" * 30_000 + " naïve 日本語 " * 3000) * 3
    assert len(text) > 2 * MAX_ENCODE_CHARS
    assert len(tokenizer_module._segments(text)) > tokenizer_module.HF_BATCH_SEGMENTS
    calls = []
    backend = hf_tok._backend
    real = backend._encode
    monkeypatch.setattr(backend, "_encode", lambda batch: calls.append(len(batch)) or real(batch))
    ids = hf_tok.encode(text)
    assert max(calls) <= tokenizer_module.HF_BATCH_SEGMENTS and len(calls) > 1
    segments = tokenizer_module._segments(text)
    one_shot = [i for e in backend._tok.encode_batch(segments, add_special_tokens=False) for i in e.ids]
    assert ids == one_shot
