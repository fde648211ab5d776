"""fp8 / int8 KV (kv/quant.py): the quantizer's error bound, logits and greedy tokens within stated
tolerances of full-precision KV in the contiguous and the paged stores, forks that copy stored bytes,
and the global layers' KV memory (bytes the store allocates) at half of bf16 plus the scales."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import rel_err, small_text
from llama4.kv import ContiguousKV, make_cache
from llama4.kv.paged import PagedKV
from llama4.kv.quant import KVTensor, dequantize, quantize

pytestmark = pytest.mark.usefixtures("one_thread")

# Max logit error over max |logit| against fp32 KV, decode steps after a sliced prefill (head_dim 64).
# Measured here: int8 1.1e-3, fp8 5.0e-3 (fp8 e4m3 keeps 3 mantissa bits: up to 2^-4 per element).
TOL = {"int8": 4e-3, "fp8": 2e-2}
# The paged pool quantizes every layer's blocks (one pool serves both kinds), so its error is larger.
# Measured here (3 chunked + 1 global layer): int8 1.2e-2, fp8 8.7e-2.
PAGED_TOL = {"int8": 3e-2, "fp8": 0.15}


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text(head_dim=64)).init_weights(std=0.08, seed=0).eval()


def _ids(b, n, seed=1):
    return torch.randint(3, 512, (b, n), generator=torch.Generator().manual_seed(seed))


def test_quantizer_error_bound():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 5)[:, None]
    amax = x.abs().amax(-1, keepdim=True)
    q, s = quantize(x, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == x.shape[:-1]
    assert ((dequantize(q, s, torch.float32) - x).abs() <= 0.5 / 127 * amax * 1.01).all()
    q, s = quantize(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    err = (dequantize(q, s, torch.float32) - x).abs()
    assert (err <= 2 ** -4 * x.abs() + 2 ** -9 * amax / 448 * 1.01).all()  # relative, or subnormal steps
    q, s = quantize(torch.zeros(2, 8), "int8")  # an all-zero vector stays zero (no 0/0)
    assert (dequantize(q, s, torch.float32) == 0).all()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@torch.inference_mode()
def test_contiguous_logits_within_tolerance(model, kv_dtype):
    cfg = model.config.text
    ids = _ids(2, 100)
    ref = model(ids)
    cache = make_cache(cfg, 2, 100, kv_dtype=kv_dtype)
    assert [k.kv_dtype for k in cache.k] == [None if cfg.is_chunked(i) else kv_dtype for i in range(len(cache.k))]
    outs = [model(ids[:, a:b], cache=cache) for a, b in ((0, 23), (23, 70))]  # the second reads a stored prefix
    outs += [model(ids[:, t:t + 1], cache=cache) for t in range(70, 100)]
    got = torch.cat(outs, 1)
    err = rel_err(got, ref)
    assert 0 < err <= TOL[kv_dtype], err  # > 0: the store really is quantized
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_greedy_tokens_equal_full_precision(model, kv_dtype):
    prompts = _ids(2, 20, seed=5).tolist()
    want = llama4.generate_batch(model, prompts, max_new_tokens=30, stop_ids=[])
    got = llama4.generate_batch(model, prompts, max_new_tokens=30, stop_ids=[], kv_dtype=kv_dtype)
    assert got == want


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@torch.inference_mode()
def test_paged_store_within_tolerance_and_forks(model, kv_dtype):
    cfg = model.config.text
    ids = _ids(1, 90, seed=2)[0].tolist()
    ref = model(torch.tensor([ids]))[0]
    kv = PagedKV(cfg, 120, block_size=8, kv_dtype=kv_dtype)
    assert kv.k_NKBD.data.dtype.itemsize == 1
    seq = kv.add(ids)
    outs = []
    for a, b in [(0, 30), (30, 61)] + [(t, t + 1) for t in range(61, 90)]:
        outs.append(model(torch.tensor([ids[a:b]]), cache=kv, step=kv.plan([(seq, b - a)]))[0])
        if b == 61:  # a fork copies the stored bytes and scales: both continue identically
            twin = kv.fork(seq)
    got = torch.cat(outs)
    err = rel_err(got, ref)
    assert 0 < err <= PAGED_TOL[kv_dtype], err
    kv.remove(seq)
    twin_out = [model(torch.tensor([ids[t:t + 1]]), cache=kv, step=kv.plan([(twin, 1)]))[0] for t in range(61, 90)]
    torch.testing.assert_close(torch.cat(twin_out), got[61:], rtol=0, atol=0)


def test_global_kv_memory_halves():
    """Bytes the stores allocate, at Llama 4's head_dim 128: global layers 0.5 + 1/128 of bf16."""
    cfg = small_text(head_dim=128, num_hidden_layers=8).text
    bf16 = ContiguousKV(cfg, 2, 4096, torch.bfloat16).nbytes_by_kind()
    for kv_dtype in ("fp8", "int8"):
        q = ContiguousKV(cfg, 2, 4096, torch.bfloat16, kv_dtype=kv_dtype).nbytes_by_kind()
        assert q["local"] == bf16["local"]  # chunked layers keep the compute dtype
        assert q["global"] / bf16["global"] == pytest.approx(0.5 + 1 / 128)
        paged = PagedKV(cfg, 64, 16, torch.bfloat16, kv_dtype=kv_dtype).nbytes()
        assert paged / PagedKV(cfg, 64, 16, torch.bfloat16).nbytes() == pytest.approx(0.5 + 1 / 128)
        assert PagedKV.from_memory(cfg, 10 ** 7, 16, dtype=torch.bfloat16, kv_dtype=kv_dtype).num_blocks >= \
            1.9 * PagedKV.from_memory(cfg, 10 ** 7, 16, dtype=torch.bfloat16).num_blocks


def test_bad_kv_dtype_is_named():
    with pytest.raises(ValueError, match="kv_dtype='int4'.*fp8.*int8"):
        KVTensor((2, 4), torch.float32, "int4")
    with pytest.raises(ValueError, match="kv_dtype='e5m2'"):
        llama4.generate(llama4.Llama4(small_text()).init_weights(seed=0), [1, 2], max_new_tokens=1, kv_dtype="e5m2")


def test_scheduler_on_an_int8_pool_matches_full_precision_greedy(model):
    """The server's path: continuous batching over an int8 paged pool (every layer quantized)."""
    from llama4.generation.scheduler import Request, Scheduler

    prompts = _ids(3, 24, seed=9).tolist()
    want = [llama4.generate(model, p, max_new_tokens=12, stop_ids=[]) for p in prompts]
    s = Scheduler(model, PagedKV(model.config.text, 200, block_size=8, kv_dtype="int8"), prefill_chunk=16)
    reqs = [Request(p, 12) for p in prompts]
    for r in reqs:
        s.add(r)
    while s.has_work():
        s.step()
    assert [r.generated for r in reqs] == want


def test_cli_kv_dtype_flags(tmp_path, capsys):
    from llama4.cli import main
    from llama4.cli.serve import build_engine

    assert main(["inspect", "scout", "--context", "10000000", "--kv-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "global layers fp8 (1.016 bytes with scales)" in out and "global   232.5 GiB" in out
    assert main(["inspect", "scout", "--context", "10000000"]) == 0
    assert "global   457.8 GiB" in capsys.readouterr().out
    m = llama4.Llama4(small_text()).init_weights(std=0.08, seed=0).eval()
    full = build_engine(m, None, kv_memory=4 << 20, block_size=8)
    fp8 = build_engine(m, None, kv_memory=4 << 20, block_size=8, kv_dtype="fp8")
    assert fp8.scheduler.kv.kv_dtype == "fp8" and fp8.scheduler.kv.nbytes() <= 4 << 20
    assert fp8.scheduler.kv.num_blocks >= 3.5 * full.scheduler.kv.num_blocks  # fp32 weights: 4 bytes -> 1 + 2/16
