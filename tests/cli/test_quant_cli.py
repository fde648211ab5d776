"""`llama4 inspect` weight memory per scheme; `llama4 quantize` flag errors."""

from __future__ import annotations

import llama4
from llama4.accounting import fits_on, quantized_weight_bytes
from llama4.cli import main


def test_scout_weight_memory_per_scheme(capsys):
    scout = llama4.preset("scout")
    bf16 = quantized_weight_bytes(scout, "bf16")["total"]
    assert 215e9 < bf16 < 220e9  # 108.6B parameters
    assert 53e9 < quantized_weight_bytes(scout, "int4", "experts+shared")["quantized"] < 56e9  # Meta's int4 recipe
    assert 50e9 < quantized_weight_bytes(scout, "int4")["quantized"] < 52e9  # routed experts only
    assert "1xH100 80GB" in fits_on(quantized_weight_bytes(scout, "int4")["total"])
    assert "1xH100 80GB" not in fits_on(quantized_weight_bytes(scout, "int8")["total"])
    assert main(["inspect", "scout"]) == 0
    out = capsys.readouterr().out
    assert out.count("fits on:") == 5 and "int4 experts (g128)" in out


def test_quantize_flag_errors(tmp_path, capsys):
    assert main(["quantize", "--scheme", "int8", "--group-size", "64", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "int4 only" in capsys.readouterr().err
    assert main(["quantize", "--scheme", "int8", str(tmp_path / "none"), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
