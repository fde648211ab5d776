"""A paged KV store: fixed-size blocks from one pool, block tables per (sequence, layer), prefix caching.

Every layer's keys live in blocks of `block_size` positions taken from one shared pool, so memory
follows the tokens actually held rather than `max_seqs x max_len`. The layer kinds keep their bounds:

- a global (NoPE) layer's table grows by one block every `block_size` positions;
- a chunked (local) layer's table covers only the chunk its newest position is in. When a sequence
  crosses a chunk boundary the old chunk's blocks go back to the pool, so a sequence never holds more
  than `chunk / block_size` blocks in a chunked layer between steps.

Prefix caching: a full block is named by a hash of every token up to its end (and a salt, e.g. the
image bytes of the prompt), because a key depends on the whole causal prefix. Blocks are refcounted;
a finished sequence's named blocks stay in the pool as evictable entries until the space is needed.
A new sequence reuses the longest chain of named blocks its prompt shares; a chunked layer can only
reuse the blocks of the chunk holding the end of that prefix (it never held older ones), so when those
are gone the reuse falls back to the start of that chunk, as in `generation.engine.ChatSession`.

A step runs through `LayerCache` views: `Step.layer_caches()` gathers each row's visible blocks into
contiguous per-row caches that the model's cached attention reads and extends, and `Step.commit()`
copies the new positions back into their blocks. Planning a step allocates every block it needs up
front, so a full pool is reported (`KVFull`) before anything runs and the caller can preempt.

Shape legend: N blocks in the pool, K kv heads, Bs block size, Dh head dim, B rows of a step,
S positions in a gathered view.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..config import TextConfig
from .contiguous import LayerCache


class KVFull(RuntimeError):
    """The pool has no free block for a step: preempt a sequence (or wait) and plan again."""


@dataclass
class _SeqState:
    tables: list[list[int]]  # per layer: block ids; block j holds positions starts[i] + j*Bs ...
    starts: list[int]  # per layer: absolute position of the first block (a chunk start, or 0)
    length: int = 0  # positions whose keys are stored
    tokens: Sequence[int] = ()  # the ids behind those positions (read, never copied), for hashing
    salt: bytes = b""
    hashes: list[bytes] = field(default_factory=list)  # chain hash of full block j, from position 0


@dataclass
class _Plan:
    seq: int
    pos: int  # first new position
    n: int  # new positions
    src: list[tuple[int, list[int]]]  # per layer: (start, blocks) visible before the step
    dst: list[tuple[int, list[int]]]  # per layer: (start, blocks) after it


class PagedKV:
    """Paged keys/values for many sequences of one model; see the module docstring."""

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", prefix_caching: bool = True):
        self.chunks = [cfg.attention_chunk_size if cfg.is_chunked(i) else None for i in range(cfg.num_hidden_layers)]
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: expected an int >= 1")
        bad = {c for c in self.chunks if c is not None and c % block_size}
        if bad:
            raise ValueError(f"block_size {block_size} must divide the attention chunk size {min(bad)}, so that "
                             f"chunk boundaries fall on block boundaries")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} is invalid: expected an int >= 1 (raise --kv-memory)")
        self.block_size, self.num_blocks, self.prefix_caching = block_size, num_blocks, prefix_caching
        self.n_kv, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.k_NKBD = torch.zeros(num_blocks, self.n_kv, block_size, self.head_dim, dtype=dtype, device=device)
        self.v_NKBD = torch.zeros_like(self.k_NKBD)
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.name_of: dict[int, tuple[int, bytes]] = {}  # block -> (layer, chain hash)
        self.named: dict[tuple[int, bytes], int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, oldest first
        self.seqs: dict[int, _SeqState] = {}
        self.next_id = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found

    @staticmethod
    def block_bytes(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (keys and values of one layer)."""
        return 2 * cfg.num_key_value_heads * block_size * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def from_memory(cls, cfg: TextConfig, nbytes: int, block_size: int = 16, **kw) -> "PagedKV":
        """A pool of as many blocks as fit in `nbytes`."""
        per = cls.block_bytes(cfg, block_size, kw.get("dtype", torch.float32))
        if nbytes < per:
            raise ValueError(f"KV memory {nbytes} bytes holds no block of {per} bytes (raise --kv-memory)")
        return cls(cfg, int(nbytes // per), block_size, **kw)

    def blocks_bound(self, total_len: int) -> int:
        """The most blocks one sequence of `total_len` positions can hold at once (during a step that
        crosses a chunk boundary a chunked layer briefly holds its old and its new chunk)."""
        bs = self.block_size
        return sum(math.ceil(total_len / bs) if c is None else 2 * math.ceil(min(c, total_len) / bs)
                   for c in self.chunks)

    # Sequences --------------------------------------------------------------------------------------
    def add(self, tokens: Sequence[int] = (), salt: bytes = b"") -> int:
        """A new empty sequence. `tokens` (a list the caller may keep appending to) names its positions
        for prefix caching; `salt` separates prompts whose equal ids mean different keys (images)."""
        seq, self.next_id = self.next_id, self.next_id + 1
        L = len(self.chunks)
        self.seqs[seq] = _SeqState([[] for _ in range(L)], [0] * L, 0, tokens, salt)
        return seq

    def _state(self, seq: int) -> _SeqState:
        if seq not in self.seqs:
            raise ValueError(f"unknown KV sequence {seq!r} (removed, or never added)")
        return self.seqs[seq]

    def remove(self, seq: int) -> None:
        s = self._state(seq)
        for table in s.tables:
            self._release(table)
        del self.seqs[seq]

    def length(self, seq: int) -> int:
        return self._state(seq).length

    def held(self, seq: int) -> list[list[int]]:
        """Each layer's block ids for `seq` (copies)."""
        return [list(t) for t in self._state(seq).tables]

    def fork(self, seq: int) -> int:
        """A new sequence with the same keys: full blocks are shared, the partial last block copied."""
        s = self._state(seq)
        new = self.add(s.tokens, s.salt)
        t = self.seqs[new]
        t.length, t.starts, t.hashes = s.length, list(s.starts), list(s.hashes)
        for i, table in enumerate(s.tables):
            full = (s.length - s.starts[i]) // self.block_size
            for b in table[:full]:
                self.ref[b] += 1
            t.tables[i] = table[:full]
            if len(table) > full:  # written by both from now on: each needs its own copy
                b = self._alloc()
                if b is None:
                    self.remove(new)
                    raise KVFull("no free block to fork a sequence")
                self.k_NKBD[b], self.v_NKBD[b] = self.k_NKBD[table[full]], self.v_NKBD[table[full]]
                t.tables[i].append(b)
        return new

    def rollback(self, seq: int, n: int) -> None:
        """Forget the last `n` positions (rejected speculative tokens). A chunked layer cannot go back
        before its current chunk unless to that chunk's start."""
        s = self._state(seq)
        if not isinstance(n, int) or not 0 <= n <= s.length:
            raise ValueError(f"rollback by {n!r}: expected an int in [0, {s.length}]")
        new_len = s.length - n
        for i, c in enumerate(self.chunks):
            start = s.starts[i]
            if c is not None and new_len < start and new_len % c:
                raise ValueError(f"cannot roll back to position {new_len}: chunked layer {i} only holds "
                                 f"positions from {start}")
            if new_len < start:
                self._release(s.tables[i])
                s.tables[i], s.starts[i] = [], new_len
                continue
            keep = math.ceil((new_len - start) / self.block_size)
            self._release(s.tables[i][keep:])
            del s.tables[i][keep:]
        s.length = new_len
        del s.hashes[new_len // self.block_size:]
        # A shared block that is no longer full would be written by this sequence: make it private.
        for i, table in enumerate(s.tables):
            if (new_len - s.starts[i]) % self.block_size and table and self.ref[table[-1]] > 1:
                b = self._alloc()
                if b is None:
                    raise KVFull("no free block to roll back into a shared block")
                self.k_NKBD[b], self.v_NKBD[b] = self.k_NKBD[table[-1]], self.v_NKBD[table[-1]]
                self._release([table[-1]])
                table[-1] = b

    # Pool -------------------------------------------------------------------------------------------
    def _alloc(self) -> int | None:
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.named[self.name_of.pop(b)]
        else:
            return None
        self.ref[b] = 1
        return b

    def _release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            assert self.ref[b] >= 0, b
            if self.ref[b] == 0:
                if b in self.name_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def free_blocks(self) -> int:
        """Blocks a step can take: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks()

    def cached_blocks(self) -> int:
        return len(self.named)

    def nbytes(self) -> int:
        return 2 * self.k_NKBD.numel() * self.k_NKBD.element_size()

    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # Prefix cache -----------------------------------------------------------------------------------
    def _chain(self, salt: bytes, tokens: Sequence[int], n_blocks: int, prev: list[bytes]) -> list[bytes]:
        """Chain hashes of blocks [len(prev), n_blocks) given the earlier ones."""
        out, bs = list(prev), self.block_size
        h = out[-1] if out else hashlib.blake2b(b"llama4-kv" + salt, digest_size=16).digest()
        for j in range(len(out), n_blocks):
            ids = np.asarray(tokens[j * bs:(j + 1) * bs], dtype=np.int64).tobytes()
            h = hashlib.blake2b(h + ids, digest_size=16).digest()
            out.append(h)
        return out

    def reuse_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """For an empty sequence, take the cached blocks of the longest named prefix of `tokens` (at
        least one token is left to feed, for its logits). Returns the positions reused."""
        s = self._state(seq)
        if s.length:
            raise ValueError(f"reuse_prefix needs an empty sequence, {seq} holds {s.length} positions")
        self.prefix_queries += len(tokens)
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        hashes = self._chain(s.salt, tokens, (len(tokens) - 1) // bs, [])
        glob = [i for i, c in enumerate(self.chunks) if c is None]
        m = 0
        while m < len(hashes) and all((i, hashes[m]) in self.named for i in glob):
            m += 1
        n = m * bs
        for i, c in enumerate(self.chunks):  # chunked layers need the blocks of the chunk n is in
            if c is not None and any((i, hashes[j]) not in self.named for j in range((n // c) * c // bs, n // bs)):
                n = (n // c) * c
        for i, c in enumerate(self.chunks):
            start = 0 if c is None else (n // c) * c
            s.starts[i] = start
            for j in range(start // bs, n // bs):
                b = self.named[(i, hashes[j])]
                if self.ref[b] == 0:
                    del self.evictable[b]
                self.ref[b] += 1
                s.tables[i].append(b)
        s.length, s.hashes = n, hashes[:n // bs]
        self.prefix_hits += n
        return n

    def _name_full_blocks(self, s: _SeqState) -> None:
        if not self.prefix_caching or len(s.tokens) < s.length:
            return
        bs = self.block_size
        s.hashes = self._chain(s.salt, s.tokens, s.length // bs, s.hashes)
        for i, table in enumerate(s.tables):
            first = s.starts[i] // bs
            for j in range(first, first + len(table)):
                if (j + 1) * bs > s.length:
                    break
                b, key = table[j - first], (i, s.hashes[j])
                if b not in self.name_of and key not in self.named:
                    self.name_of[b], self.named[key] = key, b

    # Steps ------------------------------------------------------------------------------------------
    def plan(self, segments: Sequence[tuple[int, int]]) -> "Step":
        """Reserve blocks for `n` new positions of each (seq, n); raises KVFull (reserving nothing)."""
        plans, taken = [], []
        try:
            for seq, n in segments:
                plans.append(self._plan_one(seq, n, taken))
        except KVFull:
            self._release(taken)
            raise
        return Step(self, plans)

    def _plan_one(self, seq: int, n: int, taken: list[int]) -> _Plan:
        s, bs = self._state(seq), self.block_size
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a step feeds at least one token per sequence, got {n!r} for sequence {seq}")
        pos, end = s.length, s.length + n
        src, dst = [], []
        for i, c in enumerate(self.chunks):
            start, table = s.starts[i], s.tables[i]
            if c is not None and pos % c == 0:
                start, table = pos, []  # a new chunk: nothing before it is visible
            src.append((start, table))
            new_start = start if c is None else max(start, ((end - 1) // c) * c)
            keep = table if new_start == start else []
            need = math.ceil((end - new_start) / bs) - len(keep)
            new = []
            for _ in range(need):
                b = self._alloc()
                if b is None:
                    self._release(new)
                    raise KVFull(f"KV pool full: {self.num_blocks} blocks of {bs} positions in use")
                new.append(b)
            taken += new
            dst.append((new_start, keep + new))
        return _Plan(seq, pos, n, src, dst)


class Step:
    """The reserved blocks of one step; `layer_caches(rows)` for the forward, then `commit(rows, caches)`."""

    def __init__(self, kv: PagedKV, plans: list[_Plan]):
        self.kv, self.plans = kv, plans

    def layer_caches(self, rows: Sequence[int]) -> list[LayerCache]:
        """One `LayerCache` per layer for plans[rows] as a batch: row b holds its visible keys, with
        room for its new positions."""
        kv, bs = self.kv, self.kv.block_size
        plans = [self.plans[r] for r in rows]
        caches = []
        for i, c in enumerate(kv.chunks):
            srcs = [p.src[i] for p in plans]
            held = [p.pos - start for p, (start, _) in zip(plans, srcs)]
            need = max(h + p.n for h, p in zip(held, plans))
            cap = math.ceil((need if c is None else min(c, need)) / bs) * bs
            nb = max(len(t) for _, t in srcs)
            cache = LayerCache(len(plans), kv.n_kv, kv.head_dim, cap, c, kv.k_NKBD.dtype, kv.k_NKBD.device)
            if nb:
                idx_BN = torch.tensor([t + [0] * (nb - len(t)) for _, t in srcs], device=kv.k_NKBD.device)
                for pool, dst in ((kv.k_NKBD, cache.k_BKSD), (kv.v_NKBD, cache.v_BKSD)):
                    dst[:, :, :nb * bs] = pool[idx_BN].permute(0, 2, 1, 3, 4).reshape(len(plans), kv.n_kv, -1,
                                                                                        kv.head_dim)
            cache.start_B = torch.tensor([start for start, _ in srcs], dtype=torch.int64)
            cache.length_B = torch.tensor(held, dtype=torch.int64)
            caches.append(cache)
        return caches

    def commit(self, rows: Sequence[int], caches: list[LayerCache]) -> None:
        """Copy the positions the forward wrote into `caches` back into the planned blocks."""
        kv, bs = self.kv, self.kv.block_size
        plans = [self.plans[r] for r in rows]
        dev = kv.k_NKBD.device
        for i, cache in enumerate(caches):
            if all(p.n == 1 for p in plans):  # decode rows: one scattered write per layer
                slots = [p.pos - p.dst[i][0] for p in plans]
                blk_B = torch.tensor([p.dst[i][1][sl // bs] for p, sl in zip(plans, slots)], device=dev)
                off_B = torch.tensor([sl % bs for sl in slots], device=dev)
                slot_B, rows_B = torch.tensor(slots, device=dev), torch.arange(len(plans), device=dev)
                kv.k_NKBD[blk_B, :, off_B] = cache.k_BKSD[rows_B, :, slot_B]
                kv.v_NKBD[blk_B, :, off_B] = cache.v_BKSD[rows_B, :, slot_B]
                continue
            for b, p in enumerate(plans):
                start, table = p.dst[i]
                end = p.pos + p.n
                first = max(p.pos, start) - start
                j0, j1 = first // bs, math.ceil((end - start) / bs)
                blocks = torch.tensor(table[j0:j1], device=dev)
                for pool, src in ((kv.k_NKBD, cache.k_BKSD), (kv.v_NKBD, cache.v_BKSD)):
                    pool[blocks] = src[b, :, j0 * bs:j1 * bs].reshape(kv.n_kv, j1 - j0, bs, kv.head_dim).transpose(0, 1)
        for b, p in enumerate(plans):
            s = kv.seqs[p.seq]
            for i, cache in enumerate(caches):
                start, table = p.dst[i]
                assert int(cache.start_B[b]) == start and int(cache.start_B[b] + cache.length_B[b]) == p.pos + p.n, \
                    (i, start, p.pos + p.n, cache.start_B[b], cache.length_B[b])
                kv._release([x for x in s.tables[i] if x not in table])  # an old chunk's blocks
                s.tables[i], s.starts[i] = table, start
            s.length = p.pos + p.n
            kv._name_full_blocks(s)

    def abandon(self) -> None:
        """Give back the blocks reserved for a step that will not run."""
        for p in self.plans:
            s = self.kv.seqs.get(p.seq)
            for i, (_, table) in enumerate(p.dst):
                self.kv._release([x for x in table if s is None or x not in s.tables[i]])
