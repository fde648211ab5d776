"""Context parallelism: one sequence split across the ranks of a group, each holding its shard's KV.

The sequence of T tokens is cut into P contiguous shards (`shard_bounds`), one per rank of the
context-parallel group (a `cp` mesh dim, `cp_mesh`, or any process group). Every rank runs the
whole model on its own tokens only; what crosses ranks is attention's keys and values:

  * global (NoPE) layers, prefill: ring attention. Each rank starts from causal attention over its
    own shard and passes its K/V block around the ring; a block from an earlier rank is attended
    unmasked and merged by log-sum-exp, a later rank's block is skipped. A rank holds two blocks at
    a time, never the whole sequence's KV. (Shards are contiguous, so rank r does r blocks of work:
    the load is not balanced; zig-zag sharding would balance it.)
  * chunked (local RoPE) layers, prefill: a token needs only keys of its own chunk, so a rank needs
    just the keys of [chunk start of its first token, its first token), which live on its
    neighbours; those are sent point to point, nothing else moves.
  * decode (every rank feeds the same new token): each rank attends the token to the keys it holds
    (masked by position), the P partial results are all-gathered and merged by log-sum-exp. The new
    token's keys are stored by the last rank, which owns the sequence's tail.

Each rank's store (`CPCache`) keeps its shard of every global layer and, for the chunked layers,
only the keys of the chunk the newest position is in.

Communication uses torch.distributed point-to-point and all-gather: gloo on CPU processes (tested),
NCCL on GPUs (unverified here: no GPU). `parallelize()`'s TP/EP compose in principle (a cp rank
would hold its kv heads only), but only cp alone is tested.

Shape legend: H query heads, K kv heads, L tokens of this rank's shard, S keys, Dh head dim,
D model dim, V vocab, P ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import backends
from .layers import rope_freqs
from .moe import MoE


def shard_bounds(T: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's shard: contiguous, sizes differing by at most one."""
    if not isinstance(T, int) or T < world:
        raise ValueError(f"context parallel over {world} ranks needs at least {world} tokens, got {T!r}")
    base, extra = divmod(T, world)
    out, a = [], 0
    for r in range(world):
        b = a + base + (r < extra)
        out.append((a, b))
        a = b
    return out


def cp_mesh(world: int | None = None, device_type: str | None = None):
    """A 1-D device mesh named `cp` over the running process group (the scale-out mesh's way of
    naming ranks; `mesh["cp"].get_group()` is what the functions here take)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world or dist.get_world_size()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world,), mesh_dim_names=("cp",))


@dataclass
class CPCache:
    """This rank's keys, values and their absolute positions, per layer ([1, K, S, Dh] and [S])."""

    bounds: list[tuple[int, int]]
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pos: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions of the whole sequence so far

    def nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k in self.k)


def _group_info(group):
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, r: int) -> int:
    return dist.get_global_rank(group, r) if group is not None else r


@torch.no_grad()
def cp_prefill(model, ids_T: torch.Tensor, group=None) -> tuple[torch.Tensor, CPCache]:
    """Prefill the whole prompt `ids_T` (every rank passes the same ids) split across the ranks of
    `group` (default: all). Returns this rank's logits [L, V] for its shard and its `CPCache`."""
    rank, world = _group_info(group)
    T = int(ids_T.shape[-1])
    bounds = shard_bounds(T, world)
    a, b = bounds[rank]
    dev = model.output.weight.device
    pos_L = torch.arange(a, b, device=dev)
    x_1LD = model.embed(ids_T.reshape(1, -1)[:, a:b].to(dev))
    rope = rope_freqs(pos_L, model.inv_freq)
    cache = CPCache(bounds, length=T)
    for block in model.layers:
        attn = block.attention
        q, k, v = (t.transpose(1, 2) for t in attn.project(block.attention_norm(x_1LD), pos_L, rope))
        if attn.chunk is None:
            o_1HLD = _ring_attention(q, k, v, rank, world, bounds, group)
            keep = slice(None)
        else:
            o_1HLD = _local_attention(q, k, v, attn.chunk, rank, world, bounds, group)
            keep = pos_L >= (T - 1) - (T - 1) % attn.chunk  # only the newest chunk is ever read again
        cache.k.append(k[:, :, keep].contiguous())
        cache.v.append(v[:, :, keep].contiguous())
        cache.pos.append(pos_L[keep])
        x_1LD = _finish_block(block, x_1LD, o_1HLD)
    return model.output(model.norm(x_1LD))[0].float(), cache


@torch.no_grad()
def cp_decode(model, token: int | torch.Tensor, cache: CPCache, group=None) -> torch.Tensor:
    """Feed one token (the same on every rank) at position `cache.length`; logits [V] (fp32), equal
    on every rank."""
    rank, world = _group_info(group)
    dev = model.output.weight.device
    p = cache.length
    pos_1 = torch.tensor([p], device=dev)
    x_11D = model.embed(torch.as_tensor(token, device=dev).reshape(1, 1))
    rope = rope_freqs(pos_1, model.inv_freq)
    owner = rank == world - 1
    for i, block in enumerate(model.layers):
        attn = block.attention
        q, k, v = (t.transpose(1, 2) for t in attn.project(block.attention_norm(x_11D), pos_1, rope))
        if owner:
            cache.k[i] = torch.cat([cache.k[i], k], dim=2)
            cache.v[i] = torch.cat([cache.v[i], v], dim=2)
            cache.pos[i] = torch.cat([cache.pos[i], pos_1])
        lo = p - p % attn.chunk if attn.chunk else 0
        if attn.chunk and lo > 0:  # the new chunk starts: drop keys no later token can see
            keep = cache.pos[i] >= lo
            cache.k[i], cache.v[i], cache.pos[i] = cache.k[i][:, :, keep], cache.v[i][:, :, keep], cache.pos[i][keep]
        visible_S = (cache.pos[i] >= lo) & (cache.pos[i] <= p)
        o, lse = _partial(q, cache.k[i], cache.v[i], visible_S)
        o_all = [torch.empty_like(o) for _ in range(world)]
        lse_all = [torch.empty_like(lse) for _ in range(world)]
        dist.all_gather(o_all, o.contiguous(), group=group)
        dist.all_gather(lse_all, lse.contiguous(), group=group)
        x_11D = _finish_block(block, x_11D, _merge(o_all, lse_all).to(q.dtype))
    cache.length = p + 1
    return model.output(model.norm(x_11D))[0, 0].float()


def _finish_block(block, x_1LD, o_1HLD):
    h = x_1LD + block.attention.wo(o_1HLD.transpose(1, 2).reshape(*x_1LD.shape[:2], -1))
    ffn_in = block.ffn_norm(h)
    return h + (block.feed_forward(ffn_in, None) if isinstance(block.feed_forward, MoE) else block.feed_forward(ffn_in))


def _merge(outs, lses):
    """Attention outputs over disjoint key sets, merged by their log-sum-exps (fp32)."""
    lse = torch.stack(lses)  # [P, ...]
    total = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - total).nan_to_num(0.0)  # a part that saw no key has lse -inf: weight 0
    return sum(o.float() * wi.unsqueeze(-1) for o, wi in zip(outs, w))


def _partial(q_1H1D, k_1KSD, v_1KSD, visible_S):
    """One query against some keys: (output [1, H, 1, Dh], lse [1, H, 1]); lse -inf, output 0 when no
    key is visible."""
    rep = q_1H1D.shape[1] // k_1KSD.shape[1]
    k, v = k_1KSD.repeat_interleave(rep, dim=1).float(), v_1KSD.repeat_interleave(rep, dim=1).float()
    s = (q_1H1D.float() @ k.transpose(-1, -2)) * q_1H1D.shape[-1] ** -0.5
    s = s.masked_fill(~visible_S, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) @ v
    return o, lse


def _ring_attention(q, k, v, rank, world, bounds, group):
    """Global causal attention of this shard's queries over every earlier position, one K/V block
    at a time around the ring; merged online by log-sum-exp."""
    o, lse = backends.sdpa_lse(q, k, v, causal=True)
    o = o.float()
    blk_k, blk_v = k.contiguous(), v.contiguous()
    for s in range(1, world):
        src = (rank - s) % world  # whose block arrives at this step
        n = bounds[src][1] - bounds[src][0]
        recv_k = torch.empty(*k.shape[:2], n, k.shape[-1], dtype=k.dtype, device=k.device)
        recv_v = torch.empty_like(recv_k)
        nxt, prv = _peer(group, (rank + 1) % world), _peer(group, (rank - 1) % world)
        reqs = [dist.isend(blk_k, nxt, group=group), dist.isend(blk_v, nxt, group=group),
                dist.irecv(recv_k, prv, group=group), dist.irecv(recv_v, prv, group=group)]
        for r in reqs:
            r.wait()
        blk_k, blk_v = recv_k, recv_v
        if src < rank:  # an earlier shard: every key is visible to every query here
            o2, lse2 = backends.sdpa_lse(q, blk_k, blk_v, causal=False)
            new = torch.logaddexp(lse, lse2)
            o = o * torch.exp(lse - new).unsqueeze(-1) + o2.float() * torch.exp(lse2 - new).unsqueeze(-1)
            lse = new
    return o.to(q.dtype)


def _local_attention(q, k, v, chunk, rank, world, bounds, group):
    """Chunked attention of this shard: the first piece (up to the next chunk boundary) also sees the
    keys of its chunk held by earlier ranks, received point to point; the rest is within the shard."""
    a, b = bounds[rank]
    # Send what each later rank needs of this shard: [its chunk start, its first token) within [a, b).
    reqs = []
    for r in range(rank + 1, world):
        lo, hi = max(a, bounds[r][0] - bounds[r][0] % chunk), min(b, bounds[r][0])
        if lo < hi:
            reqs += [dist.isend(k[:, :, lo - a:hi - a].contiguous(), _peer(group, r), group=group),
                     dist.isend(v[:, :, lo - a:hi - a].contiguous(), _peer(group, r), group=group)]
    need_lo = a - a % chunk
    parts_k, parts_v = [], []
    for r in range(rank):
        lo, hi = max(need_lo, bounds[r][0]), min(a, bounds[r][1])
        if lo < hi:
            pk = torch.empty(*k.shape[:2], hi - lo, k.shape[-1], dtype=k.dtype, device=k.device)
            pv = torch.empty_like(pk)
            reqs += [dist.irecv(pk, _peer(group, r), group=group), dist.irecv(pv, _peer(group, r), group=group)]
            parts_k.append(pk), parts_v.append(pv)
    for r in reqs:
        r.wait()
    kp = torch.cat(parts_k, dim=2) if parts_k else k[:, :, :0]
    vp = torch.cat(parts_v, dim=2) if parts_v else v[:, :, :0]
    n1 = min(b, need_lo + chunk) - a  # tokens up to the next chunk boundary
    first = backends.attend_after_prefix(q[:, :, :n1], kp, vp, k[:, :, :n1], v[:, :, :n1])
    if n1 == b - a:
        return first
    rest = backends.chunked_causal(q[:, :, n1:], k[:, :, n1:], v[:, :, n1:], chunk, a + n1)
    return torch.cat([first, rest], dim=2)
