"""safetensors files read by hand: headers first (names, dtypes, shapes), then bytes straight into place."""

from __future__ import annotations

import json
from pathlib import Path

import torch

def weight_files(root: Path) -> tuple[dict[str, Path], dict[Path, dict]]:
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
    headers = {root / name: read_header(root / name) for name in files}
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


def read_header(path: Path) -> dict[str, dict]:
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


def detect_layout(keys, root: Path) -> bool:
    if any(k.startswith("language_model.") for k in keys):
        return True
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return False
    raise ValueError(f"{root}: unrecognised checkpoint layout (expected 'language_model.model.*' or "
                     f"'model.*' keys); first keys: {sorted(keys)[:5]}")


TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


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
