"""Hugging Face checkpoints: one declarative key map, streamed loading, sharded atomic saving (atomic.py).

`load` reads config.json and the safetensors headers first, checks every key and shape against a
model built on the meta device, and only then allocates and streams each tensor (memory-mapped)
into place, so peak memory stays near the model's own size. `save` writes the same layout back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import Llama4Config, config_to_hf, load_config
from ..model import Llama4
from ..model.moe import MoE
from ..model.quantize import quantize_model
from .atomic import FileData, Snapshot, write_checkpoint
from .keymap import KeyMap
from .side_files import TOKENIZER_FILES, read_side_files, side_files
from .safetensors_io import INDEX, TORCH_DTYPES, detect_layout, dtype_of, read_into, weight_files, write_safetensors

BIAS_FILE = "expert_bias.json"
# The config.json entry a save with a routing bias writes, so that no reader can miss it.
BIAS_KEY = "llama4_routing_bias"
BIAS_WARNING = ("THIS MODEL IS NOT PORTABLE: it chooses experts with a learned per-expert routing bias, stored in "
                "expert_bias.json, which transformers, vLLM, llama.cpp and other frameworks do not read. They "
                "compute a DIFFERENT model from these weights; only llama4 computes the trained one. Train with "
                "aux-loss balancing (moe.bias_update_rate = 0) for portable weights.")

log = logging.getLogger("llama4")
# MoE routing-bias buffers: in our state_dict, in no HF key (written to expert_bias.json instead).
ROUTING_BIAS = re.compile(r"layers\.(\d+)\.feed_forward\.expert_bias")

# Loading ------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         quantize: str | None = None, quantize_only: str = "experts") -> Llama4:
    """Load an HF Llama 4 checkpoint directory (multimodal or text-only, one file or sharded), or
    Meta's original format (`params.json` + `consolidated.*.pth`). A Hub id (`owner/name`) that is not a
    directory is looked up in the local Hugging Face cache (never downloaded).

    Quantized checkpoints (compressed-tensors, fbgemm_fp8, Meta's fp8_mixed / int4_mixed) load as
    they are; `quantize="int8" | "int4" | "int4-g64" | "fp8"` quantizes a float checkpoint's experts
    (`quantize_only="all"`: and its linears) tensor by tensor while reading."""
    from . import quantized
    from .hub import resolve_checkpoint

    root = resolve_checkpoint(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
    if not (root / "config.json").exists() and (root / "params.json").exists():
        from .meta import load_meta
        from .meta_quantized import load_meta_quantized, meta_quantization

        if meta_quantization(root):
            return load_meta_quantized(root, dtype=dtype, device=device)
        model = load_meta(root, dtype=dtype, device=device)
        model.side_info = read_side_files(root)
        return quantize_model(model, quantize, quantize_only) if quantize else model
    qcfg = quantized.quantization_config(root)
    if qcfg is not None:
        if quantize:
            raise ValueError(f"{root}: already quantized ({qcfg.get('quant_method')}); load it without quantize=")
        return quantized.load_published(root, qcfg, dtype=dtype, device=device)
    snap, cfg, model, plan, headers = check_weights(root)
    if dtype is None:
        first = plan[0]
        dtype = dtype_of(headers[first[2]][first[1]]["dtype"])
    model = model.to(dtype=dtype)
    sinks = quantized.prepare_quantized(model, quantize, quantize_only, device) if quantize else {}
    model = model.to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf_key, file in plan:
        by_file.setdefault(file, []).append((ours, hf_key))
    with torch.no_grad():
        for file, items in by_file.items():
            read_into(file, headers[file], [(params[ours], hf_key) for ours, hf_key in items if ours not in sinks])
            for ours, hf_key in items:  # quantized one tensor at a time: never the whole float model
                if ours in sinks:
                    sinks[ours](quantized.read_tensor(file, headers[file], hf_key))
    model.reset_buffers()
    bias = snap.file(BIAS_FILE)
    if bias is not None:
        apply_expert_bias(model, read_expert_bias(bias), bias)
    elif BIAS_KEY in json.loads(snap.file("config.json").read_text()):
        raise FileNotFoundError(f"{root}: config.json records a routing bias ({BIAS_KEY}) but {BIAS_FILE} is "
                                f"missing; without it the model routes differently from the one trained")
    model.side_info = read_side_files(root)  # tokenizer, generation and media settings (side_files.py)
    return model.eval()


def check_weights(root: Path) -> tuple[Snapshot, Llama4Config, Llama4, list[tuple[str, str, Path]], dict]:
    """Read config.json and the safetensors headers of the HF checkpoint `root` and check every key and
    shape against a model built on the meta device, before anything is allocated. Returns (snapshot,
    config, meta model, [(our name, HF key, file)], headers by file)."""
    snap = Snapshot(root)  # the consistent set of files, also while a save into `root` is renaming
    config = snap.file("config.json")
    if config is None:
        raise FileNotFoundError(f"{root / 'config.json'}: no config.json (expected an HF checkpoint directory "
                                f"with config.json)")
    cfg = load_config(config)
    located, headers = weight_files(root, snap)
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
    # The routing bias is state_dict state that the HF layout has no key for: it comes from
    # expert_bias.json (zero without one), never from the weight files.
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not ROUTING_BIAS.fullmatch(k)}
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
    return snap, cfg, model, plan, headers


def read_expert_bias(f: Path) -> dict[str, list[float]]:
    """Routing biases of auxiliary-loss-free balancing, which `llama4 train` and `save` write beside the
    weights (the HF format has no field for them): {"layers.{i}.feed_forward.expert_bias": [E floats]}."""
    try:
        d = json.loads(Path(f).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not a readable expert-bias file ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected an object of 'layers.N.feed_forward.expert_bias' -> list of numbers, "
                         f"got a JSON {type(d).__name__}")
    for key, values in d.items():
        if not re.fullmatch(r"layers\.(\d+)\.feed_forward\.expert_bias", key):
            raise ValueError(f"{f}: key {key!r} is not of the form 'layers.N.feed_forward.expert_bias'")
        if not isinstance(values, list) or not all(type(v) in (int, float) and math.isfinite(v) for v in values):
            raise ValueError(f"{f}: {key!r} must be a list of finite numbers, got {values!r:.80}")
    return d


def apply_expert_bias(model: Llama4, biases: dict[str, list[float]], f: Path | str) -> None:
    for key, values in biases.items():
        i = int(key.split(".")[1])
        moe = getattr(model.layers[i], "feed_forward", None) if i < len(model.layers) else None
        if not hasattr(moe, "expert_bias") or len(values) != moe.n_experts:
            raise ValueError(f"{f}: {key!r} does not name an MoE layer's {getattr(moe, 'n_experts', '?')} "
                             f"expert biases (got {len(values)} values)")
        with torch.no_grad():
            moe.expert_bias.copy_(torch.tensor(values, dtype=torch.float32))


# Saving -------------------------------------------------------------------------------------------

def state_dict_hf(model: Llama4) -> dict[str, torch.Tensor]:
    cfg = model.config
    keymap = KeyMap(cfg.vision is not None)
    out = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.text.tie_word_embeddings or ROUTING_BIAS.fullmatch(name):
            continue  # the routing bias goes to expert_bias.json (no HF key carries it)
        out[keymap.to_hf(name)] = t
    return out


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    # As transformers reads them: "5GB" is 5 * 10**9 bytes, "5GiB" is 5 * 2**30.
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", size.upper())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB', '5GiB' or '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def checkpoint_files(model: Llama4, *, max_shard_size: int | str = "5GB",
                     config_spelling: int = 4) -> dict[str, FileData]:
    """The files of an HF checkpoint of `model`, name -> bytes or writer: config.json, the safetensors
    weights (one file, or shards + index), and expert_bias.json when the routing biases are not all zero."""
    limit = parse_size(max_shard_size)
    tensors = state_dict_hf(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    files: dict[str, FileData] = {}
    meta = {"format": "pt"}
    if len(shards) == 1:
        files["model.safetensors"] = lambda f, s=shards[0]: write_safetensors(f, s, meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            files[name] = lambda f, s=shard: write_safetensors(f, s, meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        files[INDEX] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    hf_config = config_to_hf(model.config, config_spelling)
    biases = routing_biases(model)
    if biases:  # routing state from loss-free balancing; `load` applies it, no other framework does
        files[BIAS_FILE] = json.dumps(biases).encode()
        hf_config = {BIAS_KEY: {"warning": BIAS_WARNING, "file": BIAS_FILE,
                                "layers": [int(k.split(".")[1]) for k in biases]}, **hf_config}
        log.warning("WARNING: saving a model with a routing bias in %d layer(s). %s", len(biases), BIAS_WARNING)
    files["config.json"] = (json.dumps(hf_config, indent=2) + "\n").encode()
    return files


def routing_biases(model: Llama4) -> dict[str, list[float]]:
    """The non-zero routing biases, as expert_bias.json holds them (empty: the weights are portable)."""
    return {f"layers.{i}.feed_forward.expert_bias": layer.feed_forward.expert_bias.tolist()
            for i, layer in enumerate(model.layers) if isinstance(layer.feed_forward, MoE)
            and layer.feed_forward.expert_bias.any()}


def save(model: Llama4, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
         config_spelling: int = 4, extra_files: Mapping[str, FileData] | None = None, tokenizer=None) -> Path:
    """Write config.json + safetensors shards (+ index) in the HF layout, atomically (checkpoint/atomic.py):
    at every instant `path` holds the complete old checkpoint or the complete new one. Weight, index, bias
    files of an earlier llama4 save that this one does not write are removed (its other files stay); files
    llama4 did not write are never touched (and a directory with weight files it did not write is refused).
    `extra_files` (name -> bytes, or a function writing to a file object) are written in the same
    transaction.

    Every save is self-contained: it also writes the side files of `side_files.py` (tokenizer files,
    chat template, generation config, processor and media configs). `tokenizer` (a Tokenizer or a
    path) defaults to the one the model was loaded with (`extra_files` of the same name win)."""
    files = checkpoint_files(model, max_shard_size=max_shard_size, config_spelling=config_spelling)
    clash = sorted(set(files) & set(extra_files or {}))
    if clash:
        raise ValueError(f"extra_files {clash}: these are written by llama4.save itself")
    side = {**side_files(model, tokenizer), **(extra_files or {})}
    # A save that writes a tokenizer replaces the old one whole: an old tokenizer.model left beside a
    # new tokenizer.json would be read first.
    new_tokenizer = any(n in side for n in TOKENIZER_FILES)
    write_checkpoint(path, {**files, **side},
                     supersedes=lambda name: _SUPERSEDED.fullmatch(name) or (new_tokenizer and name in TOKENIZER_FILES))
    return Path(path)


# What a new save makes stale when an earlier one wrote it and this one does not (other files an earlier
# save wrote, such as a tokenizer or training state, stay).
_SUPERSEDED = re.compile(rf"config\.json|{re.escape(BIAS_FILE)}|[^/]*\.safetensors(\.index\.json)?")
