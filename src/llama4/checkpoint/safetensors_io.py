"""safetensors files read and written by hand: headers first (names, dtypes, shapes), then bytes straight into
place. Parsing is as strict as the safetensors library: a header that is not an object, an entry without
dtype/shape/data_offsets, negative, overlapping or gapped offsets, or offsets that do not cover the data
exactly are errors naming the file and the tensor. An index may name only files inside the checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

from .atomic import Snapshot

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # the safetensors library's limit

# Every safetensors dtype, in the library's own order (it writes larger-ranked tensors first, which keeps
# each tensor aligned), with its size in bits.
_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
         "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64,
         "I64": 64, "U64": 64}
_RANK = {name: i for i, name in enumerate(_BITS)}
_FROM_TORCH = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
               torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
               torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def weight_files(root: Path, snap: Snapshot | None = None) -> tuple[dict[str, Path], dict[Path, dict]]:
    """(HF key -> the safetensors file that holds it, file -> its header), from headers only.

    The index if there is one (only the files it names are read), else model.safetensors alone, else
    every *.safetensors file; names resolve through `snap`, the consistent view of a save in progress."""
    snap = snap or Snapshot(root)
    index = snap.file(INDEX)
    if index is not None:
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if snap.file(f) is None]
        if missing:
            raise FileNotFoundError(f"{root / INDEX} lists shards that do not exist in {root}: {missing}")
    else:
        files = ["model.safetensors"] if snap.file("model.safetensors") else snap.names("*.safetensors")
        if not files:
            raise FileNotFoundError(f"{root}: no model.safetensors, {INDEX} or *.safetensors")
        weight_map = None
    paths = {name: snap.file(name) for name in files}
    located: dict[str, Path] = {}
    headers = {paths[name]: read_header(paths[name]) for name in files}
    for name in files:
        for key in headers[paths[name]]:
            if key in located:
                raise ValueError(f"tensor {key!r} appears in both {located[key].name} and {name}")
            located[key] = paths[name]
    if weight_map is not None:
        listed_not_found = sorted(k for k, f in weight_map.items() if located.get(k) != paths[f])
        if listed_not_found:
            k = listed_not_found[0]
            raise ValueError(f"{root / INDEX}: {len(listed_not_found)} keys are not where the index says, e.g. "
                             f"{k!r} should be in {weight_map[k]}")
    return located, headers


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a model.safetensors.index.json: tensor name -> shard file inside the checkpoint."""
    try:
        d = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not a readable safetensors index ({e})") from None
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict):
        got = type(weight_map).__name__ if isinstance(d, dict) else f"a top level {type(d).__name__}"
        raise ValueError(f"{index}: 'weight_map' must be an object of tensor name -> shard file, got {got}")
    if "metadata" in d and not isinstance(d["metadata"], (dict, type(None))):
        raise ValueError(f"{index}: 'metadata' must be an object, got {type(d['metadata']).__name__}")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{index}: weight_map[{key!r}] = {name!r}; expected a shard file name (a string)")
        parts = PurePosixPath(name).parts
        if not name or name.startswith(("/", "~")) or "\\" in name or ":" in name or ".." in parts:
            raise ValueError(f"{index}: weight_map[{key!r}] = {name!r} points outside the checkpoint directory; "
                             f"shards must be files inside it")
    return weight_map


def read_header(path: Path) -> dict[str, dict]:
    """{key: {"dtype", "shape", "data_offsets"}} from a safetensors header, checked as the safetensors library
    checks it: every entry well formed, the tensors tiling the data buffer exactly, the file whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is over the format's {MAX_HEADER}-byte limit")
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} is past the end of the file ({size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {type(header).__name__}; expected an object "
                         f"of tensor name -> {{dtype, shape, data_offsets}}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: '__metadata__' must be an object of strings, got {meta!r:.80}")
    spans = []
    for key, info in header.items():
        _check_entry(path, key, info)
        spans.append((*info["data_offsets"], key))
    data = size - 8 - n
    end, prev = 0, None
    for begin, stop, key in sorted(spans):
        if begin != end:
            how = f"overlaps {prev!r}" if begin < end else \
                f"leaves {begin - end} unused bytes after {prev or 'the header'}"
            raise ValueError(f"{path}: tensor {key!r} data_offsets [{begin}, {stop}] {how}; the offsets must tile the "
                             f"data exactly, as the safetensors format requires")
        end, prev = stop, key
    if end > data:
        raise ValueError(f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}")
    if end < data:
        raise ValueError(f"{path}: {data - end} bytes after the last tensor's data; the offsets must cover the "
                         f"data exactly, as the safetensors format requires")
    return header


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:  # json would keep the last silently; the safetensors library refuses the file
        raise ValueError(f"key {dup[0]!r} appears twice in the header")
    return dict(pairs)


def _check_entry(path: Path, key: str, info) -> None:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: header entry is {info!r:.80}; expected an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise ValueError(f"{where}: header entry has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _BITS:
        raise ValueError(f"{where}: unknown dtype {dtype!r}; safetensors dtypes are {list(_BITS)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r} must be two integers 0 <= begin <= end")
    bits = math.prod(shape) * _BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise ValueError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but {dtype} "
                         f"{shape} needs {bits / 8:g}")


def detect_layout(keys, root: Path) -> bool:
    if any(k.startswith("language_model.") for k in keys):
        return True
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return False
    raise ValueError(f"{root}: unrecognised checkpoint layout (expected 'language_model.model.*' or "
                     f"'model.*' keys); first keys: {sorted(keys)[:5]}")


def dtype_of(safetensors_dtype: str) -> torch.dtype:
    return TORCH_DTYPES.get(safetensors_dtype, torch.float32)


def read_into(file: Path, header: dict[str, dict], items: list[tuple[torch.Tensor, str]]) -> None:
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
            direct = param.device.type == "cpu" and param.dtype == TORCH_DTYPES[info["dtype"]] and \
                param.is_contiguous()
            buf = param if direct else torch.empty(info["shape"], dtype=TORCH_DTYPES[info["dtype"]])
            want = buf.numel() * buf.element_size()
            f.seek(data_start + begin)
            if end - begin != want or f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != want:
                raise ValueError(f"{file}: tensor {key!r} should hold {want} bytes ({info['dtype']} "
                                 f"{info['shape']}) but its data is {end - begin} bytes or cut short")
            if not direct:
                param.copy_(buf)


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to the open file `f` in the safetensors format, byte for byte as the safetensors library
    would, one tensor at a time (no copy of the whole shard in memory; GPU tensors come over one by one)."""
    for key, t in tensors.items():
        if t.dtype not in _FROM_TORCH:
            raise ValueError(f"tensor {key!r}: dtype {t.dtype} has no safetensors equivalent")
    order = sorted(tensors, key=lambda k: (-_RANK[_FROM_TORCH[tensors[k].dtype]], k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _FROM_TORCH[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for key in order:
        t = tensors[key].detach().to("cpu").contiguous()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
