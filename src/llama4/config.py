"""Llama 4 configuration: plain dataclasses, named presets, and HF `config.json` in and out.

Everything that differs between Scout, Maverick and Behemoth is a field here, never a magic number in
the model. Field names follow the Hugging Face config so a reader can hold one next to the other.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config_checks import ROPE_RULES, TEXT_RULES, TOP_RULES, VISION_RULES, check_fields, show_value

log = logging.getLogger("llama4")

ARCH_MULTIMODAL = "Llama4ForConditionalGeneration"
ARCH_TEXT = "Llama4ForCausalLM"


@dataclass
class TextConfig:
    """The text decoder: attention (iRoPE), MoE / dense FFN and embeddings."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense FFN layers (Maverick's non-MoE layers)
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None  # None: every `interleave_moe_layer_step`-th layer
    interleave_moe_layer_step: int = 1
    # HF's flag list: 1 = the layer uses RoPE + chunked local attention, 0 = NoPE + global attention.
    no_rope_layers: list[int] | None = None  # None or []: every `no_rope_layer_interval`-th layer is NoPE
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192  # None: RoPE layers attend globally too
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_...}
    max_position_embeddings: int = 10485760
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 200000
    eos_token_id: list[int] = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int | None = 200018

    def __post_init__(self) -> None:
        # Types first: `bool("false")` is True and a string iterates as characters (see config_checks).
        check_fields(vars(self), TEXT_RULES, "invalid text config")
        if self.rope_scaling is not None:
            check_fields(self.rope_scaling, ROPE_RULES, "invalid text config: rope_scaling")
        n = self.num_hidden_layers
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, n, step)) if step > 0 else []
        # An empty list is the default pattern, as transformers reads it (the base Scout ships `[]`).
        if not self.no_rope_layers:
            k = self.no_rope_layer_interval
            self.no_rope_layers = [int((i + 1) % k != 0) for i in range(n)]
        if self.eos_token_id is None:
            self.eos_token_id = []
        elif isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.moe_layers = [int(i) for i in self.moe_layers]
        self.no_rope_layers = [int(bool(v)) for v in self.no_rope_layers]
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid text config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} must be a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        n = self.num_hidden_layers
        need(len(self.no_rope_layers) >= n,
             f"no_rope_layers has {len(self.no_rope_layers)} entries, expected {n} (num_hidden_layers)")
        self.no_rope_layers = self.no_rope_layers[:n]
        bad = [i for i in self.moe_layers if not 0 <= i < n]
        need(not bad, f"moe_layers {bad} out of range for num_hidden_layers={n}")
        if self.moe_layers:
            need(self.num_local_experts > 0, f"num_local_experts={self.num_local_experts} must be > 0")
            need(1 <= self.num_experts_per_tok <= self.num_local_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_local_experts}]")
        need(self.attention_chunk_size is None or self.attention_chunk_size > 0,
             f"attention_chunk_size={self.attention_chunk_size} must be positive or None")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r} unsupported (Llama 4 uses 'silu')")
        need(self.floor_scale > 0, f"floor_scale={self.floor_scale} must be > 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            need(kind in ("llama3", "default"), f"rope_scaling type {kind!r} unsupported (expected 'llama3')")
            if kind == "llama3":
                missing = {"factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"} - set(rs)
                need(not missing, f"rope_scaling (llama3) is missing {sorted(missing)}")
                need(rs["high_freq_factor"] >= rs["low_freq_factor"],
                     f"rope_scaling high_freq_factor={rs['high_freq_factor']} < "
                     f"low_freq_factor={rs['low_freq_factor']}")

    # Layer kinds -------------------------------------------------------------------------------
    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend within chunks; NoPE layers attend globally."""
        return self.uses_rope(layer) and self.attention_chunk_size is not None


@dataclass
class VisionConfig:
    """The ViT image encoder, its pixel-shuffle adapter, and the projector into the text space."""

    hidden_size: int = 1408
    intermediate_size: int = 5632
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336  # tile size in pixels
    patch_size: int = 14
    norm_eps: float = 1e-5
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0
    multi_modal_projector_bias: bool = False
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_fields(vars(self), VISION_RULES, "invalid vision config")
        if self.image_size % self.patch_size:
            raise ValueError(f"invalid vision config: image_size={self.image_size} is not a multiple "
                             f"of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"invalid vision config: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        # transformers sizes the adapter's fc1 input by `intermediate_size` and feeds fc1 the pixel-shuffled
        # width, and the adapter and projector widths chain; every release satisfies both.
        side = self.image_size // self.patch_size
        if side * self.pixel_shuffle_ratio != int(side * self.pixel_shuffle_ratio):
            raise ValueError(f"invalid vision config: the {side}x{side} patch grid cannot be pixel-shuffled by "
                             f"pixel_shuffle_ratio={self.pixel_shuffle_ratio} (need a whole number of rows)")
        shuffled = self.hidden_size / self.pixel_shuffle_ratio**2
        if self.intermediate_size != shuffled:
            raise ValueError(f"invalid vision config: intermediate_size={self.intermediate_size} must equal "
                             f"hidden_size / pixel_shuffle_ratio**2 = {shuffled:g} (the adapter's input width)")
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ValueError(f"invalid vision config: projector_input_dim={self.projector_input_dim}, "
                             f"projector_output_dim={self.projector_output_dim} and vision_output_dim="
                             f"{self.vision_output_dim} must be equal (the adapter MLP and projector chain them)")

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * side * self.pixel_shuffle_ratio**2)


@dataclass
class Llama4Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image_token_index: int = 200092
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    name: str = ""

    @property
    def architecture(self) -> str:
        return ARCH_MULTIMODAL if self.vision is not None else ARCH_TEXT

    def replace(self, **text_overrides: Any) -> "Llama4Config":
        """A copy with some text fields changed (layer lists recomputed unless given)."""
        cfg = copy.deepcopy(self)
        t = asdict(cfg.text)
        if "num_hidden_layers" in text_overrides or "interleave_moe_layer_step" in text_overrides:
            t["moe_layers"] = None
        if "num_hidden_layers" in text_overrides or "no_rope_layer_interval" in text_overrides:
            t["no_rope_layers"] = None
        t.update(text_overrides)
        cfg.text = TextConfig(**t)
        return cfg


# Presets ----------------------------------------------------------------------------------------

_SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}


def _scout() -> Llama4Config:
    return Llama4Config(TextConfig(rope_scaling=dict(_SCOUT_ROPE)), VisionConfig(), name="scout")


def _maverick() -> Llama4Config:
    text = TextConfig(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                      rope_scaling=None, max_position_embeddings=1048576)
    return Llama4Config(text, VisionConfig(), name="maverick")


def _behemoth() -> Llama4Config:
    # Announced only (288B active, ~2T total, 16 experts). A projection: Scout's layout scaled up in
    # width and depth until both published numbers are met (2.001T total, 288.0B active).
    text = TextConfig(hidden_size=14336, num_hidden_layers=108, num_attention_heads=128, num_key_value_heads=8,
                      head_dim=128, intermediate_size=24576, intermediate_size_mlp=49152,
                      num_local_experts=16, rope_scaling=dict(_SCOUT_ROPE))
    return Llama4Config(text, VisionConfig(), name="behemoth")


def _guard4() -> Llama4Config:
    # Llama Guard 4 12B: Scout with the routed experts pruned; the shared expert is every layer's dense
    # FFN (width 8192) and no layer is chunked (`attention_chunk_size: null`). Vision tower kept.
    text = TextConfig(moe_layers=[], intermediate_size_mlp=8192, attention_chunk_size=None,
                      max_position_embeddings=163840, rope_scaling=dict(_SCOUT_ROPE))
    return Llama4Config(text, VisionConfig(), name="guard4")


def _tiny() -> Llama4Config:
    # Every part of Llama 4 at laptop size: MoE (4 experts, top-1, shared) on every second layer,
    # iRoPE with 64-token chunks, QK-norm, temperature tuning, llama3 scaling, a small ViT.
    text = TextConfig(vocab_size=202048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=256, intermediate_size_mlp=512,
                      num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=64,
                      floor_scale=32, max_position_embeddings=1 << 20,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          image_size=56, patch_size=14, projector_input_dim=128, projector_output_dim=128,
                          vision_output_dim=128)
    return Llama4Config(text, vision, name="tiny")


PRESETS = {"tiny": _tiny, "scout": _scout, "maverick": _maverick, "behemoth": _behemoth, "guard4": _guard4}


def preset(name: str) -> Llama4Config:
    """A named configuration: `tiny`, `scout`, `maverick` or `behemoth`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


# HF config.json in and out -----------------------------------------------------------------------

# One policy for unknown keys at every level. A key whose non-default value would change the
# computation, and that we do not implement, is refused by name: computing something else silently is
# worse than not loading. Any other key loads; keys we do not recognise are listed in one warning, since
# fine-tuning tools add their own (`unsloth_version`, ...) and refusing them would lock users out.
_UNSUPPORTED_NONDEFAULT = {
    "text": {"router_jitter_noise": 0.0, "attention_dropout": 0.0},
    "vision": {"attention_dropout": 0.0, "projector_dropout": 0.0, "vision_feature_layer": -1,
               "vision_feature_select_strategy": "default"},
}
_BOOKKEEPING = {  # known HF fields with no effect on inference: loaded without a word
    "model_type", "torch_dtype", "dtype", "use_cache", "output_router_logits", "router_aux_loss_coef",
    "for_llm_compressor", "transformers_version", "architectures", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "cache_implementation", "attn_implementation",
    "_attn_implementation_autoset", "pretraining_tp", "tie_word_embeddings",
}
# The top level of a multimodal config; quantization_config is read by the checkpoint loader.
_TOP_KNOWN = {"text_config", "vision_config", "image_token_index", "boi_token_index", "eoi_token_index",
              "quantization_config"}


def _refuse_unsupported(d: dict, level: str, where: str) -> None:
    for k, default in _UNSUPPORTED_NONDEFAULT[level].items():
        if k in d and d[k] is not None and d[k] != default:
            raise ValueError(f"{where}: {k}={d[k]!r} is not supported by llama4 (expected {default!r}); "
                             f"loading it would compute something else")


def _unknown(d: dict, known: set[str], prefix: str) -> list[str]:
    return [prefix + k for k in sorted(d) if k not in known and k not in _BOOKKEEPING]


def _rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    """Both spellings: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`."""
    params = d.get("rope_parameters")
    theta = d.get("rope_theta")
    scaling = d.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None:
            check_fields(value, ROPE_RULES, f"{where}: {name}")
    if params is not None:
        if theta is not None and "rope_theta" in params and float(params["rope_theta"]) != float(theta):
            raise ValueError(f"{where}: rope_theta={theta} contradicts rope_parameters.rope_theta="
                             f"{params['rope_theta']}")
        theta = params.get("rope_theta", theta)
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if scaling is not None:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
    return float(theta if theta is not None else 500000.0), scaling


def _section(d: Any, name: str, where: str) -> dict:
    if not isinstance(d, dict):
        shown = "null" if d is None else show_value(d)
        raise ValueError(f"{where}: {name}={shown} is invalid: {name} must be an object (a table of fields)")
    return d


def _text_from_hf(d: dict, where: str, unknown: list[str], prefix: str = "") -> TextConfig:
    d = dict(d)
    check_fields(d, TEXT_RULES, where)
    theta, scaling = _rope_from_hf(d, where)
    for k in ("rope_parameters", "rope_theta", "rope_scaling"):
        d.pop(k, None)
    _refuse_unsupported(d, "text", where)
    layer_types = d.pop("layer_types", None)
    known = {f.name for f in fields(TextConfig)}
    kwargs = {k: v for k, v in d.items() if k in known}
    # A text-only config is also the top level, where quantization_config may sit.
    unknown += _unknown(d, known | set(_UNSUPPORTED_NONDEFAULT["text"]) | {"quantization_config"}, prefix)
    if "head_dim" not in kwargs or kwargs["head_dim"] is None:
        kwargs["head_dim"] = kwargs.get("hidden_size", 5120) // kwargs.get("num_attention_heads", 40)
    try:
        cfg = TextConfig(rope_theta=theta, rope_scaling=scaling, **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if layer_types is not None:
        if len(layer_types) != cfg.num_hidden_layers:
            raise ValueError(f"{where}: layer_types has {len(layer_types)} entries, expected "
                             f"{cfg.num_hidden_layers}")
        want = ["chunked_attention" if cfg.is_chunked(i) else "full_attention"
                for i in range(cfg.num_hidden_layers)]
        if list(layer_types) != want:
            bad = [i for i, (a, b) in enumerate(zip(layer_types, want)) if a != b]
            raise ValueError(f"{where}: layer_types contradicts no_rope_layers/attention_chunk_size at "
                             f"layers {bad} (layer_types says {[layer_types[i] for i in bad]})")
    return cfg


def _vision_from_hf(d: dict, where: str, unknown: list[str]) -> VisionConfig:
    d = dict(d)
    check_fields(d, VISION_RULES, where)
    params = d.pop("rope_parameters", None) or {}
    check_fields(params, ROPE_RULES, f"{where}: rope_parameters")
    theta = d.pop("rope_theta", params.get("rope_theta", 10000.0))
    _refuse_unsupported(d, "vision", where)
    known = {f.name for f in fields(VisionConfig)}
    unknown += _unknown(d, known | set(_UNSUPPORTED_NONDEFAULT["vision"]), "vision_config.")
    kwargs = {k: v for k, v in d.items() if k in known}
    try:
        return VisionConfig(rope_theta=float(theta), **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_from_hf(d: dict, where: str = "config.json") -> Llama4Config:
    """Build a config from a parsed HF `config.json` (multimodal or text-only, 4.x or 5.x).

    Every field is type- and range-checked (ValueError naming it); keys we do not recognise load with
    one warning that lists them, unless they would change the computation (then ValueError)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    # llama4's record that the weights route with expert_bias.json (checkpoint/hf.py), not a model field.
    d = {k: v for k, v in d.items() if k != "llama4_routing_bias"}
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    unknown: list[str] = []
    if "text_config" in d or model_type == "llama4":
        if "text_config" not in d:
            raise ValueError(f"{where}: model_type 'llama4' needs a 'text_config' section")
        check_fields(d, TOP_RULES, where)
        text_d = _section(d["text_config"], "text_config", where)
        text = _text_from_hf(text_d, f"{where}: text_config", unknown, "text_config.")
        vision = None
        if d.get("vision_config") is not None:
            vision = _vision_from_hf(_section(d["vision_config"], "vision_config", where),
                                     f"{where}: vision_config", unknown)
        unknown[:0] = _unknown(d, _TOP_KNOWN, "")
        cfg = Llama4Config(text, vision, image_token_index=d.get("image_token_index", 200092),
                           boi_token_index=d.get("boi_token_index", 200080),
                           eoi_token_index=d.get("eoi_token_index", 200081))
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
    elif model_type in ("llama4_text", None) and ("hidden_size" in d or ARCH_TEXT in archs):
        cfg = Llama4Config(_text_from_hf(d, where, unknown), None)
        tie = d.get("tie_word_embeddings", False)
    else:
        raise ValueError(f"{where}: not a Llama 4 config (model_type={model_type!r}, architectures={archs}); "
                         f"expected model_type 'llama4' or 'llama4_text'")
    if unknown:
        log.warning("%s: ignoring %d field(s) llama4 does not use: %s", where, len(unknown), ", ".join(unknown))
    cfg.text.tie_word_embeddings = tie
    return cfg


def load_config(path: str | Path) -> Llama4Config:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json (expected an HF checkpoint directory with config.json)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return config_from_hf(d, str(f))


def _text_to_hf(t: TextConfig, spelling: int) -> dict:
    d = asdict(t)
    theta, scaling = d.pop("rope_theta"), d.pop("rope_scaling")
    if spelling >= 5:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": theta} if scaling is None else \
            {"rope_theta": theta, **scaling}
        d["layer_types"] = ["chunked_attention" if t.is_chunked(i) else "full_attention"
                            for i in range(t.num_hidden_layers)]
    else:
        d["rope_theta"], d["rope_scaling"] = theta, scaling
    d["model_type"] = "llama4_text"
    d["attention_dropout"] = 0.0
    d["router_jitter_noise"] = 0.0
    return d


def config_to_hf(cfg: Llama4Config, spelling: int = 4) -> dict:
    """The HF `config.json` dict; `spelling=4` writes `rope_theta`+`rope_scaling` (as the published
    checkpoints), `spelling=5` writes `rope_parameters` + `layer_types` (transformers 5.x)."""
    text = _text_to_hf(cfg.text, spelling)
    if cfg.vision is None:
        return {"architectures": [ARCH_TEXT], **text}
    v = asdict(cfg.vision)
    v["model_type"] = "llama4_vision_model"
    if spelling >= 5:
        v["rope_parameters"] = {"rope_type": "default", "rope_theta": v.pop("rope_theta")}
    return {
        "architectures": [ARCH_MULTIMODAL],
        "model_type": "llama4",
        "boi_token_index": cfg.boi_token_index,
        "eoi_token_index": cfg.eoi_token_index,
        "image_token_index": cfg.image_token_index,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "text_config": text,
        "vision_config": v,
    }


def save_config(cfg: Llama4Config, path: str | Path, spelling: int = 4) -> Path:
    p = Path(path)
    f = p / "config.json" if p.is_dir() or not p.suffix else p
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(config_to_hf(cfg, spelling), indent=2) + "\n")
    return f
