"""Scale-out applied from outside the model, in one ordered place: `parallelize(model, mesh, plan)`.

Order (each step sees what the one before produced):
  1. tensor parallel: attention heads (wq/wk/wv column-wise, wo row-wise) and the dense FFN / shared
     expert (w1/w3 column-wise, w2 row-wise); the router, norms and embeddings stay replicated;
  2. expert parallel: each MoE's routed experts split over the `ep` ranks (`ExpertParallel`);
  3. activation checkpointing: each block wrapped by `checkpoint_wrapper`;
  4. optional `torch.compile` of each block;
  5. FSDP2 `fully_shard`: the experts on their own data-parallel mesh (the dp ranks that hold the same
     experts), then each block, then the root.

The mesh has four named dims, `dp_replicate x dp_shard_mod_ep x ep x tp` (world size = dp_replicate *
dp_shard * tp); expert-parallel ranks are taken from the FSDP shard ranks, as in torchtitan. Flattened
views: `dp_shard` (= dp_shard_mod_ep x ep, FSDP for dense weights), `dp` (every data-parallel rank:
data sharding, loss and expert-count reductions).

Gradients are *summed* over data-parallel ranks, never averaged: each rank divides its loss by the
global number of target tokens, so the sum is the one-process gradient whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TextConfig

MESH_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass(frozen=True)
class Plan:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    compile: bool = False
    checkpointing: bool = False
    fsdp: bool = True  # inference: no FSDP, every rank keeps its TP/EP shards and the rest whole

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def __str__(self) -> str:
        return f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp} ep={self.ep}"


def make_plan(world: int, text: TextConfig, *, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1,
              ep: int = 1, compile: bool = False, checkpointing: bool = False, fsdp: bool = True) -> Plan:
    """A checked plan for `world` ranks; `dp_shard=-1` takes what the other sizes leave. Raises
    ValueError naming the size that does not divide, before anything is allocated."""
    sizes = {"dp_replicate": dp_replicate, "tp": tp, "ep": ep}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad or not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
        raise ValueError(f"parallel sizes must be positive ints (dp_shard may be -1), got {sizes | {'dp_shard': dp_shard}}")
    if dp_shard == -1:
        if world % (dp_replicate * tp):
            raise ValueError(f"world size {world} is not divisible by dp_replicate*tp = {dp_replicate}*{tp}")
        dp_shard = world // (dp_replicate * tp)
    plan = Plan(dp_replicate, dp_shard, tp, ep, compile, checkpointing, fsdp)
    check_plan(plan, world, text)
    return plan


def check_plan(plan: Plan, world: int, text: TextConfig) -> None:
    problems = []
    if plan.world != world:
        problems.append(f"dp_replicate*dp_shard*tp = {plan.dp_replicate}*{plan.dp_shard}*{plan.tp} = {plan.world}, "
                        f"but the world size is {world}")
    if plan.dp_shard % plan.ep:
        problems.append(f"ep={plan.ep} must divide dp_shard={plan.dp_shard} (expert-parallel ranks are FSDP "
                        f"shard ranks)")
    if text.num_attention_heads % plan.tp or text.num_key_value_heads % plan.tp:
        problems.append(f"tp={plan.tp} must divide num_attention_heads={text.num_attention_heads} and "
                        f"num_key_value_heads={text.num_key_value_heads}")
    ffn = {"intermediate_size": text.intermediate_size, "intermediate_size_mlp": text.intermediate_size_mlp}
    if any(v % plan.tp for v in ffn.values()):
        problems.append(f"tp={plan.tp} must divide {ffn}")
    if plan.ep > 1 and not text.moe_layers:
        problems.append(f"ep={plan.ep} but the model has no MoE layers")
    if text.moe_layers and text.num_local_experts % plan.ep:
        problems.append(f"ep={plan.ep} must divide num_local_experts={text.num_local_experts}")
    if problems:
        raise ValueError(f"parallel plan [{plan}] does not fit: " + "; ".join(problems))


def build_mesh(plan: Plan, device_type: str | None = None):
    """The 4-D device mesh of `plan` (torch.distributed must be initialised), with the flattened
    `dp_shard` and `dp` views registered."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = (plan.dp_replicate, plan.dp_shard // plan.ep, plan.ep, plan.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    # DeviceMesh has no public flatten in torch 2.13; torchtitan uses the same call.
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
    return mesh


def parallelize(model: nn.Module, mesh, plan: Plan) -> nn.Module:
    """Apply `plan` to a `Llama4` in place (see the module docstring for the order); returns it."""
    from .expert_parallel import ExpertParallel

    moes = [b.feed_forward for b in model.layers if hasattr(b.feed_forward, "experts")]
    if plan.tp > 1:
        _tensor_parallel(model, mesh["tp"], plan.tp)
    if plan.ep > 1:
        for moe in moes:
            moe.experts = ExpertParallel(moe.experts, mesh["ep"])
    if plan.checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if plan.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names keep no `_orig_mod.` prefix
    if plan.dp > 1 and plan.fsdp:
        _fully_shard(model, mesh, plan)
    return model


def load_parallel(path, *, tp: int = 1, ep: int = 1, dtype: torch.dtype | None = None) -> nn.Module:
    """An HF checkpoint loaded for inference on every rank of the running process group, split by
    tensor and/or expert parallelism (no FSDP): each rank reads only its slices, and every rank runs
    the same prompts. Greedy tokens equal one process's."""
    import torch.distributed as dist

    from ..checkpoint.sharded import load_sharded
    from ..config import load_config

    text = load_config(Path(path) / "config.json").text
    plan = make_plan(dist.get_world_size(), text, tp=tp, ep=ep, fsdp=False)
    mesh = build_mesh(plan)
    return load_sharded(path, lambda m: parallelize(m, mesh, plan), dtype=dtype)


def _tensor_parallel(model: nn.Module, tp_mesh, tp: int) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    col, row = ColwiseParallel(), RowwiseParallel()
    ffn_plan = {"w1": col, "w3": col, "w2": row}
    for block in model.layers:
        attn = block.attention
        parallelize_module(attn, tp_mesh, {"wq": col, "wk": col, "wv": col, "wo": row})
        # Each rank now computes its own heads: the local views in forward need the local counts.
        attn.n_heads, attn.n_kv = attn.n_heads // tp, attn.n_kv // tp
        ffn = block.feed_forward
        if hasattr(ffn, "experts"):
            parallelize_module(ffn.shared_expert, tp_mesh, ffn_plan)
            # The MoE adds the routed rows into the shared expert's output in place; a DTensor's local
            # output is a view autograd forbids modifying, so hand the MoE a copy.
            ffn.shared_expert.register_forward_hook(lambda mod, args, out: out.clone())
        else:
            parallelize_module(ffn, tp_mesh, ffn_plan)


def _fully_shard(model: nn.Module, mesh, plan: Plan) -> None:
    from torch.distributed.fsdp import fully_shard

    dense = mesh["dp_replicate", "dp_shard"]
    for block in model.layers:
        ffn = block.feed_forward
        if plan.ep > 1 and hasattr(ffn, "experts"):
            # Experts are already split over `ep`; FSDP shards each rank's part over the dp ranks that
            # hold the same experts. Experts need their own unit even where that mesh is one rank,
            # so that the block's unit (on the full dp mesh) does not take them.
            _sum_gradients(fully_shard(ffn.experts, mesh=mesh["dp_replicate", "dp_shard_mod_ep"]))
        _sum_gradients(fully_shard(block, mesh=dense))
    _sum_gradients(fully_shard(model, mesh=dense))


def _sum_gradients(module) -> None:
    module.set_gradient_divide_factor(1.0)
    # A plain SUM: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling anyway.
    module.set_force_sum_reduction_for_comms(True)
