"""An HF checkpoint read straight into a sharded model: each rank reads only the slices it owns.

The model is built on the meta device and checked against the safetensors headers (as `load` does),
then `shard(model)` lays it out (in practice `parallelize(model, mesh, plan)`: TP, EP, FSDP), and only
then is memory allocated: each parameter's *local* shard. For a DTensor the region it owns of the
global tensor (offsets and sizes, as DCP computes them) is read from the file as contiguous runs of
bytes: one run for a dim-0 shard (FSDP, EP, column-parallel), one per row for a dim-1 shard
(row-parallel). No rank ever holds more than its shards plus one shard-sized temporary when the
file's dtype differs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import Llama4
from .hf import BIAS_FILE, BIAS_KEY, apply_expert_bias, check_weights, read_expert_bias
from .safetensors_io import TORCH_DTYPES
from .side_files import read_side_files


def local_region(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the tensor this rank stores, its offsets in the global tensor, its sizes)."""
    if hasattr(p, "to_local"):  # a DTensor: DCP's own description of the piece this rank holds
        local = p.to_local()
        chunks = p.__create_chunk_list__()
        if len(chunks) != 1:
            raise ValueError(f"a parameter of global shape {tuple(p.shape)} is split into {len(chunks)} pieces "
                             f"on one rank; sharded loading reads one piece per rank")
        return local, tuple(chunks[0].offsets), tuple(chunks[0].sizes)
    return p, (0,) * p.dim(), tuple(p.shape)


def read_region(file: Path, info: dict, data_start: int, fd: int, out: torch.Tensor,
                offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    """Read region [offsets, offsets + sizes) of the stored row-major tensor `info` into `out`."""
    shape = tuple(info["shape"])
    if any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)) or len(shape) != len(sizes):
        raise ValueError(f"{file}: region {offsets}+{sizes} lies outside tensor shape {list(shape)}")
    if math.prod(sizes) == 0:
        return
    dtype = TORCH_DTYPES[info["dtype"]]
    esize = torch.empty(0, dtype=dtype).element_size()
    direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
    buf = out if direct else torch.empty(sizes, dtype=dtype)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    # The innermost dims the region spans fully are read as one run; the dims before are iterated.
    k = len(shape) - 1
    while k > 0 and sizes[k] == shape[k]:
        k -= 1
    run = sizes[k] * strides[k] * esize
    begin = data_start + info["data_offsets"][0]
    pos = 0
    for idx in itertools.product(*(range(o, o + s) for o, s in zip(offsets[:k], sizes[:k]))):
        at = begin + (sum(i * st for i, st in zip(idx, strides)) + offsets[k] * strides[k]) * esize
        got = os.preadv(fd, [memoryview(view[pos:pos + run])], at)
        if got != run:
            raise ValueError(f"{file}: data cut short reading {run} bytes at offset {at}")
        pos += run
    if not direct:
        out.copy_(buf)


def load_sharded(path: str | os.PathLike, shard: Callable[[Llama4], object], *,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama4:
    """Load the HF checkpoint at `path` into a model that `shard` lays out across ranks, reading on
    each rank only that rank's slices. Every rank calls this with the same `shard`. `dtype` defaults to
    the checkpoint's."""
    from .quantized import quantization_config

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json; sharded loading reads HF safetensors checkpoints")
    qcfg = quantization_config(root)
    if qcfg is not None:
        raise ValueError(f"{root}: a quantized checkpoint ({qcfg.get('quant_method')}); sharded loading reads float "
                         f"weights (dequantize it with `llama4 convert --to hf --dtype bf16` first)")
    snap, cfg, model, plan, headers = check_weights(root)
    if dtype is None:
        ours, hf_key, file = plan[0]
        dtype = TORCH_DTYPES[headers[file][hf_key]["dtype"]]
    model = model.to(dtype=dtype)
    if cfg.text.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    shard(model)
    model.to_empty(device=device)
    # checkpoint_wrapper adds a name part that the checkpoint's keys do not have
    params = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.state_dict(keep_vars=True).items()}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf_key, file in plan:
        by_file.setdefault(file, []).append((ours, hf_key))
    with torch.no_grad():
        for file, items in by_file.items():
            fd = os.open(file, os.O_RDONLY)
            try:
                data_start = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
                for ours, hf_key in items:
                    local, offsets, sizes = local_region(params[ours])
                    read_region(file, headers[file][hf_key], data_start, fd, local, offsets, sizes)
            finally:
                os.close(fd)
    model.reset_buffers()
    bias = snap.file(BIAS_FILE)
    if bias is not None:
        apply_expert_bias(model, read_expert_bias(bias), bias)
    elif BIAS_KEY in json.loads(snap.file("config.json").read_text()):
        raise FileNotFoundError(f"{root}: config.json records a routing bias ({BIAS_KEY}) but {BIAS_FILE} is "
                                f"missing; without it the model routes differently from the one trained")
    model.side_info = read_side_files(root)
    return model.eval()
