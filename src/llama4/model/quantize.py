"""Which modules of a Llama 4 get quantized weights, and swapping them in.

`only="experts"`: the routed experts (about 95% of Scout's and 98% of Maverick's weights).
`only="all"`: also every bias-free linear of the text decoder (attention, shared expert, dense FFN).
Never quantized: embeddings, the output head, the router (its top-k choice is sensitive, and tiny),
norms and the vision tower, as in the published quantized checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import MoE
from .quant import QuantExperts, QuantLinear, QuantScheme, as_scheme

ONLY = ("experts", "all")


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, D, 2F], down [E, F, D]) of a float Experts module."""
    return experts.gate_up_proj, experts.down_proj


def quantized_targets(model: nn.Module, only: str = "experts") -> dict[str, nn.Module]:
    """{module name: float module} of every module `only` selects."""
    if only not in ONLY:
        raise ValueError(f"--only {only!r}: expected one of {', '.join(ONLY)}")
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            out[f"layers.{i}.feed_forward.experts"] = ff.experts
        if only == "all":
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear) and mod.bias is None and not name.endswith("router"):
                    out[f"layers.{i}.{name}"] = mod
    return out


def empty_quantized(module: nn.Module, scheme: QuantScheme, device) -> nn.Module:
    """A quantized module of the same shapes as `module`, allocated but unfilled."""
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, scheme, device)
    gate_up, down = expert_weights(module)
    E, D, F2 = gate_up.shape
    return QuantExperts(E, D, F2 // 2, scheme, device)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str | QuantScheme, only: str = "experts",
                   group_size: int | None = None) -> nn.Module:
    """Quantize `model` in place, one module at a time (each float module is freed once replaced)."""
    scheme = as_scheme(scheme, group_size)
    for name, mod in quantized_targets(model, only).items():
        if isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, scheme)
        else:
            new = QuantExperts.from_float(*expert_weights(mod), scheme)
        replace_module(model, name, new)
    model.quantization = {"scheme": str(scheme), "only": only}
    return model
