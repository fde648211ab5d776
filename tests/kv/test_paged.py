"""Paged KV store: logits equal the contiguous cache's across chunk boundaries, chunked layers hold at most
one chunk of blocks, prefix reuse follows the chunk rule, refcounts return every block."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text
from llama4.kv import make_cache
from llama4.kv.paged import KVFull, PagedKV

C, BS = 32, 8  # small_text's chunk; block size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text()).init_weights(std=0.08, seed=0).eval()


def _ids(n, seed=0):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _feed(model, kv, seq, ids, pos):
    """Run `ids` at `pos` through the paged store; logits [T, V]."""
    assert kv.length(seq) == pos
    return model(torch.tensor([ids]), cache=kv, step=kv.plan([(seq, len(ids))]))[0]


@torch.inference_mode()
def test_paged_equals_contiguous_across_chunk_boundaries(model):
    cfg = model.config.text
    ids = _ids(5 * C + 11)
    kv = PagedKV(cfg, 200, block_size=BS)
    seq = kv.add(ids)
    ref_cache = make_cache(cfg, 1, len(ids))  # the contiguous store
    # Prefill slices that start and end off chunk boundaries, then single decode tokens across two boundaries.
    cuts = [0, 20, 20 + C + 5, 3 * C + 1, 4 * C - 3]
    cuts += list(range(cuts[-1] + 1, len(ids) + 1))
    chunked = [i for i, c in enumerate(kv.chunks) if c is not None]
    glob = [i for i, c in enumerate(kv.chunks) if c is None]
    assert chunked and glob
    for a, b in zip(cuts, cuts[1:]):
        got = _feed(model, kv, seq, ids[a:b], a)
        want = model(torch.tensor([ids[a:b]]), cache=ref_cache)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        held = kv.held(seq)
        for i in chunked:  # only the current chunk: positions [chunk start of b-1, b)
            assert len(held[i]) == -(-(b - (b - 1) // C * C) // BS) <= C // BS
        for i in glob:
            assert len(held[i]) == -(-b // BS)
    assert kv.length(seq) == len(ids)
    kv.remove(seq)
    assert kv.used_blocks() == 0 and kv.free_blocks() == kv.num_blocks


@torch.inference_mode()
def test_prefix_reuse_gives_same_logits_and_follows_chunk_rule(model):
    cfg = model.config.text
    shared = _ids(2 * C + 20, seed=1)  # ends 20 positions into the third chunk
    kv = PagedKV(cfg, 200, block_size=BS)
    a = kv.add(shared + [7])
    _feed(model, kv, a, shared + [7], 0)
    kv.remove(a)  # its named blocks stay cached
    assert kv.used_blocks() == 0 and kv.cached_blocks() > 0
    tail = _ids(9, seed=2)
    b_ids = shared + tail
    b = kv.add(b_ids)
    reused = kv.reuse_prefix(b, b_ids)
    assert reused == (len(shared) // BS) * BS  # every full shared block, chunked ones included
    got = _feed(model, kv, b, b_ids[reused:], reused)
    want = model(torch.tensor([b_ids]))[0, reused:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kv.hit_rate() == reused / len(b_ids)
    kv.remove(b)

    # A request that shares only the first two chunks + 4 positions of a sequence that has since moved
    # on to a later chunk: its chunked layers lost those blocks, so reuse falls back to the chunk start.
    kv2 = PagedKV(cfg, 200, block_size=BS)
    long = shared + _ids(C + 5, seed=3)
    s = kv2.add(long)
    _feed(model, kv2, s, long, 0)
    kv2.remove(s)
    n_chunk_blocks = sum(1 for i, c in enumerate(kv2.chunks) if c is not None)
    assert n_chunk_blocks
    other = long[:2 * C + 8] + _ids(3, seed=4)
    o = kv2.add(other)
    assert kv2.reuse_prefix(o, other) == 2 * C
    got = _feed(model, kv2, o, other[2 * C:], 2 * C)
    want = model(torch.tensor([other]))[0, 2 * C:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_full_pool_raises_and_reserves_nothing(model):
    cfg = model.config.text
    kv = PagedKV(cfg, 10, block_size=BS)
    seq = kv.add()
    with pytest.raises(KVFull):
        kv.plan([(seq, 80)])  # global layer: 10 blocks; chunked layers only the last chunk's [64, 80): 2 each
    assert kv.used_blocks() == 0
    kv.plan([(seq, 16)])
    assert kv.used_blocks() == 8


@torch.inference_mode()
def test_fork_and_rollback(model):
    cfg = model.config.text
    ids = _ids(C + 13, seed=5)
    kv = PagedKV(cfg, 100, block_size=BS)
    a = kv.add(ids)
    _feed(model, kv, a, ids[:-3], 0)
    b = kv.fork(a)
    kv.rollback(a, 2)
    got_a = _feed(model, kv, a, ids[-5:], len(ids) - 5)
    got_b = _feed(model, kv, b, ids[-3:], len(ids) - 3)
    want = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(got_a, want[-5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_b, want[-3:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="roll back"):
        kv.rollback(a, len(ids) - 5)  # before the chunked layers' current chunk, not at its start
    kv.remove(a)
    kv.remove(b)
    assert kv.used_blocks() == 0


def test_bad_arguments_are_clear():
    cfg = small_text().text
    with pytest.raises(ValueError, match="must divide the attention chunk size"):
        PagedKV(cfg, 10, block_size=12)
    with pytest.raises(ValueError, match="raise --kv-memory"):
        PagedKV.from_memory(cfg, 100)
    kv = PagedKV(cfg, 10, block_size=BS)
    with pytest.raises(ValueError, match="unknown KV sequence"):
        kv.length(3)
