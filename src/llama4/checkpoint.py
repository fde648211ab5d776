"""Hugging Face checkpoints: one declarative key map, streamed loading, sharded atomic saving.

`load` reads config.json and the safetensors headers first, checks every key and shape against a
model built on the meta device, and only then allocates and streams each tensor (memory-mapped)
into place, so peak memory stays near the model's own size. `save` writes the same layout back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import Llama4Config, load_config, save_config
from .model import Llama4
from .model.moe import MoE

log = logging.getLogger("llama4")

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
    ("layers.{i}.feed_forward.experts.w_gate_up_EDF2", "model.layers.{i}.feed_forward.experts.gate_up_proj"),
    ("layers.{i}.feed_forward.experts.w_down_EFD", "model.layers.{i}.feed_forward.experts.down_proj"),
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


def _compile(template: str) -> re.Pattern:
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
        self._to_hf = [(_compile(o), h) for o, h in rules]
        self._from_hf = [(_compile(h), o) for o, h in rules]

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


# Loading ------------------------------------------------------------------------------------------

def _weight_files(root: Path) -> tuple[dict[str, Path], dict[Path, dict]]:
    """(HF key -> the safetensors file that holds it, file -> its header), from headers only."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (need a 'weight_map' object): {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist in {root}: {missing}")
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{root}: no model.safetensors, model.safetensors.index.json or *.safetensors")
        weight_map = None
    located: dict[str, Path] = {}
    headers = {root / name: _header(root / name) for name in files}
    for name in files:
        path = root / name
        for key in headers[path]:
            if key in located:
                raise ValueError(f"tensor {key!r} appears in both {located[key].name} and {name}")
            located[key] = path
    if weight_map is not None:
        listed_not_found = sorted(k for k, f in weight_map.items() if located.get(k) != root / f)
        if listed_not_found:
            k = listed_not_found[0]
            raise ValueError(f"{index}: {len(listed_not_found)} keys are not where the index says, e.g. {k!r} "
                             f"should be in {weight_map[k]}")
    return located, headers


def _header(path: Path) -> dict[str, dict]:
    """{key: {"dtype", "shape"}} from a safetensors header, checking the file is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}")
    return header


def _detect_layout(keys, root: Path) -> bool:
    if any(k.startswith("language_model.") for k in keys):
        return True
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return False
    raise ValueError(f"{root}: unrecognised checkpoint layout (expected 'language_model.model.*' or "
                     f"'model.*' keys); first keys: {sorted(keys)[:5]}")


_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _dtype_of(safetensors_dtype: str) -> torch.dtype:
    return _TORCH_DTYPES.get(safetensors_dtype, torch.float32)


def _read_into(file: Path, header: dict[str, dict], items: list[tuple[torch.Tensor, str]]) -> None:
    """Read each tensor's bytes from `file` straight into its parameter with plain reads.

    Not mmap: pages of a mapped file count as this process's resident memory until it is unmapped,
    which put the peak at twice the checkpoint's size. A temporary is needed only where the dtype or
    device differs, and then for one tensor at a time.
    """
    with open(file, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        for param, key in items:
            info = header[key]
            begin, end = info["data_offsets"]
            direct = param.device.type == "cpu" and param.dtype == _TORCH_DTYPES[info["dtype"]] and \
                param.is_contiguous()
            buf = param if direct else torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
            want = buf.numel() * buf.element_size()
            f.seek(data_start + begin)
            if end - begin != want or f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != want:
                raise ValueError(f"{file}: tensor {key!r} should hold {want} bytes ({info['dtype']} "
                                 f"{info['shape']}) but its data is {end - begin} bytes or cut short")
            if not direct:
                param.copy_(buf)


def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama4:
    """Load an HF Llama 4 checkpoint directory (multimodal or text-only, one file or sharded), or
    Meta's original format (`params.json` + `consolidated.*.pth`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
    if not (root / "config.json").exists() and (root / "params.json").exists():
        from .checkpoint_meta import load_meta

        return load_meta(root, dtype=dtype, device=device)
    cfg = load_config(root)
    located, headers = _weight_files(root)
    multimodal = _detect_layout(located, root)
    if multimodal and cfg.vision is None:
        raise ValueError(f"{root}: the weights are multimodal (language_model.* keys) but config.json has no "
                         f"vision_config")
    if not multimodal and cfg.vision is not None:
        cfg.vision = None  # a text-only checkpoint of a multimodal config: build the text model only
        log.info("%s: text-only weights; building the text model without the vision tower", root)
    keymap = KeyMap(multimodal)

    with torch.device("meta"):
        model = Llama4(cfg)
    expected = dict(model.state_dict(keep_vars=True))
    if cfg.text.tie_word_embeddings:
        expected.pop("output.weight", None)

    # Check names and shapes against the headers before allocating anything.
    plan: list[tuple[str, str, Path]] = []
    unexpected = []
    for hf_key, file in located.items():
        ours = keymap.from_hf(hf_key)
        if ours is None or ours not in expected:
            unexpected.append(f"{hf_key} ({file.name})")
            continue
        shape = tuple(headers[file][hf_key]["shape"])
        if headers[file][hf_key]["dtype"] not in _TORCH_DTYPES:
            raise ValueError(f"{file}: tensor {hf_key!r} has dtype {headers[file][hf_key]['dtype']}; expected "
                             f"one of {sorted(_TORCH_DTYPES)}")
        want = tuple(expected[ours].shape)
        if shape != want:
            raise ValueError(f"{file}: tensor {hf_key!r} has shape {list(shape)} but the config "
                             f"(config.json) implies {list(want)}")
        plan.append((ours, hf_key, file))
    if unexpected:
        raise ValueError(f"{root}: {len(unexpected)} unexpected tensors not used by this config, e.g. "
                         f"{unexpected[:3]}")
    missing = sorted(set(expected) - {o for o, _, _ in plan})
    if missing:
        raise ValueError(f"{root}: {len(missing)} tensors missing from the checkpoint, e.g. "
                         f"{[keymap.to_hf(k) for k in missing[:3]]}")

    if dtype is None:
        first = plan[0]
        dtype = _dtype_of(headers[first[2]][first[1]]["dtype"])
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf_key, file in plan:
        by_file.setdefault(file, []).append((ours, hf_key))
    with torch.no_grad():
        for file, items in by_file.items():
            _read_into(file, headers[file], [(params[ours], hf_key) for ours, hf_key in items])
    model.reset_buffers()
    _load_expert_bias(model, root / "expert_bias.json")
    return model.eval()


def _load_expert_bias(model: Llama4, f: Path) -> None:
    """Routing biases of auxiliary-loss-free balancing, which `llama4 train` writes beside the weights
    (the HF format has no field for them): {"layers.{i}.feed_forward.expert_bias": [E floats]}."""
    if not f.is_file():
        return
    for key, values in json.loads(f.read_text()).items():
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.expert_bias", key)
        moe = getattr(model.layers[int(m.group(1))], "feed_forward", None) \
            if m and int(m.group(1)) < len(model.layers) else None
        if not hasattr(moe, "expert_bias_E") or len(values) != moe.n_experts:
            raise ValueError(f"{f}: {key!r} does not name an MoE layer's {getattr(moe, 'n_experts', '?')} "
                             f"expert biases (got {len(values)} values)")
        moe.expert_bias_E = torch.tensor(values, dtype=torch.float32, device=moe.expert_bias_E.device)


# Saving -------------------------------------------------------------------------------------------

def state_dict_hf(model: Llama4) -> dict[str, torch.Tensor]:
    cfg = model.config
    keymap = KeyMap(cfg.vision is not None)
    out = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.text.tie_word_embeddings:
            continue
        out[keymap.to_hf(name)] = t
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB' or '500MB'")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def save(model: Llama4, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
         config_spelling: int = 4) -> Path:
    """Write config.json + safetensors shards (+ index) in the HF layout. The directory is assembled
    beside the target and swapped in at the end, so an interrupted save never damages what was there."""
    root = Path(path)
    limit = _parse_size(max_shard_size)
    tensors = state_dict_hf(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().to("cpu").contiguous()
        size += n
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.saving-", dir=root.parent))
    try:
        save_config(model.config, tmp / "config.json", spelling=config_spelling)
        biases = {f"layers.{i}.feed_forward.expert_bias": layer.feed_forward.expert_bias_E.tolist()
                  for i, layer in enumerate(model.layers) if isinstance(layer.feed_forward, MoE)
                  and layer.feed_forward.expert_bias_E.any()}
        if biases:  # routing state from loss-free balancing; `load` applies it
            (tmp / "expert_bias.json").write_text(json.dumps(biases))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _swap_into_place(new: Path, target: Path) -> None:
    """Replace `target` with `new`; files in an existing target that are not ours are kept."""
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    # Carry over side files (tokenizer, generation config, ...) that the new save does not write.
    ours = re.compile(r"(config\.json|expert_bias\.json|model\.safetensors(\.index\.json)?|"
                      r"model-\d+-of-\d+\.safetensors)")
    for f in old.iterdir():
        if not ours.fullmatch(f.name) and not (target / f.name).exists():
            os.replace(f, target / f.name)
    shutil.rmtree(old, ignore_errors=True)
