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

from ..config import Llama4Config, load_config, save_config
from ..model import Llama4
from ..model.moe import MoE
from .keymap import KeyMap
from .side_files import TOKENIZER_FILES, read_side_files, side_files
from .safetensors_io import TORCH_DTYPES, detect_layout, dtype_of, read_into, weight_files

log = logging.getLogger("llama4")

# Loading ------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama4:
    """Load an HF Llama 4 checkpoint directory (multimodal or text-only, one file or sharded), or
    Meta's original format (`params.json` + `consolidated.*.pth`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
    if not (root / "config.json").exists() and (root / "params.json").exists():
        from .meta import load_meta

        model = load_meta(root, dtype=dtype, device=device)
        model.side_info = read_side_files(root)
        return model
    cfg = load_config(root)
    located, headers = weight_files(root)
    multimodal = detect_layout(located, root)
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
        if headers[file][hf_key]["dtype"] not in TORCH_DTYPES:
            raise ValueError(f"{file}: tensor {hf_key!r} has dtype {headers[file][hf_key]['dtype']}; expected "
                             f"one of {sorted(TORCH_DTYPES)}")
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
        dtype = dtype_of(headers[first[2]][first[1]]["dtype"])
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf_key, file in plan:
        by_file.setdefault(file, []).append((ours, hf_key))
    with torch.no_grad():
        for file, items in by_file.items():
            read_into(file, headers[file], [(params[ours], hf_key) for ours, hf_key in items])
    model.reset_buffers()
    _load_expert_bias(model, root / "expert_bias.json")
    model.side_info = read_side_files(root)
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
         config_spelling: int = 4, tokenizer=None) -> Path:
    """Write config.json + safetensors shards (+ index) in the HF layout, with the side files that make
    it self-contained (tokenizer, chat template, generation and processor configs: `side_files.py`).
    `tokenizer` (a Tokenizer or a path) defaults to the one the model was loaded with. The directory is
    assembled beside the target and swapped in at the end, so an interrupted save never damages what
    was there."""
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
    extra = side_files(model, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.saving-", dir=root.parent))
    try:
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
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
    # A save that wrote a tokenizer replaces the old one whole: an old tokenizer.model beside a new
    # tokenizer.json would be read first.
    new_tokenizer = any((target / n).exists() for n in TOKENIZER_FILES)
    for f in old.iterdir():
        if not ours.fullmatch(f.name) and not (target / f.name).exists() \
                and not (new_tokenizer and f.name in TOKENIZER_FILES):
            os.replace(f, target / f.name)
    shutil.rmtree(old, ignore_errors=True)
