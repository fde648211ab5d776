"""The routed experts, and the one place that picks the kernel that runs them.

Interface (what the MoE, an expert-parallel all-to-all, or a quantized expert sees):
`experts(x_RD, counts_E) -> y_RD`. Rows arrive sorted by expert: expert e owns the next `counts_E[e]`
rows. The output has the compute dtype (the autocast dtype when autocast is on, else the input's).

Kernels for plain (bf16 / fp32) weights, tried in this order by `select_kernel`:
- `grouped_mm`: one `torch._grouped_mm` over all experts (CUDA, compute capability >= 9, bf16). No
  host sync, any row count. Unverified here: this machine has no GPU (see docs/benchmarks.md).
- `gather`: each row gathers its own expert's weights and runs one batched matmul. No host sync and
  no Python branching on counts, so `torch.compile(fullgraph=True)` and CUDA graphs take it; it reads
  each routed row's weights once (a copy), so it serves small row counts: decode. Chosen when
  `torch.compiler.is_compiling()` or R <= `SMALL_ROWS` off the CPU.
- `small_loop`: eager CPU, R <= `SMALL_ROWS`, no autograd through the weights (decode): two matmuls per
  expert that has rows, each straight on `w[e]` (no copy, no unbind of all E experts). Reading the
  counts on the host costs nothing on the CPU (no device to wait for), and saves gather's weight copy.
- `loop`: two matmuls per expert that has rows, sizes read on the host. The reference.

Predicates look only at shapes, dtypes, devices and compile state, never at tensor values, so the
choice itself never syncs. `experts.kernel = "loop"` (or any registered name) forces a kernel.

Plugging in other weight formats (quantized or expert-parallel experts): subclass `Experts`, store the
weights as that format wants, set the class attribute `weight_format` (e.g. "int8"), and call
`register_kernel("int8", Kernel(name, applies, run))` for each kernel, in preference order. `run(experts,
x_RD, counts_E)` keeps the interface above; the MoE, the selector and the tests stay as they are. A
format that wants compiled decode registers a sync-free kernel whose `applies` accepts
`is_small_or_compiling(x_RD)`.

Shape legend: R routed rows (token, expert pairs), D model dim, E experts, F expert hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# At most this many routed rows take the sync-free gather kernel in eager mode: one decode step of a
# few sequences. Above it, copying each row's expert weights costs more than the per-expert loop.
SMALL_ROWS = 8


@dataclass(frozen=True)
class Kernel:
    name: str
    applies: Callable[["Experts", torch.Tensor], bool]  # (experts, x_RD in compute dtype) -> usable?
    run: Callable[["Experts", torch.Tensor, torch.Tensor], torch.Tensor]  # (experts, x_RD, counts_E) -> y_RD


KERNELS: dict[str, list[Kernel]] = {}


def register_kernel(weight_format: str, kernel: Kernel, *, first: bool = False) -> None:
    """Add a kernel for experts of `weight_format` (after the existing ones, or before with `first`)."""
    kernels = KERNELS.setdefault(weight_format, [])
    kernels.insert(0, kernel) if first else kernels.append(kernel)


def select_kernel(experts: "Experts", x_RD: torch.Tensor) -> Kernel:
    kernels = KERNELS.get(experts.weight_format, [])
    if experts.kernel is not None:
        for k in kernels:
            if k.name == experts.kernel:
                return k
        raise ValueError(f"experts.kernel={experts.kernel!r}: no such kernel for {experts.weight_format!r} "
                         f"weights; registered: {[k.name for k in kernels]}")
    for k in kernels:
        if k.applies(experts, x_RD):
            return k
    raise ValueError(f"no expert kernel for {experts.weight_format!r} weights and input {x_RD.dtype} "
                     f"{tuple(x_RD.shape)} on {x_RD.device}")


def is_small_or_compiling(x_RD: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or x_RD.shape[0] <= SMALL_ROWS


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Experts(nn.Module):
    """E SwiGLU experts stored as the HF checkpoint stores them: [E, D, 2F] with gate|up fused on the
    last dim, and [E, F, D]."""

    weight_format = "plain"

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.kernel: str | None = None  # None: `select_kernel` decides per call

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        from .init import normal_

        normal_(self.gate_up_proj, std, generator)
        normal_(self.down_proj, std, generator)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Under autocast the MoE's input stays in the residual's dtype (fp32): cast it here, so that the
        # kernels (grouped_mm needs bf16 on both sides) see the dtype the matmuls run in.
        x_RD = x_RD.to(compute_dtype(x_RD))
        with torch.autocast(x_RD.device.type, enabled=False):
            return select_kernel(self, x_RD).run(self, x_RD, counts_E)


def _swiglu(h_R2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_R2F.chunk(2, dim=-1)
    return F.silu(gate) * up


# Kernels for plain weights --------------------------------------------------------------------------

def _grouped_mm_applies(experts: Experts, x_RD: torch.Tensor) -> bool:
    w = experts.gate_up_proj
    return (x_RD.is_cuda and x_RD.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x_RD.device)[0] >= 9
            # 16-byte aligned rows for both operands, and under 2**31 elements (torchtitan saw illegal
            # memory accesses beyond it).
            and x_RD.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
            and x_RD.shape[0] * max(w.shape[1], w.shape[2]) < 2**31)


def _grouped_mm_run(experts: Experts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # offs holds each group's end row (int32, as the kernel requires); an empty expert repeats its
    # predecessor's end. The weights' [E, D, 2F] row-major layout is a valid operand as it is.
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    w_gate_up = experts.gate_up_proj.to(x_RD.dtype)
    w_down = experts.down_proj.to(x_RD.dtype)
    h_RF2 = torch._grouped_mm(x_RD.contiguous(), w_gate_up, offs=offs_E)
    return torch._grouped_mm(_swiglu(h_RF2).contiguous(), w_down, offs=offs_E)


def expert_of_rows(counts_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The expert each of `n_rows` expert-sorted rows belongs to [R], without reading counts on the host."""
    ends_E = torch.cumsum(counts_E, 0)
    rows_R = torch.arange(n_rows, device=counts_E.device, dtype=ends_E.dtype)
    return torch.searchsorted(ends_E, rows_R, right=True)


def _gather_run(experts: Experts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    expert_R = expert_of_rows(counts_E, x_RD.shape[0])
    # Gather, then cast: only the routed experts' weights are converted.
    w_RD2F = experts.gate_up_proj.index_select(0, expert_R).to(x_RD.dtype)
    h_R2F = torch.bmm(x_RD.unsqueeze(1), w_RD2F).squeeze(1)
    w_RFD = experts.down_proj.index_select(0, expert_R).to(x_RD.dtype)
    return torch.bmm(_swiglu(h_R2F).unsqueeze(1), w_RFD).squeeze(1)


def small_loop_applies(experts: Experts, x_RD: torch.Tensor) -> bool:
    """Eager CPU decode: few rows, not compiling, and no autograd graph through the expert weights
    (there `w[e]` would make each expert's backward a zero-filled gradient of all E experts)."""
    if x_RD.device.type != "cpu" or torch.compiler.is_compiling() or x_RD.shape[0] > SMALL_ROWS:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in experts.parameters()))


def _small_loop_run(experts: Experts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    sizes = counts_E.tolist()
    dt = x_RD.dtype
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            x = x_RD[start:start + n]
            start += n
            outs.append(_swiglu(x @ experts.gate_up_proj[e].to(dt)) @ experts.down_proj[e].to(dt))
    if not outs:
        return x_RD.new_empty(x_RD.shape[0], experts.down_proj.shape[-1])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _loop_run(experts: Experts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # Two matmuls per expert that has rows; the activation runs once over all rows in between, since
    # each kernel call costs a parallel region (hundreds of them at E = 128).
    sizes = counts_E.tolist()
    used = [e for e, n in enumerate(sizes) if n]
    if not used:
        return x_RD.new_empty(x_RD.shape[0], experts.down_proj.shape[-1])
    x_per_expert = x_RD.split(sizes)
    # unbind, not w[e]: in backward each w[e] would add a zero-filled gradient the size of all E
    # experts; unbind's backward stacks the E gradients once.
    # Cast per used expert: with fp32 weights under autocast, unused experts are never converted.
    dt = x_RD.dtype
    w_gate_up, w_down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    h_RF2 = torch.cat([x_per_expert[e] @ w_gate_up[e].to(dt) for e in used])
    a_per_expert = _swiglu(h_RF2).split([sizes[e] for e in used])
    return torch.cat([a @ w_down[e].to(dt) for a, e in zip(a_per_expert, used)])


register_kernel("plain", Kernel("grouped_mm", _grouped_mm_applies, _grouped_mm_run))
register_kernel("plain", Kernel("small_loop", small_loop_applies, _small_loop_run))
register_kernel("plain", Kernel("gather", lambda experts, x_RD: is_small_or_compiling(x_RD), _gather_run))
register_kernel("plain", Kernel("loop", lambda experts, x_RD: True, _loop_run))
