"""The one declarative map between our parameter names and the Hugging Face checkpoint keys.

Shared by loading and saving (both directions come from the same list of templates) and by Meta's
format, whose rules use the same `{i}` / `{p}` slots.
"""

from __future__ import annotations

import re

# Our parameter name <-> the HF text-only (Llama4ForCausalLM) name. `{i}` is a layer index and `{p}`
# is `weight` or `bias`. A multimodal checkpoint prefixes text keys with `language_model.`.
TEXT_KEY_MAP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attention.wq.{p}", "model.layers.{i}.self_attn.q_proj.{p}"),
    ("layers.{i}.attention.wk.{p}", "model.layers.{i}.self_attn.k_proj.{p}"),
    ("layers.{i}.attention.wv.{p}", "model.layers.{i}.self_attn.v_proj.{p}"),
    ("layers.{i}.attention.wo.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("layers.{i}.feed_forward.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("layers.{i}.feed_forward.experts.gate_up_proj", "model.layers.{i}.feed_forward.experts.gate_up_proj"),
    ("layers.{i}.feed_forward.experts.down_proj", "model.layers.{i}.feed_forward.experts.down_proj"),
    ("layers.{i}.feed_forward.shared_expert.w1.weight", "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight"),
    ("layers.{i}.feed_forward.shared_expert.w3.weight", "model.layers.{i}.feed_forward.shared_expert.up_proj.weight"),
    ("layers.{i}.feed_forward.shared_expert.w2.weight", "model.layers.{i}.feed_forward.shared_expert.down_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.feed_forward.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.feed_forward.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.feed_forward.down_proj.weight"),
]

# Vision tower and projector (multimodal checkpoints only; these keys carry no prefix there).
VISION_KEY_MAP = [
    ("vision.patch_embed.weight", "vision_model.patch_embedding.linear.weight"),
    ("vision.class_embedding", "vision_model.class_embedding"),
    ("vision.positional_embedding", "vision_model.positional_embedding_vlm"),
    ("vision.layernorm_pre.{p}", "vision_model.layernorm_pre.{p}"),
    ("vision.layernorm_post.{p}", "vision_model.layernorm_post.{p}"),
    ("vision.layers.{i}.attention_norm.{p}", "vision_model.model.layers.{i}.input_layernorm.{p}"),
    ("vision.layers.{i}.ffn_norm.{p}", "vision_model.model.layers.{i}.post_attention_layernorm.{p}"),
    ("vision.layers.{i}.attention.wq.{p}", "vision_model.model.layers.{i}.self_attn.q_proj.{p}"),
    ("vision.layers.{i}.attention.wk.{p}", "vision_model.model.layers.{i}.self_attn.k_proj.{p}"),
    ("vision.layers.{i}.attention.wv.{p}", "vision_model.model.layers.{i}.self_attn.v_proj.{p}"),
    ("vision.layers.{i}.attention.wo.{p}", "vision_model.model.layers.{i}.self_attn.o_proj.{p}"),
    ("vision.layers.{i}.fc1.{p}", "vision_model.model.layers.{i}.mlp.fc1.{p}"),
    ("vision.layers.{i}.fc2.{p}", "vision_model.model.layers.{i}.mlp.fc2.{p}"),
    ("vision.adapter_fc1.weight", "vision_model.vision_adapter.mlp.fc1.weight"),
    ("vision.adapter_fc2.weight", "vision_model.vision_adapter.mlp.fc2.weight"),
    ("vision.projector.{p}", "multi_modal_projector.linear_1.{p}"),
]

_SLOTS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def compile_template(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    # Even parts are literal text, odd parts are slot names.
    return re.compile("".join(re.escape(s) if n % 2 == 0 else _SLOTS[s] for n, s in enumerate(parts)))


class KeyMap:
    """Both directions of one list of (ours, theirs) templates."""

    def __init__(self, multimodal: bool):
        prefix = "language_model." if multimodal else ""
        rules = [(ours, prefix + hf) for ours, hf in TEXT_KEY_MAP]
        if multimodal:
            rules += VISION_KEY_MAP
        self._to_hf = [(compile_template(o), h) for o, h in rules]
        self._from_hf = [(compile_template(h), o) for o, h in rules]

    @staticmethod
    def _apply(rules, key: str) -> str | None:
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                return template.format(**m.groupdict())
        return None

    def to_hf(self, ours: str) -> str:
        hf = self._apply(self._to_hf, ours)
        if hf is None:
            raise KeyError(f"no HF name for parameter {ours!r}")
        return hf

    def from_hf(self, hf: str) -> str | None:
        return self._apply(self._from_hf, hf)
