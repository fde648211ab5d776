"""Log-likelihoods: of continuations given contexts (`score`), and of whole documents (`score_rolling`).

`score` is what multiple-choice evaluation needs: log p(continuation | context) and whether greedy
decoding would have produced the continuation. Pairs are batched as mixed steps over one KV store
(`kv.base.Step`: every sequence at its own positions, prefill slices of any length). Where several
continuations share a context, the context is prefilled once and its sequence is forked (`KVStore.fork`)
for each continuation, so a 4-way multiple-choice question costs one context prefill, not four.

`score_rolling` is what perplexity needs: the log-likelihood of every token of a document given all
the tokens before it. Without a window the document is fed through the KV store in slices, so each
token sees the whole past and memory follows the store, not the document's attention matrix. With
`window=N, stride=S` each block of S new tokens is scored by a forward over the N tokens that end just
before its last target, run at its absolute positions (`model(ids, start_pos=p)`), so chunked (local
RoPE) layers keep their chunk boundaries and temperature tuning sees the true positions.

Neither ever builds [tokens, vocab] logits: hidden states go through the output head `logit_chunk`
tokens at a time (the idea of train/loss.py's chunked cross-entropy), in fp32 whatever the weights.

Shape legend: N tokens in a step, G sequences, D model dim, V vocabulary, C tokens per logit chunk.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple, Sequence

import torch

from ..kv.contiguous import ContiguousKV

DEFAULT_BATCH_TOKENS = 2048  # new tokens per forward (bounds activation memory)
DEFAULT_MAX_SEQS = 64  # sequences in one KV store (bounds its memory with the longest pair)
DEFAULT_LOGIT_CHUNK = 256  # tokens projected onto the vocabulary at a time (256 x 202,048 fp32 = 207 MB)


class Score(NamedTuple):
    """log p(continuation | context) (natural log, summed over its tokens) and whether every token of
    the continuation is the argmax of its prediction (greedy decoding would produce it)."""

    logprob: float
    is_greedy: bool


class RollingScore(NamedTuple):
    """Summed log-likelihood of a document's scored tokens (all but the first) and their count."""

    logprob: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.n_tokens) if self.n_tokens else float("nan")


Progress = Callable[[int], None]  # called with the number of tokens just processed


def token_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h_ND: torch.Tensor, targets_N: torch.Tensor,
                   logit_chunk: int = DEFAULT_LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N] fp32, target == argmax [N] bool) from final hidden states, `logit_chunk` at a time."""
    lp, greedy = [], []
    for a in range(0, h_ND.shape[0], logit_chunk):
        logits_CV = head(h_ND[a:a + logit_chunk]).float()
        y_C1 = targets_N[a:a + logit_chunk, None]
        lp.append((logits_CV.gather(1, y_C1) - torch.logsumexp(logits_CV, dim=-1, keepdim=True))[:, 0])
        greedy.append(logits_CV.argmax(dim=-1) == y_C1[:, 0])
    if not lp:
        return h_ND.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=h_ND.device)
    return torch.cat(lp), torch.cat(greedy)


# Scoring continuations --------------------------------------------------------------------------------
def score(model, context_ids, continuation_ids, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
          max_seqs: int = DEFAULT_MAX_SEQS, logit_chunk: int = DEFAULT_LOGIT_CHUNK,
          progress: Progress | None = None) -> Score | list[Score]:
    """log p(continuation | context) and is-greedy, for one pair (two lists of token ids) or for many
    (two equally long lists of lists; a list of `Score`s comes back in the same order).

    Contexts must be non-empty (lm-eval puts a BOS/EOT token there for an empty one) and so must
    continuations; context + continuation must fit the model's max_position_embeddings.
    `batch_tokens` bounds the new tokens of one forward, `max_seqs` the sequences of one KV store."""
    single = _is_ids(context_ids)
    contexts = [context_ids] if single else context_ids
    continuations = [continuation_ids] if single else continuation_ids
    if not single and (not isinstance(contexts, Sequence) or not isinstance(continuations, Sequence)
                       or len(contexts) != len(continuations)):
        raise ValueError("score needs a context and a continuation (lists of token ids), or two equally long lists "
                         f"of them; got {type(contexts).__name__} and {type(continuations).__name__}")
    _check_budget(batch_tokens, max_seqs, logit_chunk)
    cfg = model.config.text
    pairs = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ctx = _ids(ctx, cfg.vocab_size, f"context {i}")
        cont = _ids(cont, cfg.vocab_size, f"continuation {i}")
        if len(ctx) + len(cont) - 1 > cfg.max_position_embeddings:  # the last token is only a target
            raise ValueError(f"pair {i}: context ({len(ctx)} tokens) + continuation ({len(cont)}) - 1 exceeds the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings}); truncate the context's "
                             f"left")
        pairs.append((ctx, cont))
    groups: dict[tuple[int, ...], list[int]] = {}  # context -> the pairs that continue it
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    out: list[Score | None] = [None] * len(pairs)
    for batch in _pack(groups, pairs, batch_tokens, max_seqs):
        for i, s in zip(*_score_batch(model, batch, pairs, batch_tokens, logit_chunk, progress)):
            out[i] = s
    return out[0] if single else out


def _pack(groups: dict, pairs: list, batch_tokens: int, max_seqs: int) -> list[list[tuple[tuple, list[int]]]]:
    """Groups (context, pair indices) packed into batches of at most `max_seqs` continuations and, where
    more than one group, about `batch_tokens` tokens; a context with more continuations is split."""
    pieces = [(ctx, idx[a:a + max_seqs]) for ctx, idx in groups.items() for a in range(0, len(idx), max_seqs)]
    batches, cur, cur_tokens, cur_seqs = [], [], 0, 0
    for ctx, idx in pieces:
        tokens = len(ctx) + sum(len(pairs[i][1]) - 1 for i in idx)
        if cur and (cur_tokens + tokens > batch_tokens or cur_seqs + len(idx) > max_seqs):
            batches.append(cur)
            cur, cur_tokens, cur_seqs = [], 0, 0
        cur.append((ctx, idx))
        cur_tokens, cur_seqs = cur_tokens + tokens, cur_seqs + len(idx)
    return batches + ([cur] if cur else [])


@torch.inference_mode()
def _score_batch(model, batch, pairs, batch_tokens: int, logit_chunk: int, progress) -> tuple[list[int], list[Score]]:
    weight = model.output.weight
    n_seqs = sum(len(idx) for _, idx in batch)
    max_len = max(len(pairs[i][0]) + len(pairs[i][1]) for _, idx in batch for i in idx)
    kv = ContiguousKV(model.config.text, n_seqs, max_len, weight.dtype, weight.device)
    ctx_seqs = [kv.add() for _ in batch]
    # 1. every context once; its last position predicts the first token of each of its continuations
    last_GD = _feed(model, kv, [(s, list(ctx), None) for s, (ctx, _) in zip(ctx_seqs, batch)], batch_tokens,
                    logit_chunk, progress)[1]
    first_lp, first_greedy = [], []
    for g, (_, idx) in enumerate(batch):
        targets = torch.tensor([pairs[i][1][0] for i in idx], device=weight.device)
        lp, greedy = token_logprobs(model.output, last_GD[g].expand(len(idx), -1), targets, logit_chunk)
        first_lp += lp.tolist()
        first_greedy += greedy.tolist()
    # 2. each continuation in a fork of its context's sequence (the last one takes the context's own)
    jobs, order = [], []
    for s, (_, idx) in zip(ctx_seqs, batch):
        for j, i in enumerate(idx):
            cont = pairs[i][1]
            order.append(i)
            if len(cont) > 1:
                seq = s if j == len(idx) - 1 else kv.fork(s)
                jobs.append((seq, cont[:-1], cont[1:]))
            else:
                jobs.append(None)
    sums = iter(_feed(model, kv, [j for j in jobs if j is not None], batch_tokens, logit_chunk, progress)[0])
    scores = []
    for k, job in enumerate(jobs):
        lp, greedy = next(sums) if job is not None else (0.0, True)
        scores.append(Score(first_lp[k] + lp, bool(first_greedy[k] and greedy)))
    return order, scores


def _feed(model, kv: ContiguousKV, jobs: list, step_tokens: int, logit_chunk: int, progress,
          ) -> tuple[list[tuple[float, bool]], torch.Tensor | None]:
    """Feed each job's inputs (seq, inputs, targets or None) into its sequence of `kv`, as mixed steps of
    at most `step_tokens` new tokens (at least one slice per step). Returns per job (summed log p of its
    targets, all greedy), and the final hidden state of each job's last input [G, D]."""
    device = model.output.weight.device
    done = [0] * len(jobs)
    sums = [0.0] * len(jobs)
    greedy = [True] * len(jobs)
    last: list[torch.Tensor | None] = [None] * len(jobs)
    while True:
        segments, budget = [], step_tokens
        for j, (_, inputs, _) in enumerate(jobs):
            n = min(len(inputs) - done[j], budget)  # the first unfinished job always gets >= 1 token
            if n > 0:
                segments.append((j, n))
                budget -= n
        if not segments:
            break
        step = kv.plan([(jobs[j][0], n) for j, n in segments])
        ids_1N = torch.tensor([[t for j, n in segments for t in jobs[j][1][done[j]:done[j] + n]]], device=device)
        h_ND = model(ids_1N, cache=kv, step=step, return_hidden=True)[0]
        rows, targets, owner = [], [], []
        offset = 0
        for j, n in segments:
            if jobs[j][2] is not None:
                rows.append(torch.arange(offset, offset + n, device=device))
                targets += jobs[j][2][done[j]:done[j] + n]
                owner += [j] * n
            offset += n
            done[j] += n
            if done[j] == len(jobs[j][1]):
                last[j] = h_ND[offset - 1]
        if rows:
            lp_N, greedy_N = token_logprobs(model.output, h_ND[torch.cat(rows)], torch.tensor(targets, device=device),
                                            logit_chunk)
            per_job = torch.zeros(len(jobs), dtype=torch.float64, device=device)
            per_job.index_add_(0, torch.tensor(owner, device=device), lp_N.double())
            missed = set(torch.tensor(owner, device=device)[~greedy_N].tolist())
            for j in set(owner):
                sums[j] += float(per_job[j])
                greedy[j] = greedy[j] and j not in missed
        if progress is not None:
            progress(ids_1N.shape[1])
    last_GD = torch.stack(last) if jobs and all(x is not None for x in last) else None
    return list(zip(sums, greedy)), last_GD


# Rolling log-likelihood --------------------------------------------------------------------------------
def score_rolling(model, ids, *, window: int | None = None, stride: int | None = None, relative: bool = False,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seqs: int = DEFAULT_MAX_SEQS,
                  logit_chunk: int = DEFAULT_LOGIT_CHUNK, progress: Progress | None = None
                  ) -> RollingScore | list[RollingScore]:
    """Log-likelihood of every token of a document after its first, given all the tokens before it, for
    one document (a list of ids) or many (a list of lists; a list comes back). Put a BOS token first to
    score the document's own first token.

    * `window=None`: exact, each token sees the whole document (fed through a KV store in slices of
      `batch_tokens`; several short documents share a step).
    * `window=N` (`stride=S`, default N, S <= N): blocks of S targets, each scored by one forward over the
      (at most) N tokens ending just before its last target, at their absolute positions; every token
      then sees at least N - S tokens of context. S = N gives lm-eval's disjoint windows.
    * `relative=True`: each window runs at positions 0 .. N-1 instead, as lm-eval's `hf` backend and vLLM
      run them (every position stays within the trained range; chunk boundaries move with the window)."""
    single = _is_ids(ids)
    docs = [ids] if single else ids
    if not single and not isinstance(docs, Sequence):
        raise ValueError(f"score_rolling needs a list of token ids, or a list of such lists; got {type(docs).__name__}")
    _check_budget(batch_tokens, max_seqs, logit_chunk)
    if window is not None or stride is not None:
        window = _positive(window, "window")
        stride = window if stride is None else _positive(stride, "stride")
        if stride > window:
            raise ValueError(f"stride={stride} is larger than window={window}: tokens between windows would go "
                             f"unscored (expected stride <= window)")
    cfg = model.config.text
    docs = [_ids(d, cfg.vocab_size, f"document {i}", allow_empty=True) for i, d in enumerate(docs)]
    for i, d in enumerate(docs):
        if len(d) - 1 > cfg.max_position_embeddings and window is None:
            raise ValueError(f"document {i} has {len(d)} tokens, more than the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings}) + 1; score it with a window")
    if window is None:
        out = _rolling_cached(model, docs, batch_tokens, max_seqs, logit_chunk, progress)
    else:
        out = [_rolling_windows(model, d, window, stride, relative, logit_chunk, progress) for d in docs]
    return out[0] if single else out


def _rolling_cached(model, docs, batch_tokens, max_seqs, logit_chunk, progress) -> list[RollingScore]:
    weight = model.output.weight
    out = [RollingScore(0.0, 0)] * len(docs)
    todo = sorted((i for i, d in enumerate(docs) if len(d) > 1), key=lambda i: -len(docs[i]))  # similar lengths
    while todo:
        batch = [todo.pop(0)]
        tokens = len(docs[batch[0]])
        while todo and len(batch) < max_seqs and tokens + len(docs[todo[0]]) <= batch_tokens:
            tokens += len(docs[todo[0]])
            batch.append(todo.pop(0))
        with torch.inference_mode():
            kv = ContiguousKV(model.config.text, len(batch), len(docs[batch[0]]) - 1, weight.dtype, weight.device)
            jobs = [(kv.add(), docs[i][:-1], docs[i][1:]) for i in batch]
            sums = _feed(model, kv, jobs, batch_tokens, logit_chunk, progress)[0]
        for i, (lp, _) in zip(batch, sums):
            out[i] = RollingScore(lp, len(docs[i]) - 1)
    return out


@torch.inference_mode()
def _rolling_windows(model, doc: list[int], window: int, stride: int, relative: bool, logit_chunk: int,
                     progress) -> RollingScore:
    device = model.output.weight.device
    total, s = 0.0, 1  # targets [s, e) of doc, predicted from inputs doc[a:e-1]
    while s < len(doc):
        e = min(s + stride, len(doc))
        a = max(0, e - 1 - window)
        ids_1T = torch.tensor([doc[a:e - 1]], device=device)
        h_TD = model(ids_1T, start_pos=0 if relative else a, return_hidden=True)[0]
        lp, _ = token_logprobs(model.output, h_TD[s - 1 - a:], torch.tensor(doc[s:e], device=device), logit_chunk)
        total += float(lp.double().sum())
        if progress is not None:
            progress(e - s)
        s = e
    return RollingScore(total, max(len(doc) - 1, 0))


# Validation ------------------------------------------------------------------------------------------
def _is_ids(x) -> bool:
    """A flat list of ids (one item), as opposed to a list of lists (a batch)."""
    if isinstance(x, torch.Tensor):
        return x.ndim == 1
    return isinstance(x, Sequence) and not isinstance(x, str) and (not x or not isinstance(x[0], (Sequence, torch.Tensor)))


def _ids(x, vocab: int, where: str, allow_empty: bool = False) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.ndim != 1:
            raise ValueError(f"{where} must be a 1-D integer tensor or a list of ints, got a tensor of dtype "
                             f"{x.dtype} and shape {tuple(x.shape)}")
        x = x.tolist()
    if isinstance(x, str) or not isinstance(x, Sequence):
        raise ValueError(f"{where} must be a list of int token ids, got {type(x).__name__}")
    try:
        ids = [operator.index(i) for i in x]
    except TypeError:
        raise ValueError(f"{where} must be a list of int token ids, got {x!r:.80}") from None
    if not ids and not allow_empty:
        raise ValueError(f"{where} is empty (a context needs at least one token, e.g. BOS; a continuation too)")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{where} has token id(s) {bad[:4]} outside the model's vocabulary [0, {vocab})")
    return ids


def _positive(v, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} is invalid: expected an int >= 1")
    return v


def _check_budget(batch_tokens, max_seqs, logit_chunk) -> None:
    for name, v in (("batch_tokens", batch_tokens), ("max_seqs", max_seqs), ("logit_chunk", logit_chunk)):
        _positive(v, name)
