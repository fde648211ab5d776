"""The KV-store seam: the protocol on the contiguous store, mixed batches, rollback across a chunk
boundary, forks, and the sync-free decode step under torch.compile."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import rel_err, small_text
from llama4.generation import decode_step
from llama4.kv import ContiguousKV, KVStore

C = 32  # small_text's attention_chunk_size

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text(floor_scale=8, attn_scale=0.5)).init_weights(std=0.08, seed=0).eval()


def _seqs(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _alone(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None])[0]


def test_contiguous_store_implements_the_protocol(model):
    kv = ContiguousKV(model.config.text, 2, 64)
    assert isinstance(kv, KVStore)
    assert kv.nbytes() == sum(2 * k.data.numel() * k.data.element_size() for k in kv.k)


def test_mixed_batch_equals_each_sequence_alone(model):
    """One sequence prefills 37 tokens across a chunk boundary while three others decode (one just
    before, one at, one just after a boundary); then another mix with a batched pair of prefills."""
    seqs = _seqs(6, 120, seed=1)
    kv = ContiguousKV(model.config.text, 6, 120)
    ids = [kv.add() for _ in range(6)]
    have = [20, 31, 32, 64, 10, 10]
    with torch.no_grad():
        for s, n in zip(ids, have):
            model(seqs[s, :n][None], cache=kv, step=kv.plan([(s, n)]))
        mixes = [[(0, 37), (1, 1), (2, 1), (3, 1)],  # 20..56 crosses 32; decodes at 31, 32, 64
                 [(4, 30), (5, 30), (1, 1), (0, 1), (3, 6)],  # a group of two prefills, and more
                 [(2, 1), (0, 1), (4, 1), (5, 3)]]
        for mix in mixes:
            step = kv.plan([(ids[s], n) for s, n in mix])
            flat = torch.cat([seqs[s, have[s]:have[s] + n] for s, n in mix])[None]
            got = model(flat, cache=kv, step=step)[0]
            at = 0
            for s, n in mix:
                want = _alone(model, seqs[s, :have[s] + n])[have[s]:]
                assert rel_err(got[at:at + n], want) <= 1e-5, (mix, s)
                at += n
                have[s] += n


def test_rollback_across_a_chunk_boundary_keeps_the_previous_chunk(model):
    """A rejected draft that crossed a chunk boundary is rolled back; decoding then continues as if
    the draft had never been written (the previous chunk's keys survive in the spare slots)."""
    seqs = _seqs(2, 80, seed=2)
    kv = ContiguousKV(model.config.text, 1, 80, rollback=8)
    s = kv.add()
    with torch.no_grad():
        model(seqs[0, :29][None], cache=kv)
        model(seqs[1, 29:35][None], cache=kv)  # a draft of 6 tokens: positions 29..34 cross 32
        kv.rollback(s, 6)
        assert kv.length(s) == 29
        got = torch.cat([model(seqs[0, p:p + 1][None], cache=kv)[0] for p in range(29, 40)])
    assert rel_err(got, _alone(model, seqs[0, :40])[29:]) <= 1e-5
    tight = ContiguousKV(model.config.text, 1, 80, rollback=0)
    t = tight.add()
    with torch.no_grad():
        model(seqs[0, :35][None], cache=tight)
    with pytest.raises(ValueError, match="start of chunk 0"):
        tight.rollback(t, 6)
    with pytest.raises(ValueError, match="expected an int in"):
        tight.rollback(t, 36)


def test_fork_continues_independently(model):
    seqs = _seqs(2, 70, seed=3)
    seqs[1, :40] = seqs[0, :40]  # a shared 40-token prefix, then two continuations
    kv = ContiguousKV(model.config.text, 2, 70)
    a = kv.add()
    with torch.no_grad():
        model(seqs[0, :40][None], cache=kv, step=kv.plan([(a, 40)]))
        b = kv.fork(a)
        assert kv.length(b) == 40
        step = kv.plan([(a, 10), (b, 10)])
        got = model(torch.cat([seqs[0, 40:50], seqs[1, 40:50]])[None], cache=kv, step=step)[0]
    assert rel_err(got[:10], _alone(model, seqs[0, :50])[40:]) <= 1e-5
    assert rel_err(got[10:], _alone(model, seqs[1, :50])[40:]) <= 1e-5


@pytest.mark.parametrize("dense", [True, False])
def test_decode_step_compiles_whole(dense):
    """`torch.compile(decode_step, fullgraph=True)` captures one decode step: no host sync, no graph
    break, inside the model or the store; its logits equal the eager step's."""
    cfg = small_text(moe_layers=[] if dense else None)
    model = llama4.Llama4(cfg).init_weights(std=0.08, seed=4).eval()
    seqs = _seqs(2, 50, seed=4)
    torch._dynamo.reset()
    step_fn = torch.compile(decode_step, fullgraph=True, dynamic=False, backend="eager")
    kv, ref = ContiguousKV(cfg.text, 2, 50), ContiguousKV(cfg.text, 2, 50)
    with torch.inference_mode():
        for store in (kv, ref):
            rows = [store.add(), store.add()]
            model(seqs[:, :30], cache=store)
        for p in range(30, 36):
            tokens = seqs[:, p]
            got = step_fn(model, tokens, kv.plan([(0, 1), (1, 1)]), kv)
            want = decode_step(model, tokens, ref.plan([(0, 1), (1, 1)]), ref)
            assert rel_err(got, want) <= 1e-6
    assert rows == [0, 1]
