"""Random initialisation that works on the meta device and on sharded (DTensor) parameters.

Every module's `init_weights(std, generator)` calls these on its own parameters. A meta tensor is
skipped (a checkpoint fills it later). A DTensor draws numbers only for this rank's local shard, from
a generator seeded by (one number drawn from the shared stream, the shard's mesh coordinate): ranks
holding the same shard (replicas) get the same values, different shards get different ones, and no
rank draws the whole tensor. Without sharding the numbers come straight from `generator` (or the
global RNG), always drawn in fp32 so a seed gives the same model in every dtype.
"""

from __future__ import annotations

import torch
from torch import nn

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads shard indices over the seed space


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor | None:
    """The part of `t` this process holds, or None when there is nothing to fill (meta, not in the mesh)."""
    if _is_dtensor(t):
        if t.device_mesh.get_coordinate() is None:
            return None
        t = t.to_local()
    return None if t.is_meta else t


def _shard_generator(t: torch.Tensor, generator: torch.Generator | None) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (), generator=generator))  # same on every rank: a shared stream
    coord, index = t.device_mesh.get_coordinate(), 0
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(f"init: cannot initialise a Partial DTensor (placements {t.placements})")
        if placement.is_shard():
            index = index * t.device_mesh.size(dim) + coord[dim]
    return torch.Generator().manual_seed((seed + index * _MIX) % 2**63)


@torch.no_grad()
def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    local = _local(t)
    if local is None:
        return
    if _is_dtensor(t):
        generator = _shard_generator(t, generator)
    gen_device = generator.device.type if generator is not None else local.device.type
    if local.dtype == torch.float32 and local.device.type == gen_device:
        nn.init.normal_(local, 0.0, std, generator=generator)
    else:  # draw where the generator lives, in fp32; one tensor's worth at a time
        draw = torch.empty(local.shape, dtype=torch.float32, device=gen_device)
        local.copy_(nn.init.normal_(draw, 0.0, std, generator=generator))


@torch.no_grad()
def ones_(t: torch.Tensor) -> None:
    local = _local(t)
    if local is not None:
        nn.init.ones_(local)


@torch.no_grad()
def zeros_(t: torch.Tensor) -> None:
    local = _local(t)
    if local is not None:
        nn.init.zeros_(local)


def init_linear(m: nn.Linear | nn.Embedding, std: float, generator: torch.Generator | None = None) -> None:
    normal_(m.weight, std, generator)
    if getattr(m, "bias", None) is not None:
        zeros_(m.bias)


def init_layernorm(m: nn.Module) -> None:
    """Unit weight, zero bias (RMSNorm has only the weight)."""
    ones_(m.weight)
    if getattr(m, "bias", None) is not None:
        zeros_(m.bias)
