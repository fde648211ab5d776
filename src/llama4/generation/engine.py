"""Generation on token ids: chunked prefill into a KV store sized by layer kind, then one token per step.

The engine knows nothing of text except through an optional tokenizer for stop strings. Prompts are
prefilled in slices of `prefill_chunk` tokens, so peak activation memory follows the slice, not the
prompt, and only the last position of each prompt is projected onto the vocabulary.

A batch of prompts of different lengths is one mixed batch per step: every row prefills its next
slice in the same forward (each at its own absolute positions), then all rows decode together, one
token per row per step. A row that stops leaves the store (its slot is freed, nothing is copied), so
it costs nothing afterwards. The decode step performs no host synchronisation and can be compiled
(`compile=True`: `torch.compile(decode_step, fullgraph=True)`); token ids are checked once, here.

Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterator, Sequence

import torch

from ..kv.base import KVStore, Step
from ..kv.contiguous import ContiguousKV
from ..kv.quant import check_kv_dtype
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 2048
# Spare slots of a chat session's chunked layers: a new turn that re-encodes the last few tokens of
# the previous one differently can still reuse the cache across a chunk boundary.
SESSION_ROLLBACK = 64


@torch.inference_mode()
def prefill(model, ids_BT: torch.Tensor, cache: KVStore, start_pos: int = 0,
            prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Feed `ids_BT` (row b continues sequence b of `cache`) at positions [start_pos, start_pos + T),
    `prefill_chunk` tokens at a time; returns the logits of the last position [B, V] (fp32).

    With `pixel_values` the image features are written into the `<|patch|>` slots of the whole prompt
    first (the vision tower runs once), then the embeddings are fed slice by slice."""
    T = ids_BT.shape[1]
    x_BTD = model.embed(ids_BT, pixel_values) if pixel_values is not None else None
    for a in range(0, T, prefill_chunk):
        inputs = dict(input_ids=ids_BT[:, a:a + prefill_chunk]) if x_BTD is None else \
            dict(embeds=x_BTD[:, a:a + prefill_chunk])
        h_BTD = model(**inputs, start_pos=start_pos + a, cache=cache, return_hidden=True)
    return model.output(h_BTD[:, -1]).float()


def prefill_ragged(model, rows: list[list[int]], cache: KVStore, seqs: list[int],
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Prompts of different lengths, one per sequence of `cache`, as mixed batches: each forward
    carries the next `prefill_chunk` tokens of every prompt not yet done. Returns [B, V] (fp32)."""
    device = model.output.weight.device
    done = [0] * len(rows)
    logits: list[torch.Tensor | None] = [None] * len(rows)
    with torch.inference_mode():
        while True:
            todo = [i for i, r in enumerate(rows) if done[i] < len(r)]
            if not todo:
                break
            parts = [rows[i][done[i]:done[i] + prefill_chunk] for i in todo]
            step = cache.plan([(seqs[i], len(p)) for i, p in zip(todo, parts)])
            ids_1N = torch.tensor([sum(parts, [])], device=device)
            h_1ND = model(ids_1N, cache=cache, step=step, return_hidden=True)
            last_GV = model.output(h_1ND[0, step.last_G]).float()
            for j, i in enumerate(todo):
                done[i] += len(parts[j])
                if done[i] == len(rows[i]):
                    logits[i] = last_GV[j]
    return torch.stack(logits)


def decode_step(model, tokens_B: torch.Tensor, step: Step, cache: KVStore) -> torch.Tensor:
    """Logits [B, V] (fp32) after feeding one token per row (a decode `step` from `cache.plan`).
    No host synchronisation: `torch.compile(decode_step, fullgraph=True)` captures it whole."""
    h_1BD = model(tokens_B[None], cache=cache, step=step, return_hidden=True)
    return model.output(h_1BD[0]).float()


_COMPILED: dict[int, object] = {}


def compiled_decode_step(model):
    """`decode_step` compiled once per model (fullgraph, so a stray host sync is an error, not a
    silent graph break)."""
    key = id(model)
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: old graphs hold their model's weights alive
        _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def _as_ids(prompt, vocab: int, where: str) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.ndim != 1:
            raise ValueError(f"{where} must be a 1-D integer tensor or a list of ints, got a tensor of "
                             f"dtype {prompt.dtype} and shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    try:
        ids = [operator.index(i) for i in prompt]
    except TypeError:
        raise ValueError(f"{where} must be a sequence of int token ids, got {prompt!r:.80}") from None
    if not ids:
        raise ValueError(f"{where} is empty: generation needs at least one prompt token")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{where} has token id(s) {bad[:4]} outside the model's vocabulary [0, {vocab})")
    return ids


def _stop_ids(stop_ids, cfg_eos: list[int]) -> set[int]:
    try:
        return {operator.index(i) for i in (cfg_eos if stop_ids is None else stop_ids)}
    except TypeError:
        raise ValueError(f"stop_ids must be a list of int token ids (or None for the config's eos ids), "
                         f"got {stop_ids!r}") from None


class _StopStrings:
    """Stops a row once its generated text contains one of `strings`; decodes only a short tail."""

    def __init__(self, strings: Sequence[str], tokenizer):
        if isinstance(strings, str) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {strings!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (pass tokenizer=...) to turn tokens into text")
        self.strings, self.tokenizer = list(strings), tokenizer
        # Every token is at least one byte, and a character at most four: this many tokens cover any match.
        self.tail = 4 * max(len(s) for s in self.strings) + 1

    def hit(self, generated: list[int]) -> bool:
        text = self.tokenizer.decode(generated[-self.tail:])
        return any(s in text for s in self.strings)


def generate_batch_stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                          temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                          repetition_penalty: float = 1.0, seed: int | None = None, stop_ids=None,
                          stop_strings: Sequence[str] | None = None, tokenizer=None,
                          prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pixel_values: torch.Tensor | None = None,
                          session=None, compile: bool = False,
                          kv_dtype: str | None = None) -> Iterator[tuple[int, int]]:
    """Yields (row, token) as tokens are chosen. A row ends after a stop id (which is yielded), a stop
    string, or `max_new_tokens` tokens; see `generate` for the parameters. Bad arguments raise
    ValueError here, before anything runs."""
    cfg = model.config.text
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    rows = [_as_ids(p, cfg.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an int >= 0")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk!r} is invalid: expected an int >= 1")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64):
        raise ValueError(f"seed={seed!r} is invalid: expected an int in [-2**63, 2**64) (what torch.Generator "
                         f"takes) or None")
    stops = _stop_ids(stop_ids, cfg.eos_token_id)
    stop_text = _StopStrings(stop_strings, tokenizer) if stop_strings else None
    if pixel_values is not None and len(rows) != 1:
        raise ValueError(f"pixel_values are supported for one prompt at a time, got {len(rows)} prompts")
    if session is not None and (len(rows) != 1 or session.model is not model):
        raise ValueError("a ChatSession generates for one prompt of its own model")
    kv_dtype = check_kv_dtype(kv_dtype)
    if session is not None and kv_dtype is not None and kv_dtype != session.cache.kv_dtype:
        raise ValueError(f"kv_dtype={kv_dtype!r} but the ChatSession's store holds {session.cache.kv_dtype or 'auto'}: "
                         f"give the session the kv_dtype (ChatSession(model, n, kv_dtype=...))")
    step_fn = compiled_decode_step(model) if compile else decode_step
    return _run(model, rows, max_new_tokens, params, seed, stops, stop_text, prefill_chunk, pixel_values, session,
                step_fn, kv_dtype)


def _cache_config(model):
    """The text config the KV store is sized by: a tensor-parallel rank keeps only its own kv heads."""
    cfg = model.config.text
    n_kv = getattr(model.layers[0].attention, "n_kv", cfg.num_key_value_heads)
    return cfg if n_kv == cfg.num_key_value_heads else dataclasses.replace(cfg, num_key_value_heads=n_kv)


def _run(model, rows: list[list[int]], max_new_tokens: int, params: SamplingParams, seed: int | None,
         stops: set[int], stop_text: _StopStrings | None, prefill_chunk: int,
         pixel_values: torch.Tensor | None, session, step_fn, kv_dtype: str | None) -> Iterator[tuple[int, int]]:
    if max_new_tokens == 0:
        return
    cfg = model.config.text
    longest = max(len(r) for r in rows)
    weight = model.output.weight
    device = weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if session is not None:  # one prompt; the store may already hold a prefix of it
        cache, seqs = session.cache, [session.seq]
        start = session.resume(rows[0], len(rows[0]) + max_new_tokens, reuse=pixel_values is None)  # 0 with images
        with torch.inference_mode():
            logits_BV = prefill(model, torch.tensor([rows[0][start:]], device=device), cache, start, prefill_chunk,
                                pixel_values)
        session.ids = list(rows[0])
    else:
        cache = ContiguousKV(_cache_config(model), len(rows), longest + max_new_tokens, weight.dtype, device,
                             kv_dtype=kv_dtype)
        seqs = [cache.add() for _ in rows]
        if pixel_values is not None or all(len(r) == longest for r in rows):
            with torch.inference_mode():
                logits_BV = prefill(model, torch.tensor(rows, device=device), cache, 0, prefill_chunk, pixel_values)
        else:
            logits_BV = prefill_ragged(model, rows, cache, seqs, prefill_chunk)
    seen_BV = None
    if params.repetition_penalty != 1.0:
        seen_BV = torch.zeros(len(rows), cfg.vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen_BV[b, r] = True

    live = list(range(len(rows)))  # original row index of each batch row still generating
    generated: list[list[int]] = [[] for _ in rows]
    while True:
        tokens_B = sample(logits_BV, params, generator, seen_BV)
        keep = []
        for i, (row, tok) in enumerate(zip(live, tokens_B.tolist())):  # the engine's edge: one sync a step
            generated[row].append(tok)
            yield row, tok
            done = tok in stops or len(generated[row]) == max_new_tokens or \
                (stop_text is not None and stop_text.hit(generated[row]))
            if not done:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(live):
            for i in set(range(len(live))) - set(keep):
                cache.remove(seqs[live[i]])
            live, tokens_B = [live[i] for i in keep], tokens_B[keep]
            seen_BV = None if seen_BV is None else seen_BV[keep]
        if seen_BV is not None:
            seen_BV[torch.arange(len(live), device=device), tokens_B] = True
        step = cache.plan([(seqs[row], 1) for row in live])
        with torch.inference_mode():
            logits_BV = step_fn(model, tokens_B, step, cache)
        if session is not None:
            session.ids.append(int(tokens_B[0]))


def generate_batch(model, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """New tokens for each prompt (prompts may differ in length); keyword arguments as in `generate`."""
    out: list[list[int]] = [[] for _ in prompts]
    for row, tok in generate_batch_stream(model, prompts, **kwargs):
        out[row].append(tok)
    return out


def generate_stream(model, prompt_ids: Sequence[int], **kwargs) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are chosen; keyword arguments as in `generate`."""
    return (tok for _, tok in generate_batch_stream(model, [prompt_ids], **kwargs))


def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, stop_ids=None,
             repetition_penalty: float = 1.0, stop_strings: Sequence[str] | None = None, tokenizer=None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pixel_values: torch.Tensor | None = None,
             compile: bool = False, kv_dtype: str | None = None) -> list[int]:
    """The new tokens only (a stop id that ended generation is included as the last token).

    temperature 0 = greedy; `seed` makes sampling reproducible; `stop_ids=None` stops on the config's
    eos ids (`<|end_of_text|>`, `<|eom|>`, `<|eot|>`), `[]` never stops early; `stop_strings` (with a
    `tokenizer`) stop once the generated text contains one; `prefill_chunk` bounds prefill memory;
    `pixel_values` are the tiles for the prompt's `<|patch|>` slots (see `llama4.media.prompt`);
    `compile=True` runs the decode step through `torch.compile(fullgraph=True)` (the first call pays
    for the compilation); `kv_dtype="fp8"|"int8"` stores the global layers' keys and values in one
    byte per element (`llama4.kv.quant`; None: the weights' dtype).
    """
    return list(generate_stream(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_ids=stop_ids,
                                repetition_penalty=repetition_penalty, stop_strings=stop_strings,
                                tokenizer=tokenizer, prefill_chunk=prefill_chunk, pixel_values=pixel_values,
                                compile=compile, kv_dtype=kv_dtype))
