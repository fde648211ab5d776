"""`llama4 eval`: exact-match scoring by modality and task, and clear errors for bad data."""

from __future__ import annotations

import json

import pytest
import torch

import llama4
from llama4.eval import synth_qa as ev
from llama4.data.synth import make_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    data = make_dataset(root / "data", n_train=0, n_heldout=12, video_fraction=0.3, seed=3)
    (root / "tok").mkdir()
    from llama4.text.bpe import train_tokenizer

    train_tokenizer([data / "corpus.txt"], 300, root / "tok")
    tok = llama4.Tokenizer(root / "tok")
    cfg = llama4.preset("tiny").replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                        bos_token_id=tok.bos_id, eos_token_id=[tok.eot_id])
    cfg.image_token_index = tok.special_tokens["<|patch|>"]
    model = llama4.Llama4(cfg).init_weights(seed=0).eval()
    return model, tok, data / "heldout.jsonl"


def test_scores_by_group(setup, monkeypatch):
    model, tok, path = setup
    samples = [json.loads(x) for x in path.read_text().splitlines()]
    answers = iter(s["messages"][-1]["content"] if i % 2 == 0 else "wrong" for i, s in enumerate(samples))
    monkeypatch.setattr(ev, "generate", lambda *a, **k: tok.encode(next(answers)) + [tok.eot_id])
    result = ev.evaluate(model, tok, path)
    assert result.total["all"] == 12 and result.correct["all"] == 6
    assert result.total["image"] + result.total["video"] == 12
    assert sum(result.total[g] for g in result.total if g.startswith("image/")) == result.total["image"]


def test_real_generation_runs(setup):
    model, tok, path = setup
    result = ev.evaluate(model, tok, path, limit=3)
    assert result.total["all"] == 3 and len(result.examples) == 3  # a random model: accuracy is whatever it is


def test_normalise():
    assert ev.normalise("  Top   Left. ") == "top left"


def test_bad_data(tmp_path, setup):
    model, tok, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        ev.evaluate(model, tok, bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        ev.evaluate(model, tok, bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        ev.evaluate(model, tok, tmp_path / "missing.jsonl")
