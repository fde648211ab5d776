"""Distributed training checkpoints with torch.distributed.checkpoint (DCP), and HF export from them.

    out_dir/checkpoints/step_NNNNNNN/   __0_0.distcp ... (each rank writes its own shards), .metadata,
                                        train_state.json (step, schedule, data position, RNG, config),
                                        config.json (the model's HF config)

DCP stores every tensor by its global name and shape, so a checkpoint saved by one layout loads into
any other (2 -> 1, 1 -> 2, 4 -> 2 ranks, FSDP to FSDP+EP): each rank reads the pieces it now owns.
A save is written into a hidden staging directory and renamed into place by rank 0 only after every
rank's data and the metadata are on disk, so a kill mid-save leaves the previous checkpoints. With
`async_save` the writing overlaps the next steps; the rename happens when it is done.

DCP's `.metadata` is a pickle. It is read here with an unpickler that admits only DCP's own metadata
classes and a few builtins, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

STATE_FILE = "train_state.json"
METADATA = ".metadata"

# Only these names may appear in a DCP metadata pickle.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in
    ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
     ("torch.distributed.checkpoint._extension", "StreamTransformExtension"),
     ("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"), ("torch", "float64"),
     ("torch", "int64"), ("torch", "int32"), ("torch", "uint8"), ("torch", "bool"), ("torch", "int8"),
     ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
     ("torch", "channels_last"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
     ("pathlib", "PosixPath"), ("uuid", "UUID"),
     ("torch.serialization", "_get_layout")}  # maps a name to a torch.layout, nothing else


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise ValueError(f"DCP metadata names {module}.{name}, which a checkpoint has no reason to hold; "
                             f"refusing to load it")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata is unpickled through an allow-list."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = Path(self.path) / (METADATA if rank is None else f"__{rank}{METADATA}")
        if not path.is_file():
            raise FileNotFoundError(f"{self.path}: no {METADATA}; not a distributed checkpoint")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise ValueError(f"{path}: unreadable DCP metadata ({e})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / METADATA).is_file()


def app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Model (and optimizer) state under global parameter names, sharded tensors as DTensors."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


class PendingSave:
    """A save in flight: `finish()` waits for it, then renames staging -> final on rank 0."""

    def __init__(self, future, staging: Path, final: Path, keep: int):
        self.future, self.staging, self.final, self.keep = future, staging, final, keep

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()
            self.future = None
        if dist.get_rank() == 0:
            _publish(self.staging, self.final, self.keep)
        dist.barrier()
        return self.final


def save(root: Path, step: int, model, optimizer, train_state: dict, model_config: dict, keep: int,
         *, async_group=None) -> PendingSave:
    """Start writing checkpoint `step` under `root` (out_dir/checkpoints); every rank calls this.

    With `async_group` (a gloo group kept for checkpointing, so its collectives never interleave with
    training's) the tensors are staged in memory and written in the background.
    """
    root = Path(root)
    final = root / f"step_{step:07d}"
    staging = root / f".{final.name}.partial"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
        (staging / STATE_FILE).write_text(json.dumps(train_state))
        (staging / "config.json").write_text(json.dumps(model_config, indent=2))
    dist.barrier()
    state = app_state(model, optimizer)
    writer = dcp.FileSystemWriter(staging, sync_files=True)
    if async_group is not None:
        future = dcp.async_save(state, storage_writer=writer, process_group=async_group)
        return PendingSave(future, staging, final, keep)
    dcp.save(state, storage_writer=writer)
    return PendingSave(None, staging, final, keep)


def _publish(staging: Path, final: Path, keep: int) -> None:
    for dirpath, _, files in os.walk(staging):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if final.exists():  # the same step saved before (a rerun)
        old = final.parent / f".{final.name}.old"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(staging, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    done = sorted((p for p in final.parent.iterdir() if p.is_dir() and p.name.startswith("step_")),
                  key=lambda p: p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(ckpt: Path, model, optimizer) -> dict:
    """Read a DCP checkpoint into `model` (and `optimizer`), whatever layout saved it; returns the
    train state (step, scheduler, data position, RNG)."""
    ckpt = Path(ckpt)
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{ckpt}: no {STATE_FILE}; not a distributed training checkpoint")
    state = app_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=SafeReader(ckpt))
    except dcp.api.CheckpointException as e:
        raise ValueError(f"{ckpt}: this checkpoint does not match the model being trained ({_first_line(e)})") \
            from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return json.loads(f.read_text())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def rng_state() -> dict:
    """This process's RNG streams as JSON-able values (no pickle in what we save)."""
    py = random.getstate()
    npst = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def export_hf(ckpt: Path, out: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the model of DCP checkpoint `ckpt` as an HF safetensors checkpoint in `out` (one process,
    no process group: DCP reads every shard and assembles the full tensors)."""
    from ..checkpoint import save as save_hf
    from ..config import config_from_hf
    from ..model import Llama4

    ckpt = Path(ckpt)
    cfg_file = ckpt / "config.json"
    if not is_dcp_checkpoint(ckpt) or not cfg_file.is_file():
        raise FileNotFoundError(f"{ckpt}: not a distributed checkpoint (need {METADATA} and config.json)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file))
    with torch.device("meta"):
        model = Llama4(cfg)
    model.to_empty(device="cpu")
    model.reset_buffers()
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    dcp.load(state, storage_reader=SafeReader(ckpt), no_dist=True)
    model.load_state_dict(state["model"], strict=True)
    return save_hf(model.to(dtype), out)
