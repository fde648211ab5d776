"""The files beside the weights that make a checkpoint self-contained, written by every save and read
back by `load`:

- the tokenizer (`tokenizer.model` and/or `tokenizer.json`, `tokenizer_config.json` with bos / eos /
  pad, `special_tokens_map.json`, `chat_template.jinja`): see `text/hf_export.py`;
- `generation_config.json`: special ids plus sampling defaults (the published Instruct models ship
  temperature 0.6 / top_p 0.9); `llama4 generate/chat` use them unless a flag overrides them;
- for multimodal models `preprocessor_config.json` + `processor_config.json`, so `AutoProcessor`
  (transformers' `Llama4Processor`) tiles images and lays out their tokens as we do;
- `media_config.json`: the media settings a model was trained with (frames per video, tiles per
  image), which no HF file has a field for; `generate` / `chat` / `eval` default to them.

What `load` found is kept on the model as `model.side_info` (a `SideInfo`), so a model loaded and
saved again carries its files along.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Llama4Config

log = logging.getLogger("llama4")

GENERATION_FILE, MEDIA_FILE = "generation_config.json", "media_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# generation_config.json keys that map onto our sampling options (HF name -> ours).
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}
MEDIA_KEYS = {"num_frames": int, "max_tiles": int, "fps": (int, float, type(None))}


@dataclass
class SideInfo:
    tokenizer: Path | None = None  # the tokenizer file a checkpoint carries
    generation: dict = field(default_factory=dict)  # our sampling option names -> defaults
    media: dict = field(default_factory=dict)  # num_frames / max_tiles / fps the model was trained with
    chat_template: str | None = None


def _json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def generation_defaults(d: dict, where: str) -> dict:
    """Our sampling defaults from a parsed generation_config.json (greedy when do_sample is false)."""
    out = {}
    for hf, ours in SAMPLING_KEYS.items():
        v = d.get(hf)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{where}: {hf}={v!r}: expected a non-negative number")
        out[ours] = int(v) if ours in ("top_k", "max_new_tokens") else float(v)
    if d.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def read_side_files(root: Path) -> SideInfo:
    info = SideInfo()
    info.tokenizer = next((root / n for n in TOKENIZER_FILES if (root / n).is_file()), None)
    if (root / GENERATION_FILE).is_file():
        info.generation = generation_defaults(_json(root / GENERATION_FILE), str(root / GENERATION_FILE))
    if (root / MEDIA_FILE).is_file():
        f = root / MEDIA_FILE
        d = _json(f)
        for k, v in d.items():
            if k not in MEDIA_KEYS:
                raise ValueError(f"{f}: unknown field {k!r}; expected some of {sorted(MEDIA_KEYS)}")
            if isinstance(v, bool) or not isinstance(v, MEDIA_KEYS[k]) or (v is not None and v <= 0):
                raise ValueError(f"{f}: {k}={v!r}: expected a positive number")
        info.media = d
    if (root / "chat_template.jinja").is_file():
        info.chat_template = (root / "chat_template.jinja").read_text()
    elif (root / "tokenizer_config.json").is_file():
        template = _json(root / "tokenizer_config.json").get("chat_template")
        info.chat_template = template if isinstance(template, str) else None
    return info


def generation_config(cfg: Llama4Config, defaults: dict) -> dict:
    t = cfg.text
    d = {"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id), "pad_token_id": t.pad_token_id}
    temperature = defaults.get("temperature", 0.0)
    d["do_sample"] = bool(temperature)
    for hf, ours in SAMPLING_KEYS.items():
        if ours in defaults and (ours != "temperature" or temperature):
            d[hf] = defaults[ours]
    return d


def processor_configs(cfg: Llama4Config, media: dict) -> dict[str, dict]:
    """transformers' `Llama4Processor` / image processor settings that reproduce our preprocessing
    (`media/image.py`, checked against transformers' outputs in tests/fixtures/image_reference.json)."""
    v = cfg.vision
    assert v is not None
    image = {
        "image_processor_type": "Llama4ImageProcessorFast",  # transformers 5 reads the 4.x name too
        "processor_class": "Llama4Processor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
        "size": {"height": v.image_size, "width": v.image_size},
        "max_patches": int(media.get("max_tiles", 16)), "resize_to_max_canvas": False,
    }
    processor = {"processor_class": "Llama4Processor", "patch_size": v.patch_size,
                 "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "fake_image_token": "<|image|>",
                 "image_token": "<|image|>", "start_of_image_token": "<|image_start|>",
                 "end_of_image_token": "<|image_end|>", "patch_token": "<|patch|>",
                 "tile_x_separator_token": "<|tile_x_separator|>", "tile_y_separator_token": "<|tile_y_separator|>"}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def resolve_tokenizer(model, tokenizer):
    """The tokenizer a save writes: the one given, else the one the model was loaded with, else the
    published Llama 4 tokenizer when the vocabulary is its size; None when none fits."""
    from ..text.tokenizer import Tokenizer

    if tokenizer is not None:
        return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    info = getattr(model, "side_info", None)
    if info is not None and info.tokenizer is not None and info.tokenizer.is_file():
        return Tokenizer(info.tokenizer)
    if model.config.text.vocab_size == 202048:
        return Tokenizer()
    return None


def side_files(model, tokenizer=None) -> dict[str, bytes]:
    """Every side file a save of `model` writes, by name."""
    from ..text.hf_export import tokenizer_files

    cfg = model.config
    info = getattr(model, "side_info", None) or SideInfo()
    files: dict[str, bytes] = {}
    tok = resolve_tokenizer(model, tokenizer)
    if tok is None:
        log.warning("saving a model with vocab_size=%d and no tokenizer: the checkpoint is not self-contained "
                    "(pass tokenizer= to save)", cfg.text.vocab_size)
    else:
        if tok.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocab_size is "
                             f"{cfg.text.vocab_size}: it does not belong to this model")
        if cfg.vision is not None and tok.special_tokens["<|patch|>"] != cfg.image_token_index:
            raise ValueError(f"tokenizer {tok.path} has <|patch|> = {tok.special_tokens['<|patch|>']} but the "
                             f"model's image_token_index is {cfg.image_token_index}: it does not belong to this model")
        files.update(tokenizer_files(tok, cfg.text.max_position_embeddings))
    files[GENERATION_FILE] = json.dumps(generation_config(cfg, info.generation), indent=2).encode()
    if info.media:
        files[MEDIA_FILE] = json.dumps(info.media, indent=2).encode()
    if cfg.vision is not None:
        files.update({k: json.dumps(v, indent=2).encode() for k, v in processor_configs(cfg, info.media).items()})
    return files
