"""KV caches sized by layer kind.

A global (NoPE) layer keeps every position. A chunked (local RoPE) layer only ever needs the keys of
the chunk its newest query is in, so its buffer holds at most `chunk` positions and is reset when a
new chunk starts: that is what makes 10M-token contexts affordable.

Shape legend: B batch, K kv heads, S positions held, Dh head dim.
"""

from __future__ import annotations

import torch

from ..config import TextConfig


class LayerCache:
    """Keys/values for one layer; `start` is the absolute position of slot 0, `length` the valid slots."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, capacity: int, chunk: int | None,
                 dtype: torch.dtype, device: torch.device | str):
        self.chunk = chunk
        self.capacity = capacity
        self.k_BKSD = torch.zeros(batch, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v_BKSD = torch.zeros_like(self.k_BKSD)
        self.start = 0
        self.length = 0

    @property
    def end(self) -> int:
        """The absolute position the next write must start at."""
        return self.start + self.length

    def write(self, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, pos: int) -> int:
        """Store keys for positions [pos, pos+T); returns how many earlier positions stay visible."""
        T = k_BKTD.shape[2]
        if pos != self.end:
            raise ValueError(f"cache expects position {self.end} next, got {pos} (tokens must be fed in order)")
        if self.chunk is not None and pos % self.chunk == 0:
            self.start, self.length = pos, 0  # a new chunk: nothing before it is visible any more
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {T} positions exceed its capacity {self.capacity} "
                             f"(allocate the cache with a larger max_len)")
        self.k_BKSD[:, :, self.length:self.length + T] = k_BKTD
        self.v_BKSD[:, :, self.length:self.length + T] = v_BKTD
        prefix = self.length
        self.length += T
        return prefix

    def view(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_BKSD[:, :, :n], self.v_BKSD[:, :, :n]

    def nbytes(self) -> int:
        return 2 * self.k_BKSD.numel() * self.k_BKSD.element_size()


def make_cache(cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> list[LayerCache]:
    """One cache per layer: chunked layers get min(chunk, max_len) slots, global layers max_len."""
    caches = []
    for i in range(cfg.num_hidden_layers):
        chunk = cfg.attention_chunk_size if cfg.is_chunked(i) else None
        capacity = min(chunk, max_len) if chunk else max_len
        caches.append(LayerCache(batch, cfg.num_key_value_heads, cfg.head_dim, capacity, chunk, dtype, device))
    return caches
