"""Training checkpoints: `out_dir/checkpoints/step_NNNNNNN/`, each complete or absent.

A checkpoint directory holds the model in the HF layout (config.json + safetensors, which `llama4.load`,
`llama4 generate` and transformers read) or, for LoRA runs, the adapter; the tokenizer; the MoE expert
biases (`expert_bias.json`, routing state the HF format has no field for; `llama4.load` applies it);
and `train_state.pt` (optimizer, scheduler, RNG streams, data position, step). Everything is written into a
hidden staging directory, flushed to disk, and renamed into place in one step, so a kill during a save
leaves the previous checkpoints as they were; older checkpoints are pruned only after that.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

STATE_FILE, BIAS_FILE = "train_state.pt", "expert_bias.json"
_NAME = re.compile(r"step_(\d{7})")


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging directories never carry the final name)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: dict, biases: dict,
                    tokenizer_file: Path | None, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. `state` goes to train_state.pt."""
    from ..checkpoint import save

    from .lora import save_adapter

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"not saving step {step}: parameter {name} holds NaN/inf (training diverged); "
                             f"the previous checkpoints are kept")
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        if hasattr(model, "lora_config"):
            save_adapter(model, staging / "adapter")
        else:
            save(model, staging / "model", tokenizer=tokenizer_file)  # self-contained: tokenizer and side files
            for f in (staging / "model").iterdir():
                os.replace(f, staging / f.name)
            (staging / "model").rmdir()
        if biases:  # JSON, not safetensors: weight loaders take every *.safetensors file for weights
            text = json.dumps({k: v.tolist() for k, v in biases.items()})
            (staging / BIAS_FILE).write_text(text)
            if (staging / "adapter").is_dir():  # an adapter carries the routing it was trained with
                (staging / "adapter" / BIAS_FILE).write_text(text)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / tokenizer_file.name)
        torch.save(state, staging / STATE_FILE)
        _fsync_tree(staging)
        if final.exists():  # the same step saved before (a rerun): swap the old one out first
            old = root / f".{final.name}.old"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state, expert biases) of a checkpoint directory."""
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{ckpt}: no {STATE_FILE}; not a training checkpoint")
    state = torch.load(f, map_location="cpu", weights_only=False)
    biases = {}
    if (ckpt / BIAS_FILE).is_file():
        biases = {k: torch.tensor(v) for k, v in json.loads((ckpt / BIAS_FILE).read_text()).items()}
    return state, biases


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
