"""LoRA: low-rank adapters on the attention projections and the routed experts, trained while the base
weights stay frozen; saved on their own and merged into a full checkpoint when wanted.

Each adapted weight W becomes W + (alpha / r) * B @ A, through `torch.nn.utils.parametrize`, so the model
code is untouched. A Linear weight [out, in] gets B [out, r], A [r, in]; a stacked expert weight
[E, in, out] gets one pair per expert, B [E, in, r], A [E, r, out]. B starts at zero: training starts
from the base model exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint.atomic import FileData, write_checkpoint
from ..checkpoint.hf import BIAS_FILE, apply_expert_bias, read_expert_bias
from ..checkpoint.safetensors_io import write_safetensors
from ..model.attention import Attention
from ..model.experts import Experts

CHECKPOINT_WRAPPER_PREFIX = "._checkpoint_wrapped_module"  # what torch's checkpoint_wrapper adds to names
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRA(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        *lead, m, n = weight.shape
        self.scale = alpha / rank
        self.lora_B = nn.Parameter(torch.zeros(*lead, m, rank, device=weight.device))
        self.lora_A = nn.Parameter(torch.randn(*lead, rank, n, device=weight.device) / math.sqrt(n))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) for every weight LoRA adapts."""
    out = []
    for name, mod in model.named_modules():
        # Activation checkpointing wraps blocks (train/loop.py); adapter keys keep the plain names.
        name = name.replace(CHECKPOINT_WRAPPER_PREFIX, "")
        if name.startswith("vision"):
            continue
        if "attention" in targets and isinstance(mod, Attention):
            out += [(f"{name}.{p}", getattr(mod, p), "weight") for p in ("wq", "wk", "wv", "wo")]
        if "experts" in targets and isinstance(mod, Experts):
            out += [(name, mod, "gate_up_proj"), (name, mod, "down_proj")]
    return out


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], seed: int = 0) -> list[nn.Parameter]:
    """Freeze the model and attach adapters; returns the adapter parameters (the only trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    params = []
    for _, mod, pname in _targets(model, targets):
        lora = LoRA(getattr(mod, pname), rank, alpha)
        parametrize.register_parametrization(mod, pname, lora)
        params += [lora.lora_A, lora.lora_B]
    torch.set_rng_state(gen_state)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return params


def _adapters(model: nn.Module):
    for path, mod, pname in _targets(model, model.lora_config["targets"]):
        yield f"{path}.{pname}", mod.parametrizations[pname][0]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for key, lora in _adapters(model):
        state[f"{key}.lora_A"] = lora.lora_A.detach().cpu().contiguous()
        state[f"{key}.lora_B"] = lora.lora_B.detach().cpu().contiguous()
    return state


def adapter_files(model: nn.Module) -> dict[str, FileData]:
    """`adapter_model.safetensors` + `adapter_config.json`, for `write_checkpoint`."""
    state = adapter_state(model)
    return {ADAPTER_FILE: lambda f: write_safetensors(f, state, {"format": "pt"}),
            ADAPTER_CONFIG: json.dumps(model.lora_config, indent=2).encode()}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """The adapter files in directory `path`, written atomically (checkpoint/atomic.py)."""
    write_checkpoint(path, adapter_files(model))
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file() or not (Path(path) / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter directory (expected {ADAPTER_FILE} and {ADAPTER_CONFIG})")
    cfg = json.loads(f.read_text())
    missing = {"rank", "alpha", "targets"} - set(cfg)
    if missing:
        raise ValueError(f"{f}: missing {sorted(missing)}")
    return cfg


@torch.no_grad()
def load_adapter_into(model: nn.Module, path: str | Path, file: Path | None = None) -> None:
    """Copy saved adapter weights (`file`, default `path`/adapter_model.safetensors) into a model that
    already has adapters of the same shape."""
    f = file or Path(path) / ADAPTER_FILE
    try:
        state = load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    for key, lora in _adapters(model):
        for part in ("lora_A", "lora_B"):
            t = state.get(f"{key}.{part}")
            target = getattr(lora, part)
            if t is None or t.shape != target.shape:
                raise ValueError(f"{f}: expected {key}.{part} of shape {tuple(target.shape)}, got "
                                 f"{None if t is None else tuple(t.shape)}")
            target.copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove the parametrizations (the model saves as usual)."""
    for _, mod, pname in _targets(model, model.lora_config["targets"]):
        parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    del model.lora_config
    return model


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Load an HF checkpoint, apply a saved adapter, merge it and save a full HF checkpoint to `out`."""
    from ..checkpoint import load, save

    cfg = read_adapter_config(adapter)
    model = load(base, dtype=torch.float32)
    add_lora(model, cfg["rank"], cfg["alpha"], cfg["targets"])
    load_adapter_into(model, adapter)
    # Routing biases: the adapter's, from its fine-tuning run, else the base's (which `load` applied).
    bias = Path(adapter) / BIAS_FILE
    if bias.is_file():
        apply_expert_bias(model, read_expert_bias(bias), bias)
    return save(merge_lora(model), out)
