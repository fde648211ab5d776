"""Per-module init: each module fills its own parameters; meta tensors are skipped, and a sharded
(DTensor) parameter draws random numbers only for this rank's shard."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import llama4
from conftest import small_text


def test_init_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = llama4.Llama4(small_text())
    model.init_weights(seed=0)
    assert all(p.is_meta for p in model.parameters())


def test_every_module_initialises_its_own_parameters():
    model = llama4.Llama4(small_text()).init_weights(std=0.05, seed=0)
    again = llama4.Llama4(small_text()).init_weights(std=0.05, seed=0)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name  # a seed gives the same model
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
        else:
            assert 0.03 < float(p.detach().std()) < 0.07, name
    moe = model.layers[1].feed_forward
    assert (moe.expert_bias == 0).all() and (moe.tokens_per_expert == 0).all()
    bf16 = llama4.Llama4(small_text()).to(torch.bfloat16).init_weights(std=0.05, seed=0)
    torch.testing.assert_close(bf16.layers[0].attention.wq.weight.float(), model.layers[0].attention.wq.weight,
                               rtol=1e-2, atol=1e-3)  # drawn in fp32 in every dtype


class Draws(TorchDispatchMode):
    """Counts random numbers drawn and the largest tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.drawn, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("normal_", "normal", "randn", "uniform_"):
            self.drawn += args[0].numel() if args else out.numel()
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_dtensor_init_draws_only_the_local_shard():
    """Rank 1 of a 2-rank mesh (torch's fake process group: one process plays one rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        with torch.device("meta"):
            model = llama4.Llama4(small_text())
        local_numel, sharded = 0, []
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None:  # a Linear without bias
                    continue
                shard = p.shape[0] % 2 == 0 and p.ndim >= 2
                local = torch.full((p.shape[0] // 2, *p.shape[1:]) if shard else p.shape, float("nan"))
                mod._parameters[name] = nn.Parameter(
                    DTensor.from_local(local, mesh, [Shard(0) if shard else Replicate()], run_check=False))
                local_numel += local.numel()
                sharded += [mod._parameters[name]] if shard else []
        model.reset_buffers()
        with Draws() as d:
            model.init_weights(std=0.05, seed=0)
        for name, p in model.named_parameters():
            assert torch.isfinite(p.to_local()).all(), name
        biggest = max(p.numel() for p in model.parameters())
        assert d.drawn <= local_numel + 2 * sum(1 for _ in model.parameters())  # + one seed per parameter
        assert d.largest < biggest  # the whole of the largest (sharded) tensor never exists
        assert all(p.to_local().shape[0] * 2 == p.shape[0] for p in sharded)
    finally:
        dist.destroy_process_group()
