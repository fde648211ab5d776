"""`llama4 eval ppl` and the `llama4 eval <task>` structure (the plain `llama4 eval` is in test_evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llama4
from llama4.cli import build_parser, main

DEFAULT = Path(llama4.__file__).parent / "assets" / "default_model"
TEXT = "The cat sat on the mat. " * 12 + "A second sentence, for a longer document.\n"


def test_ppl_text_file_matches_the_api(tmp_path, capsys, one_thread):
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(data), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    model, tok = llama4.load(DEFAULT).eval(), llama4.Tokenizer(DEFAULT / "tokenizer.json")
    want = llama4.score_rolling(model, tok.encode(TEXT, bos=True))
    assert got["tokens"] == want.n_tokens and got["logprob"] == pytest.approx(want.logprob, abs=1e-3)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    captured = capsys.readouterr()
    assert f"{want.n_tokens} tokens scored" in captured.out and "ppl" in captured.err  # the progress bar
    # windows at absolute positions: a different figure, still every token scored once
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(data), "--window", "16", "--stride", "8",
                 "--json", str(out), "--quiet"]) == 0
    windowed = json.loads(out.read_text())
    assert windowed["tokens"] == want.n_tokens and windowed["logprob"] != pytest.approx(want.logprob, abs=1e-3)


def test_ppl_jsonl_and_bad_files(tmp_path, capsys, one_thread):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "one short document"}) + "\n\n" + json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(data), "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["documents"] == 2
    data.write_text(json.dumps({"txt": "x"}) + "\n")
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(data)]) == 2
    assert "docs.jsonl:1: expected an object with a string 'text' field" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(DEFAULT), "--data", str(data), "--stride", "4"]) == 2
    assert "--stride needs --window" in capsys.readouterr().err


def test_eval_keeps_its_flags_and_takes_sub_tasks(capsys):
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--limit", "3"])
    assert args.model == "m" and args.limit == 3 and args.eval_task is None
    args = parser.parse_args(["eval", "ppl", "--model", "m", "--data", "d", "--window", "8"])
    assert args.eval_task == "ppl" and args.window == 8 and args.func.__name__ == "cmd_ppl"
    assert main(["eval"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
