"""`llama4 inspect`: config summary, parameter counts and KV-cache figures; clean errors."""

from __future__ import annotations

from llama4.cli import main


def test_inspect_scout(capsys):
    assert main(["inspect", "scout"]) == 0
    out = capsys.readouterr().out
    assert "total 108,641,793,536" in out and "active 17,172,894,720" in out
    assert "12 global" in out and "36 local" in out
    assert "10,485,760" in out and "480 GiB" in out  # the global layers' 10M-token cache in bf16


def test_inspect_checkpoint_dir_with_context(tmp_path, capsys):
    import llama4

    llama4.save_config(llama4.preset("maverick"), tmp_path / "config.json")
    assert main(["inspect", str(tmp_path), "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "401,583,781,376" in out and "@      4,096" in out


def test_inspect_bad_target(capsys, tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="neither a preset"):
        main(["inspect", str(tmp_path / "missing")])
    (tmp_path / "config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
