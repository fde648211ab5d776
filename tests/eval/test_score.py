"""The scoring API against the model's own full logits (fp32, log_softmax of one plain forward)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llama4
from llama4.eval import score as sc
from conftest import small_text


@pytest.fixture(scope="module")
def model(one_thread):
    # chunk 8: contexts and windows cross several local-attention chunk boundaries
    return llama4.Llama4(small_text(attention_chunk_size=8, vocab_size=160)).init_weights(std=0.08, seed=1).eval()


def full_logprobs(model, ids, start_pos=0):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), start_pos=start_pos).float()[0], -1)


def reference(model, ctx, cont):
    lp_TV = full_logprobs(model, ctx + cont)[len(ctx) - 1:-1]
    y = torch.tensor(cont)
    return float(lp_TV.gather(1, y[:, None]).sum()), bool((lp_TV.argmax(-1) == y).all())


def test_one_pair_and_batches_match_full_logits(model):
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()
    shared = rand(19)
    contexts = [shared, shared, shared, rand(5), [7], rand(30), shared]
    continuations = [rand(4), rand(1), rand(9), rand(3), rand(6), rand(2), rand(12)]
    want = [reference(model, c, x) for c, x in zip(contexts, continuations)]
    one = sc.score(model, contexts[0], continuations[0])
    assert isinstance(one, sc.Score) and one.logprob == pytest.approx(want[0][0], abs=1e-4)
    # small budgets force several batches, split context groups and sliced prefills
    for kw in ({}, dict(batch_tokens=7, max_seqs=2, logit_chunk=3)):
        got = sc.score(model, contexts, continuations, **kw)
        for (lp, greedy), s in zip(want, got):
            assert s.logprob == pytest.approx(lp, abs=1e-4)
            assert s.is_greedy == greedy


def test_greedy_continuation_is_greedy(model):
    ctx = [5, 9, 11, 4]
    cont = llama4.generate(model, ctx, max_new_tokens=5, stop_ids=[])
    s = sc.score(model, ctx, cont)
    assert s.is_greedy and s.logprob == pytest.approx(reference(model, ctx, cont)[0], abs=1e-4)
    assert not sc.score(model, ctx, cont[:-1] + [(cont[-1] + 1) % 96]).is_greedy


def test_context_prefill_is_shared(model, monkeypatch):
    """Four continuations of one context: the context is fed once, then forked."""
    fed, forks = [], []
    real_plan, real_fork = llama4.kv.ContiguousKV.plan, llama4.kv.ContiguousKV.fork
    monkeypatch.setattr(llama4.kv.ContiguousKV, "plan", lambda self, segs: fed.append(sum(n for _, n in segs))
                        or real_plan(self, segs))
    monkeypatch.setattr(llama4.kv.ContiguousKV, "fork", lambda self, s: forks.append(s) or real_fork(self, s))
    sc.score(model, [list(range(3, 43))] * 4, [[5, 6, 7]] * 4)
    assert sum(fed) == 40 + 4 * 2 and len(forks) == 3


def test_rolling_matches_full_logits(model):
    doc = torch.randint(3, 96, (57,), generator=torch.Generator().manual_seed(2)).tolist()
    lp_TV = full_logprobs(model, doc)
    want = float(lp_TV[:-1].gather(1, torch.tensor(doc[1:])[:, None]).sum())
    for kw in ({}, dict(batch_tokens=10, logit_chunk=4), dict(window=100), dict(window=56)):
        r = sc.score_rolling(model, doc, **kw)
        assert r.n_tokens == 56 and r.logprob == pytest.approx(want, abs=1e-4), kw
    assert r.perplexity == pytest.approx(math.exp(-want / 56), rel=1e-4)
    # several documents share steps; an empty or one-token document scores nothing
    many = sc.score_rolling(model, [doc, doc[:20], [4], []], batch_tokens=64)
    assert many[0].logprob == pytest.approx(want, abs=1e-4)
    assert many[1].logprob == pytest.approx(float(full_logprobs(model, doc[:20])[:-1].gather(
        1, torch.tensor(doc[1:20])[:, None]).sum()), abs=1e-4)
    assert many[2] == (0.0, 0) and many[3] == (0.0, 0)


def test_rolling_windows_at_absolute_positions(model):
    doc = torch.randint(3, 96, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    window, stride = 16, 6
    want, s = 0.0, 1
    while s < len(doc):  # each block of `stride` targets from the `window` inputs before its last target
        e = min(s + stride, len(doc))
        a = max(0, e - 1 - window)
        lp_TV = full_logprobs(model, doc[a:e - 1], start_pos=a)
        want += float(lp_TV[s - 1 - a:].gather(1, torch.tensor(doc[s:e])[:, None]).sum())
        s = e
    r = sc.score_rolling(model, doc, window=window, stride=stride, logit_chunk=5)
    assert r.n_tokens == 49 and r.logprob == pytest.approx(want, abs=1e-4)
    # relative=True: every window at positions 0.. (lm-eval's hf backend)
    want_rel, s = 0.0, 1
    while s < len(doc):
        e = min(s + stride, len(doc))
        a = max(0, e - 1 - window)
        want_rel += float(full_logprobs(model, doc[a:e - 1])[s - 1 - a:].gather(1, torch.tensor(doc[s:e])[:, None]).sum())
        s = e
    rel = sc.score_rolling(model, doc, window=window, stride=stride, relative=True)
    assert rel.logprob == pytest.approx(want_rel, abs=1e-4) and abs(rel.logprob - want) > 1e-3
    # at position 0 instead, the chunked layers' boundaries move: a different (wrong) figure
    shifted = full_logprobs(model, doc[33:49])[-6:].gather(1, torch.tensor(doc[44:50])[:, None]).sum()
    at_pos = full_logprobs(model, doc[33:49], start_pos=33)[-6:].gather(1, torch.tensor(doc[44:50])[:, None]).sum()
    assert abs(float(shifted - at_pos)) > 1e-3


def test_bad_input(model):
    with pytest.raises(ValueError, match="context 0 is empty"):
        sc.score(model, [], [3])
    with pytest.raises(ValueError, match=r"continuation 1 has token id\(s\) \[500\]"):
        sc.score(model, [[3], [4]], [[5], [500]])
    with pytest.raises(ValueError, match="equally long"):
        sc.score(model, [[3], [4]], [[5]])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sc.score(model, [3] * 4090, [4] * 8)
    with pytest.raises(ValueError, match="stride=9 is larger than window=8"):
        sc.score_rolling(model, [3, 4, 5], window=8, stride=9)
    with pytest.raises(ValueError, match="batch_tokens=0"):
        sc.score_rolling(model, [3, 4, 5], batch_tokens=0)


class WidestLogits(TorchDispatchMode):
    """Records the most rows of any op output that is a [..., V] tensor (V = the vocabulary)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_never_builds_tokens_by_vocab(model):
    doc = torch.randint(3, 96, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    for kw in ({}, dict(window=64, stride=32)):
        with WidestLogits(160) as probe:
            sc.score_rolling(model, doc, logit_chunk=16, batch_tokens=64, **kw)
        assert 0 < probe.rows <= 16, kw
    with WidestLogits(160) as probe:
        sc.score(model, [doc[:200]] * 3, [doc[200:300], doc[200:260], doc[300:400]], logit_chunk=16, batch_tokens=64)
    assert 0 < probe.rows <= 16
