"""The KV-store seam: what attention needs from a cache, and the metadata of one mixed-batch step.

A store holds keys and values of every layer for a set of sequences, each named by an id. A step
(`Step`) is one forward over several sequences at once: each contributes a *segment* of new tokens
at its own absolute positions, a prefill slice of any length or a single decode token. The store
builds the step on the host (`plan`), which is where positions are checked and bookkeeping is
updated; inside the model only tensor operations run, so a decode step can be compiled.

Attention asks the store for three things (see `KVStore`):
  * `write_block` / `write_tokens`: store new keys at (sequence, absolute position);
  * `prefix`: the keys of positions [lo, hi) of some sequences (a prefill block's visible past);
  * `gather`: everything some sequences hold, with each slot's absolute position (-1 = empty), so a
    decode token can mask by position without the host knowing any lengths.
A chunked (local) layer keeps only its current chunk, plus `rollback` spare slots so that a rejected
speculative draft can be rolled back across a chunk boundary without losing the previous chunk.

Shape legend: N tokens in the step, G sequences in a group, B decode tokens, K kv heads,
S slots, L tokens of a segment, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass
class PrefillGroup:
    """Segments of several sequences that share their start position and length (batched together)."""

    start: int  # absolute position of the first token
    length: int
    seqs: list[int]
    rows_G: torch.Tensor  # the store's rows for `seqs`
    tokens_GL: torch.Tensor  # indices of the group's tokens in the step's flat token list
    all_rows: bool = False  # rows_G is every row of the store, in order (no gather needed)


@dataclass
class Step:
    """One forward's worth of new tokens, flattened in segment order (N tokens in all).

    Host fields (`seqs`, `starts`, `lengths`, `prefill`) are read only by eager code; the decode
    fields are tensors, so a compiled decode step never reads a Python list.
    """

    seqs: list[int]
    starts: list[int]
    lengths: list[int]
    pos_N: torch.Tensor  # absolute position of every token
    prefill: list[PrefillGroup] = field(default_factory=list)
    # Single-token segments, attended together by masking on slot positions.
    decode_tokens_B: torch.Tensor | None = None  # their indices in the flat list (None: all N tokens)
    decode_rows_B: torch.Tensor | None = None
    decode_pos_B: torch.Tensor | None = None
    decode_all_rows: bool = False  # the decode rows are every row of the store, in order
    last_G: torch.Tensor | None = None  # index of each segment's last token (for its next-token logits)

    @property
    def n_tokens(self) -> int:
        return int(self.pos_N.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every segment is one token: the compiled path."""
        return not self.prefill


@runtime_checkable
class KVStore(Protocol):
    """What attention and the engines need from a KV cache (see the module docstring)."""

    def add(self) -> int:
        """A new empty sequence; returns its id."""

    def remove(self, seq: int) -> None:
        """Drop a sequence and give its memory back."""

    def fork(self, seq: int) -> int:
        """A new sequence holding a copy of `seq`'s keys (copy-on-write where the store can)."""

    def rollback(self, seq: int, n: int) -> None:
        """Forget the last `n` positions of `seq`."""

    def length(self, seq: int) -> int:
        """Positions `seq` holds (the absolute position its next token gets)."""

    def plan(self, segments: Sequence[tuple[int, int]]) -> Step:
        """A step where each (seq, n) appends n new tokens to seq; checks capacity and order."""

    def chunk_of(self, layer: int) -> int | None:
        """The layer's attention chunk (None: global)."""

    def write_block(self, layer: int, rows_G: torch.Tensor, start: int, k_GKLD: torch.Tensor,
                    v_GKLD: torch.Tensor, all_rows: bool = False) -> None:
        """Keys of positions [start, start + L) of the rows (after the block has attended)."""

    def write_tokens(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, k_BKD: torch.Tensor,
                     v_BKD: torch.Tensor) -> None:
        """One key per row at absolute positions pos_B (tensors only: the compiled decode path)."""

    def prefix(self, layer: int, rows_G: torch.Tensor, lo: int, hi: int,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [G, K, hi - lo, Dh] of positions [lo, hi)."""

    def gather(self, layer: int, rows_B: torch.Tensor,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_BKSD, v_BKSD, pos_BS): every slot of the rows and the absolute position it holds."""

    def nbytes(self) -> int: ...
