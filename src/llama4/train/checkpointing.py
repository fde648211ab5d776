"""Training checkpoints: `out_dir/checkpoints/step_NNNNNNN/`, each complete or absent.

A checkpoint directory holds the model in the HF layout (config.json + safetensors, which `llama4.load`,
`llama4 generate` and transformers read) or, for LoRA runs, the adapter; the tokenizer; the MoE expert
biases (`expert_bias.json`, routing state the HF format has no field for; `llama4.load` applies it);
and `train_state/` (optimizer, scheduler, RNG streams, data position, step and the run's config, as JSON
+ safetensors: nothing there is unpickled, so nothing there can run code). It is written with
checkpoint/atomic.py: a kill at any instant leaves the previous checkpoints as they were and the new one
complete or absent; older checkpoints are pruned only after that.

`--resume` takes the newest checkpoint that reads back whole, and falls back past damaged ones (saying so,
and moving them aside to `step_NNNNNNN.damaged`). It refuses a run whose configuration changed, naming the
keys, except for the keys in `SAFE_TO_CHANGE`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.atomic import FileData, Snapshot, clean_leftovers, remove_checkpoint, write_checkpoint
from ..checkpoint.hf import BIAS_FILE, checkpoint_files, read_expert_bias
from ..checkpoint.side_files import side_files
from .state import JSON_FILE, STATE_DIR, TENSOR_FILE, read_state, state_files

log = logging.getLogger("llama4")
_NAME = re.compile(r"step_(\d{7})")
_LEFTOVER = re.compile(r"\.(step_\d{7})\.llama4-(saving|trash)-.*")

# Keys that may differ on --resume: they change how long the run goes and what it writes, not the steps it
# takes. (train.steps also re-stretches the cosine schedule over the new total; loss_chunk, threads and
# activation checkpointing change speed and memory, not the result beyond float summation order.)
SAFE_TO_CHANGE = {"train.steps", "train.progress", "train.plot_every", "train.out_dir", "train.loss_chunk",
                  "train.threads", "train.activation_checkpointing", "checkpoint.every", "checkpoint.keep",
                  "data.media_cache_mb"}


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints, oldest first (staging and removed directories never carry the final name)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: dict, biases: dict,
                    tokenizer_file: Path | None, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. `state` goes to train_state/."""
    from .lora import adapter_files

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"not saving step {step}: parameter {name} holds NaN/inf (training diverged); "
                             f"the previous checkpoints are kept")
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    lora = hasattr(model, "lora_config")
    files: dict[str, FileData] = {f"adapter/{k}": v for k, v in adapter_files(model).items()} if lora \
        else {**checkpoint_files(model), **side_files(model, tokenizer_file)}  # self-contained, as llama4.save
    if biases:
        text = json.dumps({k: v.tolist() for k, v in biases.items()}).encode()
        files[BIAS_FILE] = text
        if lora:  # an adapter carries the routing it was trained with
            files[f"adapter/{BIAS_FILE}"] = text
    if tokenizer_file is not None and tokenizer_file.name not in files:
        files[tokenizer_file.name] = lambda f, src=tokenizer_file: _copy(src, f)
    files.update(state_files(state))
    if root.is_dir():  # what killed saves of other steps left beside them
        for name in {m.group(1) for p in root.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}:
            clean_leftovers(root / name)
    write_checkpoint(final, files)
    for old in checkpoints(out_dir)[:-keep]:
        remove_checkpoint(old)
    return final


def load_train_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state, expert biases) of a checkpoint directory; ValueError/FileNotFoundError if it is damaged."""
    snap = Snapshot(ckpt)
    jf, tf = snap.file(f"{STATE_DIR}/{JSON_FILE}"), snap.file(f"{STATE_DIR}/{TENSOR_FILE}")
    if jf is None or tf is None:
        if (ckpt / "train_state.pt").is_file():
            raise ValueError(f"{ckpt / 'train_state.pt'}: a pickled training state (written by an older llama4) "
                             f"is never loaded: unpickling a file can run any code in it. This version stores "
                             f"{STATE_DIR}/{JSON_FILE} + {TENSOR_FILE}")
        raise FileNotFoundError(f"{ckpt}: no {STATE_DIR}/{JSON_FILE} and {TENSOR_FILE}; not a training checkpoint")
    state = read_state(jf, tf)
    biases = {}
    bias = snap.file(BIAS_FILE)
    if bias is not None:
        biases = {k: torch.tensor(v) for k, v in read_expert_bias(bias).items()}
    return state, biases


def check_same_run(saved: dict, now: dict, ckpt: Path) -> None:
    """Refuse to resume with a configuration that differs from the checkpoint's outside SAFE_TO_CHANGE."""
    a, b = _flatten(saved), _flatten(now)
    differ = sorted(k for k in set(a) | set(b)
                    if a.get(k, "<unset>") != b.get(k, "<unset>") and k not in SAFE_TO_CHANGE)
    if differ:
        shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in differ)
        raise ValueError(f"--resume: {ckpt} was trained with a different configuration ({shown}). Resuming would "
                         f"silently mix two runs: restore those values, or start a new train.out_dir. Keys that "
                         f"may change on resume: {sorted(SAFE_TO_CHANGE)}")


def move_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the run (`step_N.damaged`, `.damaged-2`, ...), keeping it to inspect."""
    dst, n = ckpt.with_name(ckpt.name + ".damaged"), 1
    while dst.exists():
        n += 1
        dst = ckpt.with_name(f"{ckpt.name}.damaged-{n}")
    ckpt.rename(dst)
    return dst


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _copy(src: Path, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f)
