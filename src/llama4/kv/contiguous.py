"""KV caches sized by layer kind.

A global (NoPE) layer keeps every position. A chunked (local RoPE) layer only ever needs the keys of
the chunk its newest query is in, so its buffer holds at most `chunk` positions and is reset when a
new chunk starts: that is what makes 10M-token contexts affordable.

Each batch row has its own bookkeeping (`start_B`, `length_B`), so rows of different lengths can
decode side by side, each at its own absolute position. A multi-token block is written for rows that
stand at the same position (a whole batch, or one row through `row`); a single-token step may have
a different position per row.

Shape legend: B batch, K kv heads, S positions held, T new positions, Dh head dim.
"""

from __future__ import annotations

import torch

from ..config import TextConfig


class LayerCache:
    """Keys/values for one layer. Row b's slot 0 holds absolute position `start_B[b]`; `length_B[b]`
    slots are valid. The bookkeeping lives in small CPU tensors so that `row` views share it."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, capacity: int, chunk: int | None,
                 dtype: torch.dtype, device: torch.device | str):
        self.chunk = chunk
        self.capacity = capacity
        self.k_BKSD = torch.zeros(batch, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v_BKSD = torch.zeros_like(self.k_BKSD)
        self.start_B = torch.zeros(batch, dtype=torch.int64)
        self.length_B = torch.zeros(batch, dtype=torch.int64)

    @classmethod
    def _wrap(cls, chunk, capacity, k_BKSD, v_BKSD, start_B, length_B) -> "LayerCache":
        c = cls.__new__(cls)
        c.chunk, c.capacity, c.k_BKSD, c.v_BKSD, c.start_B, c.length_B = chunk, capacity, k_BKSD, v_BKSD, start_B, length_B
        return c

    @property
    def batch(self) -> int:
        return self.k_BKSD.shape[0]

    def next_pos(self) -> list[int]:
        """The absolute position each row's next write must start at."""
        return (self.start_B + self.length_B).tolist()

    def row(self, b: int) -> "LayerCache":
        """A one-row view sharing storage and bookkeeping (writes through it land in this cache)."""
        s = slice(b, b + 1)
        return LayerCache._wrap(self.chunk, self.capacity, self.k_BKSD[s], self.v_BKSD[s], self.start_B[s],
                                self.length_B[s])

    def keep(self, rows: list[int]) -> "LayerCache":
        """A cache holding only `rows` (a copy): finished rows stop costing memory and compute."""
        idx = torch.tensor(rows, dtype=torch.int64)
        dev_idx = idx.to(self.k_BKSD.device)
        return LayerCache._wrap(self.chunk, self.capacity, self.k_BKSD[dev_idx], self.v_BKSD[dev_idx],
                                self.start_B[idx], self.length_B[idx])

    def _check_room(self, pos: int, need: int, row: int | str) -> None:
        if need > self.capacity:
            raise ValueError(f"KV cache full: position {pos} of row {row} needs {need} slots but the cache "
                             f"holds {self.capacity} (allocate the cache with a larger max_len)")

    def write(self, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, pos: int) -> int:
        """Store keys for positions [pos, pos+T) in every row (all rows must stand at `pos`).

        The block must not cross a chunk boundary of a chunked layer. Returns how many earlier
        positions stay visible to it.
        """
        T = k_BKTD.shape[2]
        ends = self.next_pos()
        if any(e != pos for e in ends):
            raise ValueError(f"cache expects positions {ends} next, got {pos} for every row (tokens must be fed "
                             f"in order; rows at different positions advance one token at a time)")
        assert self.chunk is None or pos // self.chunk == (pos + T - 1) // self.chunk, (pos, T, self.chunk)
        if self.chunk is not None and pos % self.chunk == 0:
            self.start_B.fill_(pos)  # a new chunk: nothing before it is visible any more
            self.length_B.zero_()
        prefix = int(self.length_B[0])
        self._check_room(pos, prefix + T, "all")
        self.k_BKSD[:, :, prefix:prefix + T] = k_BKTD
        self.v_BKSD[:, :, prefix:prefix + T] = v_BKTD
        self.length_B += T
        return prefix

    def write_step(self, k_BKD: torch.Tensor, v_BKD: torch.Tensor, pos_B: list[int]) -> list[int]:
        """Store one new position per row, row b at `pos_B[b]`; returns each row's valid length after."""
        for b, (p, e) in enumerate(zip(pos_B, self.next_pos())):
            if p != e:
                raise ValueError(f"cache row {b} expects position {e} next, got {p} (tokens must be fed in order)")
            if self.chunk is not None and p % self.chunk == 0:
                self.start_B[b], self.length_B[b] = p, 0
            self._check_room(p, int(self.length_B[b]) + 1, b)
        slot_B = self.length_B.to(self.k_BKSD.device)
        rows_B = torch.arange(self.batch, device=self.k_BKSD.device)
        self.k_BKSD[rows_B, :, slot_B] = k_BKD
        self.v_BKSD[rows_B, :, slot_B] = v_BKD
        self.length_B += 1
        return self.length_B.tolist()

    def truncate(self, n: int) -> None:
        """Forget positions >= n in every row. A chunked layer no longer has the keys before its current
        chunk, so there `n` may lie before that chunk only if it is a chunk start (nothing is kept then)."""
        for b in range(self.batch):
            start = int(self.start_B[b])
            if n >= start:
                self.length_B[b] = min(int(self.length_B[b]), n - start)
            elif self.chunk is None or n % self.chunk == 0:
                self.start_B[b], self.length_B[b] = n, 0
            else:
                raise ValueError(f"cannot cut a chunked cache back to position {n}: its row {b} only holds "
                                 f"positions from {start} (resume at a chunk start)")

    def view(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_BKSD[:, :, :n], self.v_BKSD[:, :, :n]

    def nbytes(self) -> int:
        return 2 * self.k_BKSD.numel() * self.k_BKSD.element_size()


def make_cache(cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> list[LayerCache]:
    """One cache per layer: chunked layers get min(chunk, max_len) slots, global layers max_len."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"make_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    caches = []
    for i in range(cfg.num_hidden_layers):
        chunk = cfg.attention_chunk_size if cfg.is_chunked(i) else None
        capacity = min(chunk, max_len) if chunk else max_len
        caches.append(LayerCache(batch, cfg.num_key_value_heads, cfg.head_dim, capacity, chunk, dtype, device))
    return caches


def cache_rows(caches: list[LayerCache], b: int) -> list[LayerCache]:
    """Row b of every layer's cache, as views (to prefill one row of a batch on its own)."""
    return [c.row(b) for c in caches]


def keep_rows(caches: list[LayerCache], rows: list[int]) -> list[LayerCache]:
    """Every layer's cache restricted to `rows`, in that order."""
    return [c.keep(rows) for c in caches]
