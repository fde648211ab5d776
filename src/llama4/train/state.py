"""Training state (optimizer, scheduler, RNG streams, data position, step, config) as JSON + safetensors.

No pickle: nothing in a run directory can execute code on `--resume`. The state is a tree of dicts, lists,
tuples, numbers, strings and tensors. Tensors go to `tensors.safetensors` and are replaced in the JSON by
{"__tensor__": key}; tuples become {"__tuple__": [...]}; dicts with non-string keys (the optimizer's
parameter ids) become {"__items__": [[key, value], ...]}. Decoding builds nothing but those types.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint.atomic import FileData
from ..checkpoint.safetensors_io import write_safetensors

STATE_DIR, JSON_FILE, TENSOR_FILE = "train_state", "state.json", "tensors.safetensors"
_MARKS = ("__tensor__", "__tuple__", "__items__")


def state_files(state: dict) -> dict[str, FileData]:
    """The files that hold `state`, for `write_checkpoint`: train_state/state.json and tensors.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors)
    return {f"{STATE_DIR}/{JSON_FILE}": json.dumps(tree).encode(),
            f"{STATE_DIR}/{TENSOR_FILE}": lambda f: write_safetensors(f, tensors)}


def read_state(jf: Path, tf: Path) -> dict:
    """Decode the state in `jf` (state.json) and `tf` (tensors.safetensors); errors name the file."""
    try:
        tree = json.loads(jf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{jf}: not a readable training state ({e})") from None
    try:
        tensors = load_file(str(tf))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{tf}: not a readable safetensors file ({e})") from None
    state = _decode(tree, tensors, jf)
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "data", "rng"} <= set(state):
        raise ValueError(f"{jf}: a training state needs step, optimizer, scheduler, data and rng")
    data, rng = state["data"], state["rng"]
    checks = [("step", type(state["step"]) is int and state["step"] >= 0),
              ("optimizer", isinstance(state["optimizer"], dict)
               and {"state", "param_groups"} <= set(state["optimizer"])),
              ("scheduler", isinstance(state["scheduler"], dict)),
              ("data", isinstance(data, dict)
               and all(type(data.get(k)) is int and data[k] >= 0 for k in ("epoch", "row"))),
              ("rng", isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
               and rng["torch"].dtype == torch.uint8 and isinstance(rng.get("python"), tuple)
               and isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5)]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise ValueError(f"{jf}: malformed {', '.join(bad)} in the training state")
    return state


def _encode(x, path: str, tensors: dict):
    if isinstance(x, torch.Tensor):
        tensors[path] = x
        return {"__tensor__": path}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) and k not in _MARKS for k in x):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in x.items()}
        if not all(isinstance(k, (str, int)) for k in x):
            raise TypeError(f"training state {path}: dict keys must be str or int, got {list(x)[:3]}")
        return {"__items__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in x.items()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"training state {path}: {type(x).__name__} cannot be stored (tensors, numbers, strings, "
                    f"lists, tuples and dicts only)")


def _decode(x, tensors: dict, where: Path):
    if isinstance(x, list):
        return [_decode(v, tensors, where) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tensor__" in x:
        key = x["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"{where}: names tensor {key!r}, which is not in {TENSOR_FILE}")
        return tensors[key]
    if "__tuple__" in x:
        return tuple(_decode(v, tensors, where) for v in _list(x["__tuple__"], where))
    if "__items__" in x:
        items = _list(x["__items__"], where)
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) for p in items):
            raise ValueError(f"{where}: malformed __items__ entry")
        return {k: _decode(v, tensors, where) for k, v in items}
    return {k: _decode(v, tensors, where) for k, v in x.items()}


def _list(x, where: Path) -> list:
    if not isinstance(x, list):
        raise ValueError(f"{where}: expected a list, got {x!r:.60}")
    return x
