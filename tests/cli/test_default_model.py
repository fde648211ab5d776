"""The shipped default model: it loads from the package, answers fresh questions, and keeps its
held-out accuracy (a regression test of the whole multimodal path: media, chat format, vision tower,
early fusion, iRoPE attention, MoE, caches and greedy generation)."""

from __future__ import annotations

import io

import pytest

import llama4
from llama4.cli.demo import default_model_path, run_demo
from llama4.eval.synth_qa import evaluate, heldout_synthetic


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


def test_default_model_is_small_and_complete():
    path = default_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 2**20
    cfg = llama4.load_config(path)
    t = cfg.text
    assert cfg.vision is not None and t.moe_layers and t.num_local_experts > 1
    assert any(t.is_chunked(i) for i in range(t.num_hidden_layers))
    assert any(not t.uses_rope(i) for i in range(t.num_hidden_layers)) and t.attn_temperature_tuning


def test_demo_answers():
    out = io.StringIO()
    results = run_demo(seed=7, out=out)
    assert len(results) == 5 and "video" in out.getvalue()
    assert sum(a.lower() == e for _, e, a in results) >= 3


def test_heldout_accuracy(tmp_path):
    model = llama4.load(default_model_path())
    tok = llama4.Tokenizer(default_model_path())
    data = heldout_synthetic(model, tmp_path, n=120)
    result = evaluate(model, tok, data)
    # Measured on 400 questions: images 93.1%, video motion 100% (docs/default_model.md); chance 25-33%.
    assert result.accuracy("image") >= 0.85, result.summary()
    assert result.accuracy("video") >= 0.9, result.summary()


def test_demo_command(capsys):
    from llama4.cli import main

    assert main(["demo", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert "answers correct" in out and out.count("->") == 5
    assert main(["demo", "--model", "/nonexistent/dir"]) == 2
