"""The training config: a TOML file of sections, each a dataclass with defaults; unknown keys are errors.

    [model]      what to train: a preset (from scratch) or an HF checkpoint (fine-tuning)
    [data]       files, tokenizer, rows of `seq_len` tokens, `batch_size` rows per micro-batch
    [optim]      AdamW, warmup + cosine schedule, gradient clipping
    [train]      steps, accumulation, precision, activation checkpointing, output directory
    [checkpoint] how often to save and how many to keep
    [moe]        expert balancing: bias update rate (loss-free) and optional auxiliary loss
    [lora]       low-rank adapters instead of full fine-tuning
    [parallel]   scale-out under torchrun: data-parallel replicas/shards, tensor and expert parallel sizes

Command-line overrides are `section.key=value` strings whose value is read as TOML (`optim.lr=1e-3`,
`data.paths=["a.jsonl"]`); a bare word that is not TOML is taken as a string (`train.out_dir=runs/x`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    preset: str | None = "tiny"  # build from a named preset with random weights ...
    checkpoint: str | None = None  # ... or load this HF checkpoint directory (takes precedence)
    text_only: bool = False  # drop the vision tower (a preset's; a checkpoint keeps what it has)
    overrides: dict = field(default_factory=dict)  # text-config fields, e.g. {num_hidden_layers = 2}
    vision_overrides: dict = field(default_factory=dict)  # vision-config fields, e.g. {hidden_size = 128}
    init_std: float | None = None  # random init std; None = the config's initializer_range


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)  # .jsonl (chat or {"text"}) and .txt files
    tokenizer: str | None = None  # tokenizer file/dir; None = the checkpoint's, else the published one
    seq_len: int = 2048
    batch_size: int = 8  # rows per micro-batch
    pack: bool = True  # several documents per row, attention kept inside each
    shuffle: bool = True
    max_tiles: int = 16  # image tiles, as at inference
    video_frames: int = 8
    media_cache_mb: int = 1024  # decoded tiles kept in memory between the read pass and the batches


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class TrainSection:
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    bf16: str | bool = "auto"  # bf16 autocast; auto = on for cuda
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    loss_chunk: int = 4096  # tokens per cross-entropy chunk (never the full [tokens, vocab] logits)
    out_dir: str = "runs/llama4"
    progress: bool = True  # the stderr progress line
    plot_every: int = 0  # write PNG plots every N steps (0 = only at the end)


@dataclass
class CheckpointSection:
    every: int = 500  # steps between saves (0 = only the final one)
    keep: int = 2  # newest checkpoints kept; older ones are deleted after a successful save


@dataclass
class MoESection:
    # Portable by default: the auxiliary loss balances through the weights alone, which every framework
    # reads. A loss-free routing bias (bias_update_rate > 0) lives in expert_bias.json, which transformers,
    # vLLM and llama.cpp ignore: they would compute a different model (docs/checkpoints.md, figures).
    bias_update_rate: float = 0.0  # loss-free balancing step (DeepSeek-V3); 0 = off
    aux_loss_coef: float = 1e-2  # load-balancing auxiliary loss weight; 0 = off


@dataclass
class LoRASection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])


@dataclass
class ParallelSection:
    # world size = dp_replicate * dp_shard * tp; expert-parallel ranks are taken from the dp_shard ranks.
    dp_replicate: int = 1  # full replicas (HSDP's outer dim)
    dp_shard: int = -1  # FSDP2 shards; -1 = whatever the world size leaves
    tp: int = 1  # tensor parallel: attention heads and dense FFN columns
    ep: int = 1  # expert parallel: routed experts split over this many ranks
    compile: bool = False  # torch.compile each decoder block


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    moe: MoESection = field(default_factory=MoESection)
    lora: LoRASection = field(default_factory=LoRASection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict:
        return asdict(self)


LORA_TARGETS = ("attention", "experts")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Build and validate; every unknown section or key raises ValueError naming it and the known ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table of sections, got {type(d).__name__}")
    sections = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; expected {sorted(sections)}")
    built = {}
    for name, f in sections.items():
        cls = f.default_factory().__class__
        values = d.get(name, {})
        if not isinstance(values, dict):
            raise ValueError(f"{where}: [{name}] must be a table, got {values!r}")
        known = {x.name for x in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in bad]}; [{name}] takes {sorted(known)}")
        built[name] = cls(**values)
    cfg = TrainConfig(**built)
    _validate(cfg, where)
    return cfg


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file (or start from defaults when `path` is None) and apply `section.key=value` overrides.
    Relative data, tokenizer, checkpoint and output paths resolve against the file's directory."""
    d: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        where = str(path)
        _resolve_paths(d, path.parent)
    return config_from_dict(apply_overrides(d, overrides, where), where)


def apply_overrides(d: dict, overrides: list[str], where: str = "config") -> dict:
    """A copy of the section tables `d` with `section.key=value` strings applied."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
        d.setdefault(parts[0], {})
        if not isinstance(d[parts[0]], dict):
            raise ValueError(f"override {item!r}: [{parts[0]}] is not a table in {where}")
        d[parts[0]][parts[1]] = _parse_value(raw.strip())
    return d


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: a path or a name


def _resolve_paths(d: dict, base: Path) -> None:
    def rel(p):
        return p if not isinstance(p, str) or Path(p).is_absolute() else str(base / p)

    data, model, train = d.get("data", {}), d.get("model", {}), d.get("train", {})
    if isinstance(data, dict):
        if isinstance(data.get("paths"), list):
            data["paths"] = [rel(p) for p in data["paths"]]
        if "tokenizer" in data:
            data["tokenizer"] = rel(data["tokenizer"])
    if isinstance(model, dict) and "checkpoint" in model:
        model["checkpoint"] = rel(model["checkpoint"])
    if isinstance(train, dict) and "out_dir" in train:
        train["out_dir"] = rel(train["out_dir"])


def _validate(c: TrainConfig, where: str) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {msg}")

    for sec in fields(TrainConfig):
        obj = getattr(c, sec.name)
        for f in fields(obj):
            wrong = type_error(getattr(obj, f.name), f.type)
            need(wrong is None, f"{sec.name}.{f.name} = {getattr(obj, f.name)!r} has the wrong type; {wrong}")
    need(c.model.preset is not None or c.model.checkpoint is not None,
         "[model] needs preset or checkpoint")
    need(isinstance(c.data.paths, list) and all(isinstance(p, str) for p in c.data.paths),
         f"data.paths must be a list of file paths, got {c.data.paths!r}")
    for name in ("seq_len", "batch_size", "max_tiles", "video_frames"):
        need(getattr(c.data, name) >= 1, f"data.{name} must be >= 1, got {getattr(c.data, name)}")
    need(c.optim.lr > 0, f"optim.lr must be > 0, got {c.optim.lr}")
    need(0 <= c.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {c.optim.min_lr_ratio}")
    need(c.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {c.optim.warmup_steps}")
    need(len(c.optim.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                         for b in c.optim.betas),
         f"optim.betas must be two numbers in [0, 1), got {c.optim.betas}")
    need(c.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {c.optim.grad_clip}")
    need(c.train.steps >= 1, f"train.steps must be >= 1, got {c.train.steps}")
    need(c.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {c.train.grad_accum}")
    need(c.train.loss_chunk >= 1, f"train.loss_chunk must be >= 1, got {c.train.loss_chunk}")
    need(c.train.device == "auto" or c.train.device.split(":")[0] in DEVICE_TYPES,
         f"train.device = {c.train.device!r} is not a device this trainer runs on; expected \"auto\" or one of "
         f"{list(DEVICE_TYPES)} (optionally with an index, e.g. \"cuda:1\")")
    need(c.train.bf16 in ("auto", True, False), f"train.bf16 must be true, false or \"auto\", got {c.train.bf16!r}")
    need(c.checkpoint.every >= 0 and c.checkpoint.keep >= 1,
         f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {c.checkpoint.every}, {c.checkpoint.keep}")
    need(c.moe.bias_update_rate >= 0 and c.moe.aux_loss_coef >= 0,
         f"moe.bias_update_rate and moe.aux_loss_coef must be >= 0, got {c.moe.bias_update_rate}, "
         f"{c.moe.aux_loss_coef}")
    need(c.lora.rank >= 1, f"lora.rank must be >= 1, got {c.lora.rank}")
    p = c.parallel
    need(all(v >= 1 for v in (p.dp_replicate, p.tp, p.ep)) and (p.dp_shard >= 1 or p.dp_shard == -1),
         f"parallel.dp_replicate, tp and ep must be >= 1 and parallel.dp_shard >= 1 or -1, got "
         f"dp_replicate={p.dp_replicate}, dp_shard={p.dp_shard}, tp={p.tp}, ep={p.ep}")
    bad = [t for t in c.lora.targets if t not in LORA_TARGETS]
    need(not bad and c.lora.targets,
         f"lora.targets {c.lora.targets} must be a non-empty subset of {list(LORA_TARGETS)}")


# Field types, read from the annotations (strings under `from __future__ import annotations`): unions
# of str, bool, int, float (an int is accepted), None, dict and list[...] of any of these.
_SCALARS = {"str": str, "bool": bool, "int": int, "float": float, "None": type(None), "dict": dict, "list": list}


def type_error(value, annotation: str) -> str | None:
    """None when `value` fits the annotation (e.g. "int | None", "list[float]"), else "expected ..."."""
    alternatives = _parse_type(annotation)
    return None if _matches(value, alternatives) else f"expected {_names(alternatives)}"


def _parse_type(annotation: str) -> list[tuple[type, list | None]]:
    """'int | None' -> [(int, None), (NoneType, None)]; 'list[int]' -> [(list, [(int, None)])]."""
    out = []
    for part in _split_union(annotation):
        base, _, inner = part.partition("[")
        if base not in _SCALARS or (inner and base not in ("list", "dict")):
            raise TypeError(f"train config: field annotation {annotation!r} is not one the type check knows")
        elem = _parse_type(inner[:-1]) if inner and base == "list" else None
        out.append((_SCALARS[base], elem))
    return out


def _split_union(annotation: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in annotation.replace(" ", ""):
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _matches(v, alternatives: list[tuple[type, list | None]]) -> bool:
    for base, elem in alternatives:
        if isinstance(v, bool) and base is not bool:
            continue  # bool is an int subclass; `steps = true` is still a mistake
        if base is float and isinstance(v, int) and not isinstance(v, bool):
            return True
        if isinstance(v, base) and (elem is None or all(_matches(x, elem) for x in v)):
            return True
    return False


def _names(alternatives: list[tuple[type, list | None]]) -> str:
    return " or ".join("null" if t is type(None) else f"list of {_names(e)}" if e else t.__name__
                       for t, e in alternatives)
