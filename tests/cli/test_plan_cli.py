"""`llama4 plan`: context parallelism for Scout's 10M window, token counts with suffixes, GPU bounds."""

from __future__ import annotations

import re

import pytest

from llama4.cli import main
from llama4.cli.common import token_count


def test_scout_10m_fp8_kv_int4_fits_with_context_parallel(capsys):
    assert main(["plan", "--model", "scout", "--context", "10M", "--gpus", "8xH200", "--kv-dtype", "fp8",
                 "--quant", "int4"]) == 0
    out = capsys.readouterr().out
    assert "context 10,485,760" in out
    head = out.split("layouts that fit")[0]
    for term in ("weights: routed experts", "KV: chunked (local) layers, bf16, one chunk",
                 "KV: global layers, fp8 (/tp/cp)", "ring attention", "activations", "-> fits"):
        assert term in head, out
    pick = re.search(r"layout tp=(\d+) ep=(\d+) dp=(\d+) cp=(\d+)", out)
    assert pick and int(pick.group(4)) > 1, out
    # Without context parallelism the global KV of one 10M sequence is split by tp alone: more per GPU.
    assert main(["plan", "--model", "scout", "--context", "10M", "--gpus", "8xH200", "--kv-dtype", "fp8",
                 "--quant", "int4", "--tp", "8", "--ep", "1"]) == 0
    no_cp = capsys.readouterr().out
    total = lambda s: s.split("  total")[1].split("\n")[0]  # noqa: E731
    assert "cp=1" in no_cp and total(no_cp) != total(out)


def test_cp_degree_is_checked(capsys):
    assert main(["plan", "--model", "scout", "--gpus", "8xH100", "--tp", "2", "--cp", "3"]) == 2
    assert "--cp 3 is not a context-parallel degree" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("8192", 8192), ("128k", 131072), ("10M", 10485760), ("2K", 2048)])
def test_token_count(text, value):
    assert token_count(text) == value


@pytest.mark.parametrize("gpus, msg", [("99999999999999999999xH100", "1 <= COUNT"), ("8x0GB", "must be > 0 GB"),
                                       ("0xH100", "1 <= COUNT")])
def test_gpu_counts_and_sizes_are_bounded(gpus, msg, capsys):
    assert main(["plan", "--model", "scout", "--gpus", gpus]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("ctx", ["10G", "-5", "0", "1.5k"])
def test_bad_context_is_refused(ctx, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--model", "scout", "--gpus", "8xH100", "--context", ctx])
    assert "--context" in capsys.readouterr().err
