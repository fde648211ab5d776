"""Type and range rules for config fields, checked one field at a time before any value is used.

A config value of the wrong kind does not fail loudly by itself: `bool("false")` is True, a string
iterates as characters (`no_rope_layers: "1110"` reads as four RoPE layers), and a negative epsilon
only shows up as NaN logits. So every field gets a rule, and the first one broken is reported with
the field, the value and what was expected. JSON has no int/float distinction we can trust for
floats (`1` for `1.0`), so number fields accept ints; int fields refuse floats and bools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Rule:
    expect: str  # completes "expected ...", e.g. "a positive integer"
    ok: Callable[[Any], bool]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POS_INT = Rule("a positive integer", lambda v: is_int(v) and v > 0)
NONNEG_INT = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
POS_NUMBER = Rule("a finite number > 0", lambda v: is_number(v) and v > 0)
NONNEG_NUMBER = Rule("a finite number >= 0", lambda v: is_number(v) and v >= 0)
NUMBER = Rule("a finite number", is_number)
BOOL = Rule("true or false (a JSON boolean, not a string)", lambda v: isinstance(v, bool))
STR = Rule("a string", lambda v: isinstance(v, str))
INT_LIST = Rule("a list of integers >= 0", lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v))
FLAG_LIST = Rule("a list of 0/1 flags, one per layer (1 = RoPE layer)",
                 lambda v: isinstance(v, list) and all(isinstance(i, bool) or (is_int(i) and i in (0, 1)) for i in v))
STR_LIST = Rule("a list of strings", lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v))
DICT = Rule("an object", lambda v: isinstance(v, dict))
# The published configs write `attn_temperature_tuning: 4` (an int, read as "on"); transformers reads
# any truthy value, but a string is never what the author meant.
BOOL_OR_INT = Rule("true/false or an integer >= 0 (0 = off)", lambda v: isinstance(v, bool) or (is_int(v) and v >= 0))
TOKEN_IDS = Rule("a token id (integer >= 0) or a list of them",
                 lambda v: (is_int(v) and v >= 0) or INT_LIST.ok(v))
RATIO = Rule("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1)


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.expect}, or null", lambda v: v is None or rule.ok(v))


def check_fields(values: Mapping[str, Any], rules: Mapping[str, Rule], where: str) -> None:
    """ValueError for the first field in `values` that breaks its rule (fields without a rule pass)."""
    for name, rule in rules.items():
        if name in values and not rule.ok(values[name]):
            raise ValueError(f"{where}: {name}={show_value(values[name])} is invalid: expected {rule.expect}")


def show_value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


TEXT_RULES: dict[str, Rule] = {
    **{name: POS_INT for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp",
                                  "no_rope_layer_interval", "max_position_embeddings")},
    "num_local_experts": NONNEG_INT,  # 0: a dense model (Meta's dense params.json)
    "num_experts_per_tok": POS_INT,
    "interleave_moe_layer_step": NONNEG_INT,  # 0: no MoE layer
    "moe_layers": optional(INT_LIST),
    "no_rope_layers": optional(FLAG_LIST),
    "attention_chunk_size": optional(POS_INT),
    "use_qk_norm": BOOL,
    "attn_temperature_tuning": BOOL_OR_INT,
    "floor_scale": POS_NUMBER,
    "attn_scale": NUMBER,
    "rope_theta": POS_NUMBER,
    "rope_scaling": optional(DICT),
    "rms_norm_eps": POS_NUMBER,
    "attention_bias": BOOL,
    "hidden_act": STR,
    "tie_word_embeddings": BOOL,
    "initializer_range": NONNEG_NUMBER,
    "bos_token_id": optional(NONNEG_INT),
    "eos_token_id": optional(TOKEN_IDS),
    "pad_token_id": optional(NONNEG_INT),
    "layer_types": optional(STR_LIST),
    "rope_parameters": optional(DICT),
}

# llama3 rope scaling: every factor divides something, so zero or negative ones give inf/NaN angles.
ROPE_RULES: dict[str, Rule] = {
    "factor": POS_NUMBER, "low_freq_factor": POS_NUMBER, "high_freq_factor": POS_NUMBER,
    "original_max_position_embeddings": POS_INT, "rope_theta": POS_NUMBER, "rope_type": STR, "type": STR,
}

VISION_RULES: dict[str, Rule] = {
    **{name: POS_INT for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_channels", "image_size", "patch_size", "projector_input_dim",
                                  "projector_output_dim", "vision_output_dim")},
    "norm_eps": POS_NUMBER,
    "pixel_shuffle_ratio": RATIO,
    "rope_theta": POS_NUMBER,
    "multi_modal_projector_bias": BOOL,
    "hidden_act": STR,
    "initializer_range": NONNEG_NUMBER,
    "rope_parameters": optional(DICT),
}

TOP_RULES: dict[str, Rule] = {
    "image_token_index": NONNEG_INT, "boi_token_index": NONNEG_INT, "eoi_token_index": NONNEG_INT,
    "tie_word_embeddings": BOOL,
}
