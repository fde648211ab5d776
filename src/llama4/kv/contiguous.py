"""The contiguous KV store: one preallocated buffer per layer, one row per sequence.

A global (NoPE) layer keeps every position: slot = position. A chunked (local RoPE) layer only ever
needs the keys of the chunk its newest query is in, so it holds `chunk + rollback` slots used as a
ring (slot = position mod capacity): that bounded local cache is what makes 10M-token contexts
affordable, and the `rollback` spare slots keep the previous chunk alive for a few positions after a
boundary, so a rejected speculative draft can be rolled back across it.

Every slot remembers the absolute position it holds (`slot_pos`, -1 when empty), one table per
capacity shared by all layers of that kind, so a decode token masks what it may see by position alone:
no lengths are read on the host inside the model.

Shape legend: R rows (sequences the store can hold), K kv heads, S slots, G / B rows in a step,
L tokens of a block, Dh head dim.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import TextConfig
from .base import PrefillGroup, Step
from .quant import KVTensor, check_kv_dtype


class ContiguousKV:
    """Keys and values of every layer for up to `max_seqs` sequences of up to `max_len` positions."""

    def __init__(self, cfg: TextConfig, max_seqs: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rollback: int = 0, kv_dtype: str | None = None):
        for name, v, lo in (("max_seqs", max_seqs, 1), ("max_len", max_len, 1), ("rollback", rollback, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ContiguousKV needs {name} to be an int >= {lo}, got {v!r}")
        self.max_seqs, self.max_len, self.rollback_slots = max_seqs, max_len, rollback
        self.chunks = [cfg.attention_chunk_size if cfg.is_chunked(i) else None for i in range(cfg.num_hidden_layers)]
        self.caps = [min(c + rollback, max_len) if c else max_len for c in self.chunks]
        # kv_dtype (fp8 / int8) is for the global layers, the ones that grow with the context; a chunked
        # layer holds one chunk whatever the context, and keeps the compute dtype.
        self.kv_dtype = check_kv_dtype(kv_dtype)
        shape = (max_seqs, cfg.num_key_value_heads)
        self.k = [KVTensor((*shape, cap, cfg.head_dim), dtype, None if c else self.kv_dtype, device)
                  for c, cap in zip(self.chunks, self.caps)]
        self.v = [KVTensor(k.shape, dtype, k.kv_dtype, device) for k in self.k]
        self.slot_pos = {cap: torch.full((max_seqs, cap), -1, dtype=torch.int64, device=device)
                         for cap in set(self.caps)}
        self.device = torch.device(device)
        self._len = [0] * max_seqs  # positions held
        self._live = [False] * max_seqs

    # Sequences ------------------------------------------------------------------------------------
    def add(self) -> int:
        try:
            row = self._live.index(False)
        except ValueError:
            raise ValueError(f"KV store full: all {self.max_seqs} sequences are in use (remove one first, or "
                             f"allocate the store with a larger max_seqs)") from None
        self._live[row], self._len[row] = True, 0
        for table in self.slot_pos.values():
            table[row] = -1
        return row

    def remove(self, seq: int) -> None:
        self._check_seq(seq)
        self._live[seq] = False

    def fork(self, seq: int) -> int:
        self._check_seq(seq)
        new = self.add()
        for k, v in zip(self.k, self.v):
            k.copy(new, seq)
            v.copy(new, seq)
        for table in self.slot_pos.values():
            table[new] = table[seq]
        self._len[new] = self._len[seq]
        return new

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._len[seq]

    def seqs(self) -> list[int]:
        return [r for r, live in enumerate(self._live) if live]

    def reusable(self, seq: int, n: int) -> int:
        """The longest prefix <= n that `seq` can be cut back to: n itself when every chunked layer
        still holds the keys position n needs, else the start of n's chunk (which needs none)."""
        self._check_seq(seq)
        n = min(n, self._len[seq])
        return n if self._missing_chunk(seq, n) is None else n - n % self._missing_chunk(seq, n)

    def _missing_chunk(self, seq: int, n: int) -> int | None:
        """The chunk size of a layer kind that no longer holds all of positions [chunk start, n)."""
        for chunk, cap in zip(self.chunks, self.caps):
            if chunk is not None and n % chunk:
                want = torch.arange(n - n % chunk, n, device=self.device)
                if not torch.equal(self.slot_pos[cap][seq, want % cap], want):  # host read: edge only
                    return chunk
        return None

    def rollback(self, seq: int, n: int) -> None:
        self._check_seq(seq)
        if not isinstance(n, int) or not 0 <= n <= self._len[seq]:
            raise ValueError(f"rollback of sequence {seq} by {n!r}: expected an int in [0, {self._len[seq]}]")
        keep = self._len[seq] - n
        chunk = self._missing_chunk(seq, keep)
        if chunk is not None:
            raise ValueError(f"cannot roll sequence {seq} back to position {keep}: its chunked layers no longer "
                             f"hold the start of chunk {keep - keep % chunk} (they keep {self.rollback_slots} spare "
                             f"slots; allocate the store with a larger rollback, or resume at a chunk start)")
        self._len[seq] = keep
        for table in self.slot_pos.values():
            table[seq].masked_fill_(table[seq] >= keep, -1)

    def _check_seq(self, seq: int) -> None:
        if not isinstance(seq, int) or not 0 <= seq < self.max_seqs or not self._live[seq]:
            raise ValueError(f"sequence {seq!r} is not in this KV store (live: {self.seqs()})")

    # A step ----------------------------------------------------------------------------------------
    def plan(self, segments: Sequence[tuple[int, int]]) -> Step:
        """Each (seq, n) appends n tokens at the sequence's next positions; tokens are laid out in
        segment order. Checks order and capacity, then advances the bookkeeping."""
        seqs, starts, lengths = [], [], []
        for seq, n in segments:
            self._check_seq(seq)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"a step segment needs at least one token, got {n!r} for sequence {seq}")
            if seq in seqs:
                raise ValueError(f"sequence {seq} appears twice in one step")
            if self._len[seq] + n > self.max_len:
                raise ValueError(f"KV store full: sequence {seq} at position {self._len[seq]} cannot take {n} more "
                                 f"tokens (max_len {self.max_len}; allocate the store with a larger max_len)")
            seqs.append(seq), starts.append(self._len[seq]), lengths.append(n)
        if not seqs:
            raise ValueError("a step needs at least one segment")
        dev = self.device
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        pos_N = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(dev)
        step = Step(seqs, starts, lengths, pos_N, last_G=torch.tensor(offsets[1:], device=dev) - 1)
        single = [i for i, n in enumerate(lengths) if n == 1]
        if single:
            rows = [seqs[i] for i in single]
            step.decode_rows_B = torch.tensor(rows, device=dev)
            step.decode_pos_B = torch.tensor([starts[i] for i in single], device=dev)
            step.decode_all_rows = rows == list(range(self.max_seqs))
            if len(single) < len(seqs):
                step.decode_tokens_B = torch.tensor([offsets[i] for i in single], device=dev)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, n in enumerate(lengths):
            if n > 1:
                groups.setdefault((starts[i], n), []).append(i)
        for (start, n), members in groups.items():
            rows = [seqs[i] for i in members]
            tokens = torch.stack([torch.arange(offsets[i], offsets[i] + n) for i in members]).to(dev)
            step.prefill.append(PrefillGroup(start, n, rows, torch.tensor(rows, device=dev), tokens,
                                             all_rows=rows == list(range(self.max_seqs))))
        for seq, s, n in zip(seqs, starts, lengths):
            self._record(seq, s, n)
        return step

    def _record(self, row: int, start: int, n: int) -> None:
        """Mark the slots that positions [start, start + n) land in (the last `cap` of them)."""
        for cap, table in self.slot_pos.items():
            a = max(start, start + n - cap)
            pos = torch.arange(a, start + n, device=table.device)
            table[row, pos % cap] = pos
        self._len[row] = start + n

    # What attention calls ---------------------------------------------------------------------------
    def chunk_of(self, layer: int) -> int | None:
        return self.chunks[layer]

    def write_block(self, layer: int, rows_G: torch.Tensor, start: int, k_GKLD: torch.Tensor,
                    v_GKLD: torch.Tensor, all_rows: bool = False) -> None:
        cap, L = self.caps[layer], k_GKLD.shape[2]
        skip = max(0, L - cap)  # a ring keeps only the last `cap` positions
        for (a, b), (x, y) in _ring_slices(start + skip, L - skip, cap):
            for buf, new in ((self.k[layer], k_GKLD), (self.v[layer], v_GKLD)):
                src = new[:, :, skip + x:skip + y]
                buf.put((slice(None), slice(None), slice(a, b)) if all_rows else (rows_G, slice(None), slice(a, b)),
                        src)

    def write_tokens(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, k_BKD: torch.Tensor,
                     v_BKD: torch.Tensor) -> None:
        slot_B = pos_B % self.caps[layer]
        self.k[layer].put((rows_B, slice(None), slot_B), k_BKD)
        self.v[layer].put((rows_B, slice(None), slot_B), v_BKD)

    def prefix(self, layer: int, rows_G: torch.Tensor, lo: int, hi: int,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.caps[layer]
        out = []
        for buf in (self.k[layer], self.v[layer]):
            rows = slice(None) if all_rows else rows_G
            parts = [buf.get((rows, slice(None), slice(a, b))) for (a, b), _ in _ring_slices(lo, hi - lo, cap)]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        return out[0], out[1]

    def gather(self, layer: int, rows_B: torch.Tensor,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v, table = self.k[layer], self.v[layer], self.slot_pos[self.caps[layer]]
        if all_rows:
            return k.get(), v.get(), table
        return k.index_select(rows_B), v.index_select(rows_B), table.index_select(0, rows_B)

    def nbytes(self) -> int:
        return sum(k.nbytes() + v.nbytes() for k, v in zip(self.k, self.v))

    def nbytes_by_kind(self) -> dict[str, int]:
        local = sum(k.nbytes() + v.nbytes() for k, v, c in zip(self.k, self.v, self.chunks) if c is not None)
        return {"local": local, "global": self.nbytes() - local}


def _ring_slices(start: int, n: int, cap: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Positions [start, start + n) (n <= cap) as at most two (slot range, offset range) pairs."""
    if n <= 0:
        return [((0, 0), (0, 0))]
    a = start % cap
    first = min(n, cap - a)
    pieces = [((a, a + first), (0, first))]
    if first < n:
        pieces.append(((0, n - first), (first, n)))
    return pieces


def make_cache(cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", rollback: int = 0, kv_dtype: str | None = None) -> ContiguousKV:
    """A store with `batch` sequences already added (ids 0 .. batch-1), for `model(ids_BT, cache=...)`."""
    if not isinstance(batch, int) or not isinstance(max_len, int) or batch < 1 or max_len < 1:
        raise ValueError(f"make_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    kv = ContiguousKV(cfg, batch, max_len, dtype, device, rollback, kv_dtype)
    for _ in range(batch):
        kv.add()
    return kv
