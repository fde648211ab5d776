"""LoRA: low-rank adapters on the attention projections and the routed experts, trained while the base
weights stay frozen; saved on their own in PEFT's format and merged into a full checkpoint when wanted.

Each adapted weight W becomes W + (alpha / r) * B @ A, through `torch.nn.utils.parametrize`, so the model
code is untouched. A Linear weight [out, in] gets B [out, r], A [r, in]; a stacked expert weight
[E, in, out] gets one pair per expert, B [E, in, r], A [E, r, out]. B starts at zero: training starts
from the base model exactly.

Saved adapters are PEFT adapters (`adapter_config.json` with `peft_type: LORA`, r, lora_alpha,
`target_modules` for the attention projections and `target_parameters` for the fused experts; HF key
names), so `peft.PeftModel.from_pretrained(transformers_model, dir)` computes what we compute, and
adapters trained with PEFT load here. PEFT wraps each targeted expert parameter in its own layer, the
first listed innermost: `experts.base_layer.lora_A` belongs to gate_up_proj, `experts.lora_A` to
down_proj. Its expert factors are flat: lora_A [E*r, in] (expert-major), lora_B [out, r*E] (rank-major).
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
from ..checkpoint.keymap import KeyMap
from ..model.attention import Attention
from ..model.experts import Experts

CHECKPOINT_WRAPPER_PREFIX = "._checkpoint_wrapped_module"  # what torch's checkpoint_wrapper adds to names
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ATTENTION_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


class LoRA(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        *lead, m, n = weight.shape
        self.scale = alpha / rank
        self.lora_B = nn.Parameter(torch.zeros(*lead, m, rank, device=weight.device))
        self.lora_A = nn.Parameter(torch.randn(*lead, rank, n, device=weight.device) / math.sqrt(n))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)


def _targets(model: nn.Module, targets: list[str], select: set[str] | None = None) -> list[tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) for every weight LoRA adapts (only `select`ed keys if given)."""
    out = []
    for name, mod in model.named_modules():
        # Activation checkpointing wraps blocks (train/loop.py); adapter keys keep the plain names.
        name = name.replace(CHECKPOINT_WRAPPER_PREFIX, "")
        if name.startswith("vision"):
            continue
        if "attention" in targets and isinstance(mod, Attention):
            out += [(f"{name}.{p}", getattr(mod, p), "weight") for p in ("wq", "wk", "wv", "wo")]
        if "experts" in targets and isinstance(mod, Experts):
            out += [(name, mod, p) for p in EXPERT_PARAMS]
    if select is not None:
        out = [t for t in out if f"{t[0]}.{t[2]}" in select]
    return out


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], seed: int = 0,
             select: set[str] | None = None) -> list[nn.Parameter]:
    """Freeze the model and attach adapters; returns the adapter parameters (the only trainable ones).
    `select` limits them to some weights by name (`layers.0.attention.wq.weight`), as a loaded adapter has."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    params = []
    for _, mod, pname in _targets(model, targets, select):
        lora = LoRA(getattr(mod, pname), rank, alpha)
        parametrize.register_parametrization(mod, pname, lora)
        params += [lora.lora_A, lora.lora_B]
    torch.set_rng_state(gen_state)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets),
                         "select": None if select is None else sorted(select)}
    return params


def _adapters(model: nn.Module):
    cfg = model.lora_config
    select = None if cfg.get("select") is None else set(cfg["select"])
    for path, mod, pname in _targets(model, cfg["targets"], select):
        yield f"{path}.{pname}", mod.parametrizations[pname][0]


def _peft_names(model: nn.Module, key: str, expert_order: tuple[str, ...]) -> tuple[str, str]:
    """Our adapted weight (`layers.0.attention.wq.weight`, `layers.1.feed_forward.experts.down_proj`)
    -> PEFT's (lora_A, lora_B) keys."""
    hf = KeyMap(model.config.vision is not None).to_hf(key)
    module, _, pname = hf.rpartition(".")
    if pname in EXPERT_PARAMS:  # parameter targets nest: each later one wraps the earlier ones
        depth = len(expert_order) - 1 - expert_order.index(pname)
        module += ".base_layer" * depth
    elif pname != "weight":
        raise KeyError(key)
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def _to_peft(lora: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = lora.lora_A.detach().float().cpu(), lora.lora_B.detach().float().cpu()
    if A.ndim == 2:
        return A.contiguous(), B.contiguous()
    E, in_, r = B.shape  # ours: B [E, in, r], A [E, r, out]; PEFT: A [E*r, out], B [in, r*E]
    return A.reshape(E * r, -1).contiguous(), B.permute(1, 2, 0).reshape(in_, r * E).contiguous()


def _from_peft(A: torch.Tensor, B: torch.Tensor, like: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    if like.lora_A.ndim == 2:
        return A, B
    E, in_, r = like.lora_B.shape
    return A.reshape(E, r, -1), B.reshape(in_, r, E).permute(2, 0, 1)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names."""
    state = {}
    for key, lora in _adapters(model):
        a_key, b_key = _peft_names(model, key, EXPERT_PARAMS)
        state[a_key], state[b_key] = _to_peft(lora)
    return state


def peft_config(model: nn.Module, base_model_name_or_path: str | None) -> dict:
    cfg = model.lora_config
    prefix = r"(language_model\.)?" if model.config.vision is not None else ""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["rank"], "lora_alpha": cfg["alpha"],
        # A regex, so that the vision tower's q_proj ... stay untouched, as here.
        "target_modules": prefix + r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
        if "attention" in cfg["targets"] else [],
        "target_parameters": [f"feed_forward.experts.{p}" for p in EXPERT_PARAMS] if "experts" in cfg["targets"] else None,
        "base_model_name_or_path": base_model_name_or_path, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def adapter_files(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, FileData]:
    """A PEFT adapter's `adapter_model.safetensors` + `adapter_config.json`, for `write_checkpoint`."""
    state = adapter_state(model)
    return {ADAPTER_FILE: lambda f: write_safetensors(f, state, {"format": "pt"}),
            ADAPTER_CONFIG: json.dumps(peft_config(model, base_model_name_or_path), indent=2).encode()}


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT adapter in directory `path`, written atomically (checkpoint/atomic.py)."""
    write_checkpoint(path, adapter_files(model, base_model_name_or_path))
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    """A PEFT LoRA adapter's config, checked for what we implement."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file() or not (Path(path) / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter directory (expected {ADAPTER_FILE} and {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{f}: peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; expected a "
                         f"PEFT LoRA adapter (peft_type 'LORA')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{f}: r={r!r}, lora_alpha={alpha!r}: expected a positive int and a number")
    for name, ok in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if cfg.get(name, ok) != ok:
            raise ValueError(f"{f}: {name}={cfg[name]!r} is not supported (expected {ok!r})")
    for name in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(name):
            raise ValueError(f"{f}: {name}={cfg[name]!r} is not supported (one r and lora_alpha for every layer)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{f}: bias={cfg['bias']!r} is not supported (expected 'none')")
    return cfg


def _adapter_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    # PEFT writes `...lora_A.weight`; some tools drop the adapter name differently: accept `.default.` too.
    return {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in state.items()}


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach a PEFT LoRA adapter (ours or trained elsewhere) to `model` without merging it."""
    path = Path(path)
    cfg = read_adapter_config(path)
    state = _adapter_tensors(path / ADAPTER_FILE)
    order = tuple(p.rsplit(".", 1)[-1] for p in (cfg.get("target_parameters") or []))
    bad = [p for p in order if p not in EXPERT_PARAMS]
    if bad:
        raise ValueError(f"{path / ADAPTER_CONFIG}: target_parameters {bad} are not Llama 4 expert parameters "
                         f"(expected feed_forward.experts.gate_up_proj / down_proj)")
    found, used = set(), set()
    for mod_path, _, pname in _targets(model, ["attention", "experts"]):
        key = f"{mod_path}.{pname}"
        if pname in EXPERT_PARAMS and pname not in order:
            continue
        a_key, b_key = _peft_names(model, key, order or EXPERT_PARAMS)
        if a_key in state and b_key in state:
            found.add(key)
            used |= {a_key, b_key}
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{path / ADAPTER_FILE}: {len(extra)} tensors adapt nothing this model has, e.g. {extra[:3]}")
    if not found:
        raise ValueError(f"{path / ADAPTER_FILE}: no LoRA tensors for this model's attention or experts")
    add_lora(model, cfg["r"], float(cfg["lora_alpha"]), ["attention", "experts"], select=found)
    if cfg.get("use_rslora"):  # rank-stabilised LoRA scales by alpha / sqrt(r)
        for _, lora in _adapters(model):
            lora.scale = cfg["lora_alpha"] / math.sqrt(cfg["r"])
    _copy_adapter(model, state, order or EXPERT_PARAMS, path / ADAPTER_FILE)
    return model


@torch.no_grad()
def _copy_adapter(model: nn.Module, state: dict, order: tuple[str, ...], where: Path) -> None:
    for key, lora in _adapters(model):
        a_key, b_key = _peft_names(model, key, order)
        if a_key not in state or b_key not in state:
            raise ValueError(f"{where}: missing {a_key if a_key not in state else b_key} (adapter for {key})")
        A, B = state[a_key], state[b_key]
        want_A, want_B = _to_peft(lora)
        if A.shape != want_A.shape or B.shape != want_B.shape:
            raise ValueError(f"{where}: {a_key} / {b_key} have shapes {list(A.shape)} / {list(B.shape)}; this model "
                             f"with r={lora.lora_A.shape[-2]} expects {list(want_A.shape)} / {list(want_B.shape)}")
        A, B = _from_peft(A.float(), B.float(), lora)
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B)


def load_adapter_into(model: nn.Module, path: str | Path, file: Path | None = None) -> None:
    """Copy saved adapter weights (`file`, default `path`/adapter_model.safetensors) into a model that
    already has adapters of the same shape (resuming)."""
    f = Path(file) if file is not None else Path(path) / ADAPTER_FILE
    _copy_adapter(model, _adapter_tensors(f), EXPERT_PARAMS, f)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove the parametrizations (the model saves as usual)."""
    for key, _ in list(_adapters(model)):
        path, _, pname = key.rpartition(".")
        mod = model.get_submodule(path)
        parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    del model.lora_config
    return model


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Load an HF checkpoint, apply a PEFT adapter, merge it and save a full, self-contained checkpoint
    (the base's tokenizer, chat template, generation and media settings) to `out`."""
    from ..checkpoint import load, save

    model = load(base, dtype=torch.float32)
    apply_adapter(model, adapter)
    # Routing biases: the adapter's, from its fine-tuning run, else the base's (which `load` applied).
    bias = Path(adapter) / BIAS_FILE
    if bias.is_file():
        apply_expert_bias(model, read_expert_bias(bias), bias)
    return save(merge_lora(model), out)
