"""A conversation whose KV store outlives each call: a prompt that starts with the tokens already
cached (the previous turns) only prefills what is new."""

from __future__ import annotations

from typing import Iterator, Sequence

from ..kv.contiguous import ContiguousKV
from .engine import SESSION_ROLLBACK, generate_batch_stream


class ChatSession:
    """The store holds `ids`; each call keeps the longest prefix it shares with them. Local layers only
    hold their current chunk (plus a few spare slots), so a cut that needs keys they no longer have
    resumes at the start of the chunk the shared prefix ends in, and the rest is prefilled again.
    """

    def __init__(self, model, max_context: int, kv_dtype: str | None = None):
        cfg = model.config.text
        if not isinstance(max_context, int) or not 1 <= max_context <= cfg.max_position_embeddings:
            raise ValueError(f"max_context={max_context!r} is invalid: expected an int in "
                             f"[1, {cfg.max_position_embeddings}] (max_position_embeddings)")
        self.model, self.max_context = model, max_context
        w = model.output.weight
        self.cache = ContiguousKV(cfg, 1, max_context, w.dtype, w.device, rollback=SESSION_ROLLBACK, kv_dtype=kv_dtype)
        self.seq = self.cache.add()
        self.ids: list[int] = []  # the tokens whose keys the store holds, in order
        self.reused = 0  # prompt tokens the last call took from the cache

    def resume(self, prompt: list[int], needed: int, reuse: bool = True) -> int:
        """Cut the store back to what `prompt` can reuse; returns the position prefilling starts at."""
        if needed > self.max_context:
            raise ValueError(f"the conversation needs {needed} positions (prompt + max_new_tokens) but this "
                             f"session holds {self.max_context} (max_context)")
        common = 0
        if reuse:
            limit = min(len(self.ids), len(prompt) - 1)  # at least one token is fed, for its logits
            while common < limit and self.ids[common] == prompt[common]:
                common += 1
        keep = self.cache.reusable(self.seq, common)
        self.cache.rollback(self.seq, self.cache.length(self.seq) - keep)
        self.ids, self.reused = self.ids[:keep], keep
        return keep

    def generate_stream(self, prompt_ids: Sequence[int], **kwargs) -> Iterator[int]:
        """As `generate_stream`, reusing the cached prefix."""
        return (tok for _, tok in generate_batch_stream(self.model, [prompt_ids], session=self, **kwargs))

    def generate(self, prompt_ids: Sequence[int], **kwargs) -> list[int]:
        return list(self.generate_stream(prompt_ids, **kwargs))
