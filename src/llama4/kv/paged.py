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

The store implements `kv.base.KVStore`, so `model(ids_1N, cache=kv, step=kv.plan(...))` runs a mixed
batch straight on the blocks: `plan` reserves every block the step needs (so a full pool is reported
as `KVFull` before anything runs, and the caller can preempt) and precomputes, per layer, the block
and offset of every new key and the padded block table of every decode row; `write_tokens`,
`write_block`, `prefix` and `gather` then only index the pool. A chunked layer that moves to a new
chunk keeps its old chunk's blocks until the step has run (its first prefill piece still reads them);
they return to the pool when the next step is planned. Blocks that became full are named then too.

Shape legend: N blocks in the pool, K kv heads, Bs block size, Dh head dim, B decode rows, G rows
of a prefill group, L tokens each, P prefix positions, M keys written, S slots of a gathered row.
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
from .base import PrefillGroup, Step
from .quant import KVTensor, bytes_per_element, check_kv_dtype


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
                 device: torch.device | str = "cpu", prefix_caching: bool = True, kv_dtype: str | None = None):
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
        # One pool serves every layer kind, so kv_dtype (fp8 / int8) applies to all of its blocks; the
        # chunked layers' share is bounded by chunk / block_size blocks per sequence and layer anyway.
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.k_NKBD = KVTensor((num_blocks, self.n_kv, block_size, self.head_dim), dtype, self.kv_dtype, device)
        self.v_NKBD = KVTensor(self.k_NKBD.shape, dtype, self.kv_dtype, device)
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.name_of: dict[int, tuple[int, bytes]] = {}  # block -> (layer, chain hash)
        self.named: dict[tuple[int, bytes], int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, oldest first
        self.seqs: dict[int, _SeqState] = {}
        self.next_id = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found
        self.touched: list[int] = []  # sequences of the last planned step
        self.pending: list[int] = []  # blocks to release once that step has run (old chunks)
        self.decode = None  # (decode rows, per-layer indices) of the last planned step
        self.groups: dict[int, tuple] = {}  # id(rows_G) -> (plans, per-layer write indices)

    @staticmethod
    def block_bytes(cfg: TextConfig, block_size: int, dtype: torch.dtype, kv_dtype: str | None = None) -> int:
        """Bytes of one block (keys and values of one layer, scales included)."""
        return round(2 * cfg.num_key_value_heads * block_size * cfg.head_dim *
                     bytes_per_element(cfg.head_dim, dtype, kv_dtype))

    @classmethod
    def from_memory(cls, cfg: TextConfig, nbytes: int, block_size: int = 16, **kw) -> "PagedKV":
        """A pool of as many blocks as fit in `nbytes`."""
        per = cls.block_bytes(cfg, block_size, kw.get("dtype", torch.float32), kw.get("kv_dtype"))
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
        self._settle()  # name what the last step wrote, so a finished prompt stays cached
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
        self._settle()
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
                self.k_NKBD.copy(b, table[full])
                self.v_NKBD.copy(b, table[full])
                t.tables[i].append(b)
        return new

    def rollback(self, seq: int, n: int) -> None:
        """Forget the last `n` positions (rejected speculative tokens). A chunked layer cannot go back
        before its current chunk unless to that chunk's start."""
        s = self._state(seq)
        self._settle()
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
                self.k_NKBD.copy(b, table[-1])
                self.v_NKBD.copy(b, table[-1])
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
        return self.k_NKBD.nbytes() + self.v_NKBD.nbytes()

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
        self._settle()
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
    def _settle(self) -> None:
        """After a step has run: name the blocks it filled, release the old chunks it left."""
        for seq in self.touched:
            if seq in self.seqs:
                self._name_full_blocks(self.seqs[seq])
        self.touched = []
        self._release(self.pending)
        self.pending = []

    def chunk_of(self, layer: int) -> int | None:
        return self.chunks[layer]

    def plan(self, segments: Sequence[tuple[int, int]]) -> Step:
        """Reserve blocks for `n` new positions of each (seq, n) and describe the step (tokens laid out in
        segment order); raises KVFull, reserving nothing, when the pool cannot hold it."""
        self._settle()
        plans, taken = [], []
        if len({seq for seq, _ in segments}) < len(segments):
            raise ValueError("a sequence appears twice in one step")
        if not segments:
            raise ValueError("a step needs at least one segment")
        try:
            for seq, n in segments:
                plans.append(self._plan_one(seq, n, taken))
        except KVFull:
            self._release(taken)
            raise
        for p in plans:
            st = self.seqs[p.seq]
            for i, (start, table) in enumerate(p.dst):
                self.pending += [b for b in st.tables[i] if b not in table]
                st.tables[i], st.starts[i] = table, start
            st.length = p.pos + p.n
            self.touched.append(p.seq)
        return self._describe(plans)

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
            keep = list(table) if new_start == start else []
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

    def _describe(self, plans: list[_Plan]) -> Step:
        """The `Step` for `plans`, and the per-layer indices the attention calls below use."""
        dev, bs = self.k_NKBD.data.device, self.block_size
        offsets = [0]
        for p in plans:
            offsets.append(offsets[-1] + p.n)
        pos_N = torch.cat([torch.arange(p.pos, p.pos + p.n) for p in plans]).to(dev)
        step = Step([p.seq for p in plans], [p.pos for p in plans], [p.n for p in plans], pos_N,
                    last_G=torch.tensor(offsets[1:], device=dev) - 1)
        self.decode, self.groups = None, {}
        single = [j for j, p in enumerate(plans) if p.n == 1]
        if single:
            dp = [plans[j] for j in single]
            step.decode_rows_B = torch.tensor([p.seq for p in dp], device=dev)
            step.decode_pos_B = torch.tensor([p.pos for p in dp], device=dev)
            if len(single) < len(plans):
                step.decode_tokens_B = torch.tensor([offsets[j] for j in single], device=dev)
            layers = []
            for i in range(len(self.chunks)):
                nb = max(len(p.dst[i][1]) for p in dp)
                table_BN = [p.dst[i][1] + [0] * (nb - len(p.dst[i][1])) for p in dp]
                slots = [p.pos - p.dst[i][0] for p in dp]
                blk_B = [p.dst[i][1][sl // bs] for p, sl in zip(dp, slots)]
                j_S = torch.arange(nb * bs, device=dev)
                slot_B1 = torch.tensor(slots, device=dev)[:, None]
                start_B1 = torch.tensor([p.dst[i][0] for p in dp], device=dev)[:, None]
                pos_BS = torch.where(j_S <= slot_B1, start_B1 + j_S, -1)  # -1: empty (padding, or not yet written)
                layers.append((torch.tensor(blk_B, device=dev), torch.tensor([sl % bs for sl in slots], device=dev),
                               torch.tensor(table_BN, device=dev), pos_BS))
            self.decode = (step.decode_rows_B, layers)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j, p in enumerate(plans):
            if p.n > 1:
                by_shape.setdefault((p.pos, p.n), []).append(j)
        for (start, n), members in by_shape.items():
            mp = [plans[j] for j in members]
            tokens_GL = torch.stack([torch.arange(offsets[j], offsets[j] + n) for j in members]).to(dev)
            group = PrefillGroup(start, n, [p.seq for p in mp], torch.tensor([p.seq for p in mp], device=dev),
                                 tokens_GL)
            writes = []
            for i in range(len(self.chunks)):
                g_M, l_M, blk_M, off_M = [], [], [], []
                for g, p in enumerate(mp):
                    dst_start, table = p.dst[i]
                    for q in range(max(start, dst_start), start + n):  # earlier chunks' keys are never read
                        g_M.append(g), l_M.append(q - start)
                        blk_M.append(table[(q - dst_start) // bs]), off_M.append((q - dst_start) % bs)
                writes.append(tuple(torch.tensor(x, dtype=torch.int64, device=dev) for x in (g_M, l_M, blk_M, off_M)))
            self.groups[id(group.rows_G)] = (mp, writes)
            step.prefill.append(group)
        return step

    # What attention calls ---------------------------------------------------------------------------
    def _group(self, rows_G: torch.Tensor):
        if id(rows_G) not in self.groups:
            raise ValueError("paged KV: rows of a step that was not planned last (plan each step, then run it)")
        return self.groups[id(rows_G)]

    def _decode_layer(self, rows_B: torch.Tensor, layer: int):
        if self.decode is None or self.decode[0] is not rows_B:
            raise ValueError("paged KV: decode rows of a step that was not planned last (plan, then run)")
        return self.decode[1][layer]

    def write_tokens(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, k_BKD: torch.Tensor,
                     v_BKD: torch.Tensor) -> None:
        blk_B, off_B, _, _ = self._decode_layer(rows_B, layer)
        self.k_NKBD.put((blk_B, slice(None), off_B), k_BKD)
        self.v_NKBD.put((blk_B, slice(None), off_B), v_BKD)

    def gather(self, layer: int, rows_B: torch.Tensor,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, table_BN, pos_BS = self._decode_layer(rows_B, layer)
        B, nb = table_BN.shape
        k_BKSD, v_BKSD = (pool.get(table_BN).permute(0, 2, 1, 3, 4).reshape(B, self.n_kv, nb * self.block_size, -1)
                          for pool in (self.k_NKBD, self.v_NKBD))
        return k_BKSD, v_BKSD, pos_BS

    def write_block(self, layer: int, rows_G: torch.Tensor, start: int, k_GKLD: torch.Tensor,
                    v_GKLD: torch.Tensor, all_rows: bool = False) -> None:
        g_M, l_M, blk_M, off_M = self._group(rows_G)[1][layer]
        self.k_NKBD.put((blk_M, slice(None), off_M), k_GKLD[g_M, :, l_M])
        self.v_NKBD.put((blk_M, slice(None), off_M), v_GKLD[g_M, :, l_M])

    def prefix(self, layer: int, rows_G: torch.Tensor, lo: int, hi: int,
               all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        bs, tables = self.block_size, []
        plans = self._group(rows_G)[0]
        start = plans[0].src[layer][0]  # what the sequences held before this step (equal for a group)
        if lo < start:
            raise ValueError(f"paged KV: positions from {lo} asked of layer {layer}, which holds them from {start}")
        j0, j1 = (lo - start) // bs, math.ceil((hi - start) / bs)
        tbl_GJ = torch.tensor([p.src[layer][1][j0:j1] for p in plans], device=self.k_NKBD.data.device)
        a = lo - start - j0 * bs
        G = len(plans)
        return tuple(pool.get(tbl_GJ).permute(0, 2, 1, 3, 4).reshape(G, self.n_kv, (j1 - j0) * bs, -1)[:, :, a:a + hi - lo]
                     for pool in (self.k_NKBD, self.v_NKBD))
