"""Context parallelism (model/context_parallel.py) on gloo CPU processes: prefill and decode across
ranks equal one process (fp32, 1e-5), with shards longer and shorter than a chunk, and every rank
holding only its shard's global KV and at most one chunk of each local layer."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text
from llama4.model.context_parallel import shard_bounds
from llama4.train.distributed import spawn

C = 32  # small_text's attention_chunk_size


def _model():
    # floor_scale 8: the temperature tuning of the global layers varies within these lengths.
    return llama4.Llama4(small_text(floor_scale=8, attn_scale=0.5)).init_weights(std=0.08, seed=0).eval()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n))


def _cp_worker(cases: list[tuple[int, int]]) -> list[dict]:
    import torch.distributed as dist

    from llama4.model.context_parallel import cp_decode, cp_mesh, cp_prefill

    torch.set_num_threads(1)
    model = _model()
    group = cp_mesh()["cp"].get_group()
    out = []
    for T, n_decode in cases:
        ids = _ids(T + n_decode)
        logits, cache = cp_prefill(model, ids[:T], group)
        dec = [cp_decode(model, ids[t], cache, group) for t in range(T, T + n_decode)]
        out.append({"prefill": logits, "decode": torch.stack(dec), "rank": dist.get_rank(),
                    "global_keys": [int(p.numel()) for p, c in zip(cache.pos, _chunks(model)) if c is None],
                    "local_keys": [int(p.numel()) for p, c in zip(cache.pos, _chunks(model)) if c is not None]})
    return out


def _chunks(model):
    return [b.attention.chunk for b in model.layers]


def _check(world: int, cases: list[tuple[int, int]]) -> None:
    results = spawn(_cp_worker, world, cases, timeout_s=120)
    model = _model()
    for i, (T, n_decode) in enumerate(cases):
        ids = _ids(T + n_decode)
        with torch.no_grad():
            ref = model(ids[None])[0]
        bounds = shard_bounds(T, world)
        for r, res in enumerate(r_[i] for r_ in results):
            a, b = bounds[r]
            torch.testing.assert_close(res["prefill"], ref[a:b], rtol=1e-5, atol=1e-5)
            # Decode token t (fed at position t) predicts t + 1: the reference row t.
            torch.testing.assert_close(res["decode"], ref[T:T + n_decode], rtol=1e-5, atol=1e-5)
            owned = b - a + (n_decode if r == world - 1 else 0)  # the last rank stores the new tokens
            assert res["global_keys"] == [owned] * len(res["global_keys"])
            assert all(n <= C for n in res["local_keys"])


def test_two_ranks_equal_one_process():
    # 75 tokens: shards of 38 and 37, a chunk boundary inside each shard, the second shard's first
    # chunk starting on rank 0; 40 tokens: shards of 20 (< one chunk); decode crosses a chunk boundary.
    _check(2, [(75, 6), (40, 30)])


@pytest.mark.slow
def test_four_ranks_shards_shorter_than_a_chunk():
    # shards of 11-12 tokens: a local layer's chunk spans three ranks' shards.
    _check(4, [(47, 20), (130, 5)])


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="at least 4 tokens"):
        shard_bounds(3, 4)
