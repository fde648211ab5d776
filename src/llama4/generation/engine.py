"""Generation on token ids: chunked prefill into caches sized by layer kind, then one token per step.

The engine knows nothing of text except through an optional tokenizer for stop strings. Prompts are
prefilled in slices of `prefill_chunk` tokens, so peak activation memory follows the slice, not the
prompt, and only the last position is projected onto the vocabulary.

A batch of prompts of different lengths keeps each row at its own absolute positions: each row is
prefilled on its own into its row of the batch cache, then all rows decode together, one token per
row per step, with per-row RoPE angles, temperature scales and chunk boundaries. A row that stops is
dropped from the batch (its cache rows are freed), so it costs nothing afterwards.

Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import operator
from typing import Iterator, Sequence

import torch

from ..kv.contiguous import LayerCache, cache_rows, keep_rows, make_cache
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 2048


@torch.inference_mode()
def prefill(model, ids_BT: torch.Tensor, cache: list[LayerCache], start_pos: int = 0,
            prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Feed `ids_BT` at positions [start_pos, start_pos + T) through the cache, `prefill_chunk` tokens
    at a time; returns the logits of the last position [B, V] (fp32).

    With `pixel_values` the image features are written into the `<|patch|>` slots of the whole prompt
    first (the vision tower runs once), then the embeddings are fed slice by slice."""
    T = ids_BT.shape[1]
    x_BTD = model.embed(ids_BT, pixel_values) if pixel_values is not None else None
    for a in range(0, T, prefill_chunk):
        inputs = dict(input_ids=ids_BT[:, a:a + prefill_chunk]) if x_BTD is None else \
            dict(embeds=x_BTD[:, a:a + prefill_chunk])
        h_BTD = model(**inputs, start_pos=start_pos + a, cache=cache, return_hidden=True)
    return model.output(h_BTD[:, -1]).float()


@torch.inference_mode()
def decode_step(model, tokens_B: torch.Tensor, pos_B: list[int], cache: list[LayerCache]) -> torch.Tensor:
    """Logits [B, V] (fp32) after feeding one token per row, row b at absolute position `pos_B[b]`."""
    same = all(p == pos_B[0] for p in pos_B)
    start = pos_B[0] if same else torch.tensor(pos_B, device=tokens_B.device)
    return model(tokens_B[:, None], start_pos=start, cache=cache)[:, -1].float()


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
                          session: ChatSession | None = None) -> Iterator[tuple[int, int]]:
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
    return _run(model, rows, max_new_tokens, params, seed, stops, stop_text, prefill_chunk, pixel_values, session)


def _run(model, rows: list[list[int]], max_new_tokens: int, params: SamplingParams, seed: int | None,
         stops: set[int], stop_text: _StopStrings | None, prefill_chunk: int,
         pixel_values: torch.Tensor | None, session: ChatSession | None) -> Iterator[tuple[int, int]]:
    if max_new_tokens == 0:
        return
    cfg = model.config.text
    longest = max(len(r) for r in rows)
    weight = model.output.weight
    device = weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if session is not None:  # one prompt; the cache may already hold a prefix of it
        cache = session.cache
        start = session.resume(rows[0], longest + max_new_tokens, reuse=pixel_values is None)  # 0 with images
        logits_BV = prefill(model, torch.tensor([rows[0][start:]], device=device), cache, start, prefill_chunk,
                            pixel_values)
        session.ids = list(rows[0])
    elif all(len(r) == longest for r in rows):
        # Prefill: a batch of equal lengths in one pass; otherwise each row on its own into its cache row.
        cache = make_cache(cfg, len(rows), longest + max_new_tokens, weight.dtype, device)
        logits_BV = prefill(model, torch.tensor(rows, device=device), cache, 0, prefill_chunk, pixel_values)
    else:
        cache = make_cache(cfg, len(rows), longest + max_new_tokens, weight.dtype, device)
        logits_BV = torch.cat([prefill(model, torch.tensor([r], device=device), cache_rows(cache, b), 0,
                                       prefill_chunk) for b, r in enumerate(rows)])
    seen_BV = None
    if params.repetition_penalty != 1.0:
        seen_BV = torch.zeros(len(rows), cfg.vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen_BV[b, r] = True

    live = list(range(len(rows)))  # original row index of each batch row still generating
    pos_B = [len(r) for r in rows]
    generated: list[list[int]] = [[] for _ in rows]
    while True:
        tokens_B = sample(logits_BV, params, generator, seen_BV)
        keep = []
        for i, (row, tok) in enumerate(zip(live, tokens_B.tolist())):
            generated[row].append(tok)
            yield row, tok
            done = tok in stops or len(generated[row]) == max_new_tokens or \
                (stop_text is not None and stop_text.hit(generated[row]))
            if not done:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(live):
            cache = keep_rows(cache, keep)
            live, pos_B, tokens_B = [live[i] for i in keep], [pos_B[i] for i in keep], tokens_B[keep]
            seen_BV = None if seen_BV is None else seen_BV[keep]
        if seen_BV is not None:
            seen_BV[torch.arange(len(live), device=device), tokens_B] = True
        logits_BV = decode_step(model, tokens_B, pos_B, cache)
        if session is not None:
            session.ids.append(int(tokens_B[0]))
        pos_B = [p + 1 for p in pos_B]


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
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pixel_values: torch.Tensor | None = None) -> list[int]:
    """The new tokens only (a stop id that ended generation is included as the last token).

    temperature 0 = greedy; `seed` makes sampling reproducible; `stop_ids=None` stops on the config's
    eos ids (`<|end_of_text|>`, `<|eom|>`, `<|eot|>`), `[]` never stops early; `stop_strings` (with a
    `tokenizer`) stop once the generated text contains one; `prefill_chunk` bounds prefill memory;
    `pixel_values` are the tiles for the prompt's `<|patch|>` slots (see `llama4.multimodal`).
    """
    return list(generate_stream(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_ids=stop_ids,
                                repetition_penalty=repetition_penalty, stop_strings=stop_strings,
                                tokenizer=tokenizer, prefill_chunk=prefill_chunk, pixel_values=pixel_values))


class ChatSession:
    """A conversation whose cache outlives each call: a prompt that starts with the tokens already
    cached (the previous turns) only prefills what is new.

    The cache holds `ids`; each call keeps the longest prefix it shares with them. Local layers only
    hold their current chunk, so resuming before that chunk resumes at the start of the chunk the
    shared prefix ends in, and the rest is prefilled again.
    """

    def __init__(self, model, max_context: int):
        cfg = model.config.text
        if not isinstance(max_context, int) or not 1 <= max_context <= cfg.max_position_embeddings:
            raise ValueError(f"max_context={max_context!r} is invalid: expected an int in "
                             f"[1, {cfg.max_position_embeddings}] (max_position_embeddings)")
        self.model, self.max_context = model, max_context
        self.cache = make_cache(cfg, 1, max_context, model.output.weight.dtype, model.output.weight.device)
        self.ids: list[int] = []  # the tokens whose keys the cache holds, in order
        self.reused = 0  # prompt tokens the last call took from the cache

    def resume(self, prompt: list[int], needed: int, reuse: bool = True) -> int:
        """Cut the cache back to what `prompt` can reuse; returns the position prefilling starts at."""
        if needed > self.max_context:
            raise ValueError(f"the conversation needs {needed} positions (prompt + max_new_tokens) but this "
                             f"session holds {self.max_context} (max_context)")
        common = 0
        if reuse:
            limit = min(len(self.ids), len(prompt) - 1)  # at least one token is fed, for its logits
            while common < limit and self.ids[common] == prompt[common]:
                common += 1
        chunk = self.model.config.text.attention_chunk_size
        local_start = max([int(c.start_B[0]) for c in self.cache if c.chunk is not None], default=0)
        keep = common if common >= local_start else common - common % chunk
        for c in self.cache:
            c.truncate(keep)
        self.ids, self.reused = self.ids[:keep], keep
        return keep

    def generate_stream(self, prompt_ids: Sequence[int], **kwargs) -> Iterator[int]:
        """As `generate_stream`, reusing the cached prefix."""
        return (tok for _, tok in generate_batch_stream(self.model, [prompt_ids], session=self, **kwargs))

    def generate(self, prompt_ids: Sequence[int], **kwargs) -> list[int]:
        return list(self.generate_stream(prompt_ids, **kwargs))
