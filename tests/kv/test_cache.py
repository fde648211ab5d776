"""Caches by layer kind: cached == uncached logits at every chunk-boundary case, bounded local caches,
per-row positions for ragged batches, KV-size figures that match the real allocation."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import rel_err, small_text
from llama4.accounting import kv_cache_bytes
from llama4.kv import make_cache

C = 32  # small_text's attention_chunk_size


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def model():
    # floor_scale 8: the temperature scale of the global layers changes every 8 positions, so a
    # decode step that used relative instead of absolute positions would show.
    return llama4.Llama4(small_text(floor_scale=8, attn_scale=0.5)).init_weights(std=0.08, seed=0).eval()


def _cached_logits(model, ids_BT, prompt_len: int, slice_len: int) -> torch.Tensor:
    """Prefill `prompt_len` tokens in slices of `slice_len`, then decode the rest one at a time."""
    cache = make_cache(model.config.text, ids_BT.shape[0], ids_BT.shape[1])
    outs, p = [], 0
    while p < ids_BT.shape[1]:
        q = min(prompt_len, p + slice_len) if p < prompt_len else p + 1
        outs.append(model(ids_BT[:, p:q], start_pos=p, cache=cache))
        p = q
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("prompt_len", [C - 1, C, C + 1, 3 * C + 5, 4 * C])
@pytest.mark.parametrize("slice_len", [7, C, 2 * C, 1000])
def test_cached_equals_uncached(model, prompt_len, slice_len):
    """Prompts ending inside, exactly at and just after a chunk boundary; slices that do and do not
    line up with chunks; then 12 decode steps across the next boundary."""
    ids = torch.randint(0, 512, (2, prompt_len + 12), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids)
        cached = _cached_logits(model, ids, prompt_len, slice_len)
    assert rel_err(cached, full) <= 1e-5


def test_cached_bf16_close(model):
    m = llama4.Llama4(model.config).to(torch.bfloat16)
    m.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 3 * C + 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids).float()
        cache = make_cache(m.config.text, 1, ids.shape[1], torch.bfloat16)
        steps = [m(ids[:, :2 * C + 3], start_pos=0, cache=cache)]
        steps += [m(ids[:, t:t + 1], start_pos=t, cache=cache) for t in range(2 * C + 3, ids.shape[1])]
    assert rel_err(torch.cat(steps, 1).float(), full) <= 3e-2


def test_local_caches_hold_one_chunk_global_caches_everything(model):
    cfg = model.config.text
    T = 8 * C + 5
    ids = torch.randint(0, 512, (1, T))
    cache = make_cache(cfg, 1, T + 4)
    with torch.no_grad():
        model(ids, start_pos=0, cache=cache)
        model(ids[:, :1], start_pos=T, cache=cache)
    kinds = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
    assert True in kinds and False in kinds
    for layer, chunked in enumerate(kinds):
        k = cache.k[layer]
        slots = cache.slot_pos[cache.caps[layer]][0]
        if chunked:
            assert k.shape[2] == C and cache.v[layer].shape[2] == C  # the buffer itself is one chunk
            held = sorted(p for p in slots.tolist() if p >= T - T % C)
            assert held == list(range(T - T % C, T + 1))  # the current chunk, nothing older is visible
        else:
            assert k.shape[2] == T + 4
            assert sorted(p for p in slots.tolist() if p >= 0) == list(range(T + 1))
    assert cache.length(0) == T + 1


def test_per_row_positions_match_each_row_alone(model):
    """Rows at different absolute positions decode in one step, each as if it were alone."""
    cfg = model.config.text
    lens = [C - 1, 2 * C, 5, 3 * C + 1]
    seq = torch.randint(0, 512, (len(lens), max(lens) + 6), generator=torch.Generator().manual_seed(2))
    cache = make_cache(cfg, len(lens), max(lens) + 6)
    got = [[] for _ in lens]
    with torch.no_grad():
        for b, n in enumerate(lens):
            model(seq[b:b + 1, :n], cache=cache, step=cache.plan([(b, n)]))
        for step in range(6):
            pos = torch.tensor([n + step for n in lens])
            logits = model(seq[torch.arange(len(lens)), pos][:, None], start_pos=pos, cache=cache)
            for b in range(len(lens)):
                got[b].append(logits[b, 0])
        for b, n in enumerate(lens):
            alone = model(seq[b:b + 1, :n + 6])[0, n:]
            assert rel_err(torch.stack(got[b]), alone) <= 1e-5, b


def test_removed_rows_cost_nothing_and_do_not_leak(model):
    """A finished row leaves the store without copying anyone's buffer; a new sequence in its slot
    sees none of the old keys."""
    cfg = model.config.text
    seq = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(3))
    cache = make_cache(cfg, 3, 40)
    with torch.no_grad():
        model(seq[:, :30], start_pos=0, cache=cache)
        buffers = [k.data.data_ptr() for k in cache.k]
        cache.remove(1)
        step = cache.plan([(2, 1), (0, 1)])
        got = model(seq[[2, 0], 30:31].reshape(1, 2), cache=cache, step=step)[0]
        assert [k.data.data_ptr() for k in cache.k] == buffers
        alone = model(seq[[2, 0], :31])[:, -1]
        assert rel_err(got, alone) <= 1e-5
        new = cache.add()
        assert new == 1 and cache.length(1) == 0
        fresh = model(seq[1:2, 30:35], cache=cache, step=cache.plan([(1, 5)]))
        assert rel_err(fresh, model(seq[1:2, 30:35])) <= 1e-5


def test_cache_misuse_is_a_clear_error(model):
    cfg = model.config.text
    ids = torch.randint(0, 512, (2, 10))
    cache = make_cache(cfg, 2, 12)
    with torch.no_grad():
        model(ids, start_pos=0, cache=cache)
        with pytest.raises(ValueError, match="expects positions"):
            model(ids[:, :1], start_pos=5, cache=cache)
        with pytest.raises(ValueError, match="KV store full"):
            model(ids[:, :3], start_pos=10, cache=cache)
        with pytest.raises(ValueError, match="packed documents"):
            model(ids[:, :1], cache=cache, doc_pos=torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="appears twice"):
            cache.plan([(0, 1), (0, 1)])
        with pytest.raises(ValueError, match="not in this KV store"):
            cache.plan([(7, 1)])
        with pytest.raises(ValueError, match="per-row positions need a KV cache"):
            model(ids, start_pos=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_len"):
        make_cache(cfg, 1, 0)
    with pytest.raises(ValueError, match="store full: all 2"):
        cache.add()
    long_cache = make_cache(cfg, 1, 3 * C)
    with torch.no_grad():
        model(ids[:1].repeat(1, 5), start_pos=0, cache=long_cache)  # 50 positions: local chunk [32, 64)
    with pytest.raises(ValueError, match="start of chunk 0"):
        long_cache.rollback(0, 30)  # back to 20: chunk [0, 32) is gone
    long_cache.rollback(0, 50)
    assert long_cache.length(0) == 0


@pytest.mark.parametrize("context", [10, C, 5 * C + 3])
def test_kv_cache_bytes_matches_allocation(context):
    """The figure `llama4 inspect` prints is what make_cache really allocates, split by layer kind."""
    cfg = small_text(num_hidden_layers=8)
    cache = make_cache(cfg.text, 1, context, torch.bfloat16)
    by_kind = cache.nbytes_by_kind()
    assert kv_cache_bytes(cfg, context, 2) == {**by_kind, "total": cache.nbytes()}


def test_inspect_scout_10m_split(capsys):
    from llama4.cli import main

    assert main(["inspect", "scout", "--context", "10485760"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kv-cache @"))
    # Scout, bf16: 36 local layers x one 8192-token chunk x 8 kv heads x 128 x (k, v) x 2 bytes = 1.125 GiB;
    # 12 global layers x 10,485,760 tokens x 4 KiB = 480 GiB.
    assert "10,485,760" in line and "local   1.125 GiB" in line and "global     480 GiB" in line


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_lse_attention_equals_fused(causal):
    """The portable path (devices without the CPU kernel) gives the fused kernel's output and lse."""
    from llama4.model.backends import sdpa_lse, sdpa_lse_blocked

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 37, 16, generator=g)
    S = 37 if causal else 100
    k, v = torch.randn(2, 4, S, 16, generator=g), torch.randn(2, 4, S, 16, generator=g)
    out, lse = sdpa_lse(q, k, v, causal)
    for block in (7, 64, 4096):
        out_b, lse_b = sdpa_lse_blocked(q, k, v, causal, block=block)
        assert rel_err(out_b, out) <= 1e-5 and rel_err(lse_b, lse) <= 1e-5


def test_cached_float64_takes_the_portable_path(model):
    """float64 has no fused CPU kernel with log-sum-exps, so this runs `sdpa_lse_blocked` end to end."""
    m = llama4.Llama4(model.config).double()
    m.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 2 * C + 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = make_cache(m.config.text, 1, ids.shape[1], torch.float64)
        got = torch.cat([m(ids[:, :20], cache=cache), m(ids[:, 20:], start_pos=20, cache=cache)], 1)
        assert rel_err(got, m(ids)) <= 1e-5  # the blocked path and RoPE compute in fp32
