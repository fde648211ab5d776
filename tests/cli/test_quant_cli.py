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


def test_inspect_stored_line(tmp_path, capsys):
    """`stored` says what is on disk: bytes per dtype from the headers, and the declared scheme."""
    import torch

    from llama4.checkpoint.quantized_save import quantize_checkpoint

    cfg = llama4.preset("tiny")
    cfg.vision = None
    llama4.save(llama4.Llama4(cfg).init_weights(seed=0).to(torch.bfloat16), tmp_path / "bf16")
    assert main(["inspect", str(tmp_path / "bf16")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("stored"))
    assert "BF16" in line and "not quantized" in line and "1 safetensors file" in line
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "int4", "int4", group_size=32)
    assert main(["inspect", str(tmp_path / "int4")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("stored"))
    assert "quantized: compressed-tensors (pack-quantized): int4 group 32" in line, line
    assert "I32" in line  # compressed-tensors packs eight int4 values per int32
    assert out.count("fits on:") == 5  # the per-scheme memory lines stay beside it
    assert main(["inspect", "scout"]) == 0
    assert "stored           preset 'scout': nothing on disk" in capsys.readouterr().out
