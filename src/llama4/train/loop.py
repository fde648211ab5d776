"""The training loop: `run(config)` trains (or fine-tunes) a Llama 4 model and returns its output directory.

One optimizer step = `grad_accum` micro-batches. The loss is the mean over every target token of the
step (not a mean of micro-batch means), so accumulation equals a bigger batch. Order of a step:
forward under bf16 autocast -> chunked cross-entropy (+ auxiliary balancing loss) -> backward ->
clip -> AdamW -> schedule -> expert-bias update -> log -> maybe checkpoint.

Output directory: metrics.jsonl (one line per step), loss.png, expert_load.png, checkpoints/step_*/,
train_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ..checkpoint.atomic import Snapshot
from ..checkpoint.safetensors_io import read_header
from ..config import config_to_hf, preset
from ..model import Llama4
from ..checkpoint.side_files import SideInfo
from ..text.tokenizer import Tokenizer
from .balance import ExpertBalancer, imbalance
from .checkpointing import (check_same_run, checkpoints, latest_checkpoint, load_train_state, move_aside, rng_state,
                            save_checkpoint, set_rng_state)
from .config import TrainConfig, apply_overrides, config_from_dict, load_train_config
from .data import IGNORE, Encoder, PackedData, read_documents
from .loss import chunked_cross_entropy
from .plots import plot_run

log = logging.getLogger("llama4")


def run(config: TrainConfig | dict | str | Path, *, resume: bool = False, overrides: list[str] = ()) -> Path:
    """Train as `config` says (a TrainConfig, a dict of sections, or a TOML path); returns the output dir.

    With `resume`, continue from the newest checkpoint in the output directory: same data order,
    optimizer, schedule, RNG and expert biases, so the losses match an uninterrupted run.
    """
    cfg = as_config(config, overrides)
    p = cfg.parallel
    if max(p.dp_replicate, p.dp_shard, p.tp, p.ep) > 1:
        raise ValueError(f"[parallel] asks for several ranks ({p}); launch with torchrun --nproc-per-node N "
                         f"-m llama4 train ...")
    return Trainer(cfg, resume=resume).train()


def as_config(config, overrides) -> TrainConfig:
    if isinstance(config, TrainConfig):
        if overrides:
            raise ValueError("overrides apply to a TOML file or a dict of sections, not to a TrainConfig")
        return config
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(config, list(overrides)))
    return load_train_config(config, list(overrides))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device = {name!r}: {e}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ValueError(f"train.device = {name!r}, but this machine has no {device.type.upper()} device that torch "
                         f"can use (torch {torch.__version__}); use \"cpu\" or \"auto\"")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"train.device = {name!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.data.tokenizer is not None:
        return Tokenizer(cfg.data.tokenizer)
    ckpt = cfg.model.checkpoint
    if ckpt is not None and any((Path(ckpt) / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return Tokenizer(ckpt)
    return Tokenizer()


def build_model(cfg: TrainConfig, tok: Tokenizer, device: torch.device) -> Llama4:
    """A loaded checkpoint (fine-tuning) or a preset with random weights, in fp32 (the master weights)."""
    from ..checkpoint import load

    sp = tok.special_tokens
    if cfg.model.checkpoint is not None:
        model = load(cfg.model.checkpoint, dtype=torch.float32, device=device)
        check_tokenizer_fits(model.config, tok, cfg.model.checkpoint)
        return model
    text = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id,
            "eos_token_id": [tok.eos_id, tok.eom_id, tok.eot_id], **cfg.model.overrides}
    try:
        mc = preset(cfg.model.preset).replace(**text)
    except TypeError as e:
        raise ValueError(f"model.overrides: {e} (keys must be text config fields)") from None
    except ValueError as e:
        raise ValueError(f"model.overrides: {e}") from None
    if cfg.model.text_only:
        mc.vision = None
    elif cfg.model.vision_overrides:
        try:
            mc.vision = dataclasses.replace(mc.vision, **cfg.model.vision_overrides)
        except TypeError as e:
            raise ValueError(f"model.vision_overrides: {e} (keys must be vision config fields)") from None
        except ValueError as e:
            raise ValueError(f"model.vision_overrides: {e}") from None
    mc.image_token_index, mc.boi_token_index, mc.eoi_token_index = \
        sp["<|patch|>"], sp["<|image_start|>"], sp["<|image_end|>"]
    if tok.vocab_size > mc.text.vocab_size:
        raise ValueError(f"model.overrides.vocab_size={mc.text.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} ids")
    with torch.device(device):
        model = Llama4(mc)
    return model.init_weights(cfg.model.init_std, seed=cfg.train.seed)


def check_tokenizer_fits(mc, tok: Tokenizer, ckpt) -> None:
    """The tokenizer's ids must exist in checkpoint `ckpt`'s model (config `mc`), its <|patch|> must be
    the model's image token."""
    if tok.vocab_size > mc.text.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but checkpoint {ckpt} "
                         f"has vocab_size={mc.text.vocab_size}")
    patch = tok.special_tokens["<|patch|>"]
    if mc.vision is not None and mc.image_token_index != patch:
        raise ValueError(f"tokenizer {tok.path} has <|patch|> = {patch} but the checkpoint's "
                         f"image_token_index is {mc.image_token_index}; use the checkpoint's tokenizer")


def lr_lambda(cfg: TrainConfig):
    o, steps = cfg.optim, cfg.train.steps

    def f(step: int) -> float:  # linear warmup, then cosine from lr down to lr * min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    o = cfg.optim
    # Decay matrices only: norms and biases stay free (their scale is the point of them).
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)


def checkpoint_layers(model: Llama4) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations: every block is
    wrapped from outside (`checkpoint_wrapper`, non-reentrant), so the model code is untouched and
    FSDP / compile see an ordinary module. state_dict keys keep their names (the wrapper strips its
    prefix); attribute access falls through to the block."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


class Progress:
    """One stderr line, rewritten in place: step, loss, tokens/s and ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()
        self.threads = torch.get_num_threads()  # shown: a slow setting should be visible at a glance

    def update(self, step: int, start_step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        done = step - start_step
        per_step = (time.perf_counter() - self.t0) / max(done, 1)
        eta = int(per_step * (self.total - step))
        bar = "#" * int(24 * step / self.total)
        sys.stderr.write(f"\rstep {step}/{self.total} [{bar:<24}] loss {loss:.4f}  {tok_s:,.0f} tok/s "
                         f"({self.threads} thread{'s' * (self.threads != 1)})  "
                         f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d} ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class Trainer:
    # Subclasses that run on several ranks (train/parallel_trainer.py) override the hooks marked below.
    main = True  # this process writes logs, metrics and plots

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        t = cfg.train
        self.device = pick_device(t.device)
        self.out = Path(t.out_dir)
        torch.manual_seed(t.seed)
        self.tok = load_tokenizer(cfg)
        self.model = self.build_model()
        window = self.model.config.text.max_position_embeddings
        if cfg.data.seq_len > window:
            raise ValueError(f"data.seq_len={cfg.data.seq_len} is beyond the model's window: max_position_embeddings="
                             f"{window}; lower seq_len (or raise model.overrides.max_position_embeddings for a "
                             f"preset)")
        encoder = Encoder(self.tok, self.model.config, cfg.data)
        docs = read_documents(cfg.data.paths, encoder)
        self.data = PackedData(docs, encoder, cfg.data, t.seed, self.tok.pad_id)
        if cfg.lora.enabled:
            from .lora import add_lora

            self.params = add_lora(self.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=t.seed)
        else:
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        if t.activation_checkpointing:
            checkpoint_layers(self.model)
        self.opt = self.build_optimizer()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.balancer = ExpertBalancer(self.model, cfg.moe.bias_update_rate, cfg.moe.aux_loss_coef)
        bf16 = t.bf16 if t.bf16 != "auto" else self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.step = 0
        if resume:
            self._restore()
        elif latest_checkpoint(self.out) is not None:
            raise ValueError(f"train.out_dir {self.out} already holds checkpoints; pass --resume to continue "
                             f"that run or choose another out_dir")

    def build_model(self) -> Llama4:  # hook
        return build_model(self.cfg, self.tok, self.device)

    def build_optimizer(self) -> torch.optim.Optimizer:  # hook
        return make_optimizer(self.params, self.cfg)

    def count_targets(self, batches: list) -> int:  # hook: the step's target tokens, over every rank
        return sum(b.n_targets for b in batches)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:  # hook
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)

    def _restore(self) -> None:
        found = checkpoints(self.out)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        damaged = []
        for ckpt in reversed(found):  # the newest that reads back whole
            try:
                state, biases, weights = self._read_checkpoint(ckpt)
                break
            except (ValueError, FileNotFoundError, OSError) as e:
                damaged.append(ckpt)
                log.warning("--resume: %s is damaged or unreadable (%s); trying the previous checkpoint", ckpt, e)
        else:
            raise ValueError(f"--resume: no intact checkpoint in {self.out / 'checkpoints'} (see the warnings above "
                             f"for each one's problem)")
        check_same_run(state.get("config", {}), self.cfg.to_dict(), ckpt)
        if hasattr(self.model, "lora_config"):
            from .lora import load_adapter_into

            load_adapter_into(self.model, ckpt / "adapter", weights)
        else:
            mine, theirs = config_to_hf(self.model.config), config_to_hf(weights.config)
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if differ:
                raise ValueError(f"--resume: the model of {ckpt} differs from the one this config builds in "
                                 f"{differ} (a changed tokenizer or preset?)")
            self.model.load_state_dict(weights.state_dict())
        self.balancer.load_biases(biases, str(ckpt))
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise ValueError(f"--resume: {ckpt}: its optimizer, scheduler or RNG state does not fit this run "
                             f"({type(e).__name__}: {e})") from None
        self.data.state = dict(state["data"])
        self.step = state["step"]
        for d in damaged:
            log.warning("--resume: resuming from %s; moved the damaged %s aside to %s", ckpt.name, d.name,
                        move_aside(d).name)
        # Forget metrics logged after that checkpoint: the resumed run logs those steps again.
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():
            keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))

    @staticmethod
    def _read_checkpoint(ckpt: Path):
        """(state, biases, weights) of a checkpoint, read whole: the model, or the adapter file for LoRA."""
        state, biases = load_train_state(ckpt)
        if (ckpt / "adapter").is_dir():
            from .lora import ADAPTER_FILE

            weights = Snapshot(ckpt).file(f"adapter/{ADAPTER_FILE}")
            if weights is None:
                raise FileNotFoundError(f"{ckpt}: no adapter/{ADAPTER_FILE}")
            read_header(weights)  # whole and well formed
            return state, biases, weights
        from ..checkpoint import load

        return state, biases, load(ckpt, dtype=torch.float32)

    def train(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        progress = Progress(t.steps, t.progress and self.main)
        start = self.step
        metrics = self.out / "metrics.jsonl" if self.main else os.devnull
        with open(metrics, "a" if self.resume else "w") as log:
            while self.step < t.steps:
                row = self.train_step()
                log.write(json.dumps(row) + "\n")
                log.flush()
                progress.update(self.step, start, row["loss"], row["tokens_per_s"])
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps:
                    self.save()
                if t.plot_every and self.step % t.plot_every == 0 and self.main:
                    plot_run(self.out)
        progress.close()
        last = latest_checkpoint(self.out)
        if last is None or last.name != f"step_{self.step:07d}":
            self.save()
        if self.main:
            plot_run(self.out)
        return self.out

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        model, t = self.model, self.cfg.train
        model.train()
        batches = [self.data.next_batch() for _ in range(t.grad_accum)]
        n_targets = max(1, self.count_targets(batches))
        loss_sum, aux_sum = 0.0, 0.0
        # Adapters: compute each merged weight once per forward, not at every use.
        cached = parametrize.cached if self.cfg.lora.enabled else nullcontext
        for b in batches:
            ids = b.input_ids.to(self.device, non_blocking=True)
            labels = b.labels.to(self.device, non_blocking=True)
            pixels = None if b.pixel_values is None else b.pixel_values.to(self.device)
            doc_pos = None if b.doc_pos is None else b.doc_pos.to(self.device)
            self.balancer.begin()
            mask = b.token_mask.to(self.device, non_blocking=True)
            with cached(), self.autocast():
                h_BTD = model(ids, pixels, return_hidden=True, doc_pos=doc_pos, token_mask=mask)
                keep = labels != IGNORE
                loss = chunked_cross_entropy(h_BTD[keep], model.output, labels[keep],
                                             chunk=t.loss_chunk, norm=n_targets)
                aux = self.balancer.collect()
                total = loss if aux is None else loss + aux / t.grad_accum
            total.backward()
            loss_sum += loss.item()
            aux_sum += 0.0 if aux is None else aux.item() / t.grad_accum
        clip = self.cfg.optim.grad_clip
        grad_norm = self.clip_gradients(clip if clip > 0 else float("inf"))
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        load = self.balancer.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = sum(b.n_tokens for b in batches)
        row = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
               "targets": n_targets, "tokens_per_s": tokens / dt, "step_s": dt, "epoch": self.data.state["epoch"]}
        if self.balancer.moes:
            row["aux_loss"] = aux_sum if self.cfg.moe.aux_loss_coef else None
            row["expert_load"] = {str(i): v for i, v in zip(self.balancer.layers, load)}
            row["imbalance"] = imbalance(load)
        if not math.isfinite(loss_sum):
            raise ValueError(f"loss is {loss_sum} at step {self.step}: training diverged (lower optim.lr?); "
                             f"checkpoints so far are kept")
        return row

    def save(self) -> Path:
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "data": dict(self.data.state), "rng": rng_state(), "config": self.cfg.to_dict()}
        tok_file = self.tok.path if self.tok.path.is_file() else None
        # The media settings the model learns with travel with it: generate/chat/eval default to them.
        self.model.side_info = SideInfo(tok_file, media={"num_frames": self.cfg.data.video_frames,
                                                         "max_tiles": self.cfg.data.max_tiles})
        return save_checkpoint(self.out, self.step, self.model, state, self.balancer.biases(), tok_file,
                               self.cfg.checkpoint.keep)
