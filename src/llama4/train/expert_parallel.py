"""Expert parallelism: the routed experts of one MoE layer split over EP ranks, tokens sent to the rank
that owns their expert with `all_to_all_single` and sent back the same way.

The model's `MoE` is untouched: it routes its own tokens over all E experts, sorts the (token, expert)
pairs by expert and calls `experts(x_RD, counts_E)`. `ExpertParallel` takes the place of that module,
so the seam is the same call. Each rank owns the contiguous experts [r*El, (r+1)*El); the rows it
receives arrive grouped by source rank, then by expert, and are regrouped by expert before this rank's
own experts run on them with their own counts (the original kernel, called with the local weights).

Shape legend: R routed rows on this rank (sorted by expert), Rr rows received from all EP ranks,
D model dim, E experts, El experts per rank, P EP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.func import functional_call


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with a backward: the gradient travels the opposite way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel(nn.Module):
    """`experts` sharded on dim 0 over the 1-D `mesh`; same parameter names, so state-dict keys stay."""

    def __init__(self, experts: nn.Module, mesh: DeviceMesh):
        super().__init__()
        self.mesh, self.group = mesh, mesh.get_group()
        self.size, self.rank = mesh.size(), mesh.get_local_rank()
        own = dict(experts.named_parameters(recurse=False))
        n_experts = {p.shape[0] for p in own.values()}
        if len(n_experts) != 1:
            raise ValueError(f"expert parameters disagree on the expert count: "
                             f"{ {k: tuple(p.shape) for k, p in own.items()} }")
        self.n_experts = n_experts.pop()
        if self.n_experts % self.size:
            raise ValueError(f"{self.n_experts} experts cannot be split over {self.size} expert-parallel ranks")
        self.n_local = self.n_experts // self.size
        lo = self.rank * self.n_local
        for name, p in own.items():
            local = p.detach()[lo:lo + self.n_local].clone()
            self.register_parameter(name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                                       requires_grad=p.requires_grad))
        # The original module does the arithmetic with this rank's weights swapped in. A tuple, not an
        # attribute, so it is no submodule: its own (now freed) parameters never reach a state dict.
        for name in own:
            setattr(experts, name, nn.Parameter(torch.empty(0, device="meta")))
        self.kernel = (experts,)

    def local_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.to_local() if isinstance(p, DTensor) else p for name, p in self.named_parameters(recurse=False)}

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        P, El = self.size, self.n_local
        send_PEl = counts_E.view(P, El)
        recv_PEl = torch.empty_like(send_PEl)
        dist.all_to_all_single(recv_PEl.view(-1), send_PEl.reshape(-1).contiguous(), group=self.group)
        # Split sizes must be host integers for the collective: one sync per layer, as in any EP.
        in_splits, out_splits = send_PEl.sum(1).tolist(), recv_PEl.sum(1).tolist()
        got_RrD = all_to_all(x_RD, out_splits, in_splits, self.group)
        # Received rows are (source rank, expert)-major; the kernel wants them expert-major.
        seg_Rr = torch.repeat_interleave(torch.arange(P * El, device=x_RD.device), recv_PEl.reshape(-1))
        order_Rr = torch.argsort((seg_Rr % El) * P + seg_Rr // El, stable=True)
        counts_El = recv_PEl.sum(0)
        weights = self.local_weights()
        y_RrD = functional_call(self.kernel[0], weights, (got_RrD.index_select(0, order_Rr), counts_El))
        if not sum(out_splits):
            # No rows for this rank's experts: still give every weight a (zero) gradient, so the
            # data-parallel gradient reduction sees the same tensors on every rank.
            y_RrD = y_RrD + sum(w.sum() for w in weights.values()) * 0.0
        back_RrD = y_RrD.index_select(0, torch.argsort(order_Rr))
        return all_to_all(back_RrD, in_splits, out_splits, self.group)
