"""Continuous batching over a paged KV store: requests join and leave between steps.

Each `Scheduler.step()`:

1. drops cancelled requests (their blocks go back to the pool);
2. admits waiting requests while there is room (a running slot and free blocks), reusing any cached
   prefix of their prompt;
3. runs one step: one decode token for every running request whose prompt is done, plus slices of
   at most `prefill_chunk` prompt tokens in all (chunked prefill: a long prompt never stalls the others
   for more than one slice). The oldest unfinished prompt is promised half the budget, the rest goes to
   the prompts with the fewest tokens left, so new short requests get their first token in the next
   step even behind a long prompt. All in one forward (a mixed batch, `kv.base.Step`), each sequence at
   its own positions, straight on the paged blocks;
4. samples each request's next token with its own parameters and its own `torch.Generator`, so a
   seeded request gives the same tokens whoever shares its batch, and retires finished requests.

When the pool cannot hold a step, the most recently admitted request is preempted: its blocks are
freed and it goes back to the front of the queue with every token so far, to be recomputed (its
cached prefix blocks usually survive, so recomputing is cheap).

Shape legend: B decode rows, T prefill tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..kv.paged import KVFull, PagedKV
from .sampling import SamplingParams, sample


@dataclass
class TokenEvent:
    """What a request learns after a step: a new token (or none), and whether it has finished."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation. `on_event` is called from the scheduler's thread after every token and once
    with a `finish_reason`; it must return quickly."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: bool = False  # logprob of every prompt token after the first (completions echo)
    pixel_values: torch.Tensor | None = None
    salt: bytes = b""  # separates prompts whose ids are equal but whose keys differ (images)
    on_event: Callable[[TokenEvent], None] | None = None
    # State, owned by the scheduler.
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # prompt + generated: what the sequence will hold
    generated: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose keys are in the store
    seq: int | None = None
    generator: torch.Generator | None = None
    embeds_TD: torch.Tensor | None = None  # prompt embeddings when there are images (the tower runs once)
    prompt_lp: list[float | None] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    reused: int = 0  # prompt positions taken from the prefix cache
    preemptions: int = 0
    t_arrival: float = 0.0
    t_first: float | None = None
    t_done: float | None = None


class Scheduler:
    """Runs `Request`s on `model` over `kv`; `step()` does one step, `has_work()` says if one is due."""

    def __init__(self, model, kv: PagedKV, *, max_running: int = 64, prefill_chunk: int = 256,
                 tokenizer=None):
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} is invalid: expected an int >= 1")
        if not isinstance(max_running, int) or max_running < 1:
            raise ValueError(f"max_running={max_running!r} is invalid: expected an int >= 1")
        self.model, self.kv, self.tokenizer = model, kv, tokenizer
        self.max_running, self.prefill_chunk = max_running, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.ids = itertools.count()
        self.device = model.output.weight.device
        self.window = model.config.text.max_position_embeddings
        self.steps = self.preempted = self.generated_tokens = self.prompt_tokens = 0

    # Requests ---------------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """ValueError if `req` could never run here (too long for the window or the whole pool)."""
        total = len(req.prompt) + req.max_tokens
        if not req.prompt:
            raise ValueError("the prompt is empty: generation needs at least one prompt token")
        vocab = self.model.config.text.vocab_size
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token id(s) {bad[:4]} outside the model's vocabulary [0, {vocab})")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens={req.max_tokens} is invalid: expected >= 1")
        if total > self.window:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) = {total} exceeds "
                             f"the model's context window ({self.window} tokens)")
        need = self.kv.blocks_bound(total)
        if need > self.kv.num_blocks:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) needs up to {need} "
                             f"KV blocks but the pool has {self.kv.num_blocks} (lower max_tokens or raise --kv-memory)")

    def prepare(self, req: Request) -> Request:
        """Check `req` and reset its state, without queueing it (safe from another thread)."""
        self.check(req)
        req.id = next(self.ids)
        req.tokens, req.generated, req.computed = list(req.prompt), [], 0
        req.t_arrival = time.perf_counter()
        if req.seed is not None or not req.params.greedy:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.seed if req.seed is not None else torch.seed())
        return req

    def add(self, req: Request) -> Request:
        """Queue `req` (checked first); thread-safety is the caller's (see serve.engine)."""
        self.waiting.append(self.prepare(req))
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.seq is not None:
            self.kv.remove(req.seq)
            req.seq = None
        req.finish_reason, req.t_done = reason, time.perf_counter()
        if req in self.running:
            self.running.remove(req)
        if req.on_event is not None:
            req.on_event(TokenEvent(None, finish_reason=reason, error=error))

    def cancel_all(self, reason: str = "cancelled", error: str | None = None) -> None:
        """Finish every request now (shutdown, or an error in a step)."""
        reqs = list(self.running) + list(self.waiting)
        self.waiting.clear()
        for req in reqs:
            self._finish(req, reason, error)

    # One step ---------------------------------------------------------------------------------------
    def step(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        self._admit()
        if not self.running:
            return
        while True:
            decode = [r for r in self.running if len(r.tokens) - r.computed == 1]
            prefills = self._prefill_slices()
            segs = [(r.seq, 1) for r in decode] + [(r.seq, n) for r, n in prefills]
            try:
                plan = self.kv.plan(segs)
                break
            except KVFull:
                self._preempt(self.running[-1])
                if not self.running:
                    return
        self.steps += 1
        with torch.inference_mode():
            logits = self._run(plan, decode, prefills)
        # Plain greedy rows take one argmax together (one call instead of one per request).
        plain = [r for r in logits if r.params.greedy and r.params.repetition_penalty == 1.0]
        chosen = {}
        if plain:
            chosen = dict(zip(plain, torch.stack([logits[r] for r in plain]).argmax(-1).tolist()))
        # First tokens go out before decode tokens: their clients are waiting for the step that matters
        # most to them (TTFT), and the order changes no token (each request samples with its own generator).
        for req in sorted(logits, key=lambda r: r.t_first is not None):
            self._emit(req, logits[req], chosen.get(req))

    def _prefill_slices(self) -> list[tuple[Request, int]]:
        """(request, tokens) to prefill this step, at most `prefill_chunk` tokens in all.

        The oldest unfinished prompt is promised half the budget (or all it still needs), so it always
        progresses; the rest goes to the prompts closest to their first token, fewest tokens left first,
        so a burst of short prompts gets its first tokens in one step even behind a long prompt."""
        todo = [r for r in self.running if len(r.tokens) - r.computed > 1]
        if not todo:
            return []
        left = {r: len(r.tokens) - r.computed for r in todo}
        take = {todo[0]: min(left[todo[0]], max(1, self.prefill_chunk // 2))}
        budget = self.prefill_chunk - take[todo[0]]
        for r in sorted(todo, key=lambda r: left[r]):
            if not budget:
                break
            n = min(budget, left[r] - take.get(r, 0))
            if n:
                take[r] = take.get(r, 0) + n
                budget -= n
        return [(r, take[r]) for r in todo if r in take]  # admission order, so the step is reproducible

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            # Keep room for the first slice; a request that could never fit was refused by check().
            first = min(len(req.tokens), self.prefill_chunk)
            if self.running and self.kv.free_blocks() < self.kv.blocks_bound(first) + len(self.running):
                return
            self.waiting.popleft()
            req.seq = self.kv.add(req.tokens, req.salt)
            if not req.prompt_logprobs:
                req.computed = self.kv.reuse_prefix(req.seq, req.tokens)
                if not req.preemptions:
                    req.reused = req.computed
            if req.pixel_values is not None and req.embeds_TD is None:
                with torch.inference_mode():
                    ids = torch.tensor([req.prompt], device=self.device)
                    req.embeds_TD = self.model.embed(ids, req.pixel_values.to(self.device))[0]
            if not req.preemptions:
                self.prompt_tokens += len(req.prompt)
            self.running.append(req)

    def _preempt(self, req: Request) -> None:
        self.kv.remove(req.seq)
        req.seq, req.computed = None, 0
        req.preemptions += 1
        self.preempted += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _run(self, step, decode: list[Request], prefills: list[tuple[Request, int]]) -> dict[Request, torch.Tensor]:
        """One forward over the decode tokens (one per request) followed by the prefill slices."""
        ids = [r.tokens[-1] for r in decode]
        spans = []  # (request, first position, end position, offset in the step's tokens)
        for r, n in prefills:
            spans.append((r, r.computed, r.computed + n, len(ids)))
            ids += r.tokens[r.computed:r.computed + n]
        ids_1N = torch.tensor([ids], device=self.device)
        if any(r.embeds_TD is not None for r, *_ in spans):
            # Image features for the prompt part of a slice; plain token embeddings for the rest.
            x_ND = self.model.tok_embeddings(ids_1N[0])
            for r, a, b, off in spans:
                hi = min(b, len(r.prompt))
                if r.embeds_TD is not None and a < hi:
                    x_ND[off:off + hi - a] = r.embeds_TD[a:hi]
            inputs = dict(embeds=x_ND[None])
        else:
            inputs = dict(input_ids=ids_1N)
        h_1ND = self.model(**inputs, cache=self.kv, step=step, return_hidden=True)
        # Next-token logits for the decode rows and for the slices that finish their request's tokens.
        want = list(range(len(decode))) + [len(decode) + j for j, (r, a, b, off) in enumerate(spans)
                                            if b == len(r.tokens)]
        logits_GV = self.model.output(h_1ND[0, step.last_G[want]]).float()
        rows = dict(zip(want, range(len(want))))
        out = {r: logits_GV[g] for g, r in enumerate(decode)}
        for r in decode:
            r.computed += 1
        for j, (r, a, b, off) in enumerate(spans):
            r.computed = b
            if r.prompt_logprobs and a < len(r.prompt):
                self._prompt_logprobs(r, a, h_1ND[0, off:off + min(b, len(r.prompt)) - a])
            if b == len(r.tokens):
                out[r] = logits_GV[rows[len(decode) + j]]
        return out

    def _prompt_logprobs(self, req: Request, a: int, h_TD: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (position a's logits score token a+1)."""
        if a == 0:
            req.prompt_lp.append(None)
        lp_TV = torch.log_softmax(self.model.output(h_TD).float(), -1)
        nxt = torch.tensor(req.prompt[a + 1:a + 1 + h_TD.shape[0]], device=self.device)
        req.prompt_lp += lp_TV[torch.arange(len(nxt)), nxt].tolist()

    def _emit(self, req: Request, logits_V: torch.Tensor, tok: int | None = None) -> None:
        if tok is None:
            seen_1V = None
            if req.params.repetition_penalty != 1.0:  # every token of the context so far, as generate does
                seen_1V = torch.zeros(1, logits_V.shape[-1], dtype=torch.bool, device=logits_V.device)
                seen_1V[0, torch.tensor(req.tokens, device=logits_V.device)] = True
            tok = int(sample(logits_V[None], req.params, req.generator, seen_1V)[0])
        lp = top = None
        if req.logprobs is not None:
            lp_V = torch.log_softmax(logits_V, -1)
            lp = float(lp_V[tok])
            if req.logprobs:
                vals, idx = torch.topk(lp_V, min(req.logprobs, lp_V.shape[0]))
                top = list(zip(idx.tolist(), vals.tolist()))
        req.tokens.append(tok)
        req.generated.append(tok)
        self.generated_tokens += 1
        if req.t_first is None:
            req.t_first = time.perf_counter()
        reason = None
        if tok in req.stop_ids or self._stop_string(req):
            reason = "stop"
        elif len(req.generated) >= req.max_tokens:
            reason = "length"
        if req.on_event is not None:
            req.on_event(TokenEvent(tok, lp, top))
        if reason is not None:
            self._finish(req, reason)

    def _stop_string(self, req: Request) -> bool:
        if not req.stop_strings or self.tokenizer is None:
            return False
        # A token is at least one byte and a character at most four: this tail covers any match.
        tail = 4 * max(len(s) for s in req.stop_strings) + 1
        text = self.tokenizer.decode(req.generated[-tail:])
        return any(s in text for s in req.stop_strings)

    # Offline use ------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> list[list[int]]:
        """Run `requests` to completion (no HTTP); the generated tokens of each."""
        for r in requests:
            self.add(r)
        while self.has_work():
            self.step()
        return [r.generated for r in requests]

    def stats(self) -> dict[str, float]:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_blocks_used": self.kv.used_blocks(),
                "kv_blocks_total": self.kv.num_blocks, "prefix_hit_rate": self.kv.hit_rate(),
                "preemptions": self.preempted, "steps": self.steps}
