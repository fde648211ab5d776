"""Training on several ranks: the one-process `Trainer` with the model parallelized, the data split by
data-parallel rank, the sums that make a step equal the one-process step, and DCP checkpoints.

What keeps N ranks equal to one process:
  - every rank reads the same global batch of `data.batch_size` rows and collates only its own
    `batch_size / dp` rows (tensor-parallel ranks share theirs);
  - each rank's loss is divided by the *global* target count and gradients are summed, not averaged
    (`parallelize`), so the reduced gradient is the one-process gradient;
  - expert token counts are summed over the data-parallel ranks (each routes its own tokens over all
    experts) before the bias step and inside the auxiliary loss (`balance.py`);
  - the gradient norm for clipping is taken over every shard on every mesh.
Logs, metrics, plots and progress come from rank 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config import config_to_hf
from . import dist_checkpoint
from .checkpointing import latest_checkpoint
from .config import TrainConfig
from .distributed import all_sum, init_from_env
from .loop import Trainer
from .parallel import build_mesh, make_plan, parallelize


def run_parallel(config, *, resume: bool = False, overrides: list[str] = ()) -> Path:
    """`loop.run` for a process of a torchrun launch: all ranks call it; returns the output dir."""
    from .loop import as_config

    return ParallelTrainer(as_config(config, overrides), resume=resume).train()


class ParallelTrainer(Trainer):
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        init_from_env()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.main = self.rank == 0
        if cfg.lora.enabled:
            raise ValueError("lora.enabled: LoRA runs are single-process; drop [parallel] / torchrun for them")
        # Activation checkpointing is one of parallelize()'s steps here, not the loop's.
        self.checkpointing = cfg.train.activation_checkpointing
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=False))
        self.pending = None
        super().__init__(cfg, resume)
        self.cfg.train.activation_checkpointing = self.checkpointing  # as given, in train_config.json
        self.dp_group = self.mesh["dp"].get_group()
        self.dp_rank, self.dp = self.mesh["dp"].get_local_rank(), self.plan.dp
        self.balancer.group = self.dp_group  # counts and aux-loss shares summed over the data-parallel ranks
        if cfg.data.batch_size % self.dp:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is the global batch; it must divide over "
                             f"the {self.dp} data-parallel ranks of plan [{self.plan}]")
        self._shard_data()
        self.ckpt_group = dist.new_group(backend="gloo")

    # Model -------------------------------------------------------------------------------------------
    def build_model(self):
        if self.cfg.model.checkpoint is not None:
            return self._load_sharded(self.cfg.model.checkpoint)
        model = super().build_model()
        self._make_plan(model.config.text)
        return parallelize(model, self.mesh, self.plan)

    def _make_plan(self, text) -> None:
        p = self.cfg.parallel
        self.plan = make_plan(self.world, text, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard,
                              tp=p.tp, ep=p.ep, compile=p.compile, checkpointing=self.checkpointing)
        self.mesh = build_mesh(self.plan, self.device.type)

    def _load_sharded(self, ckpt):
        """Fine-tuning: the HF checkpoint read straight into the parallelized model, each rank reading only
        the slices it owns (never the whole model on any rank), in fp32 (the master weights)."""
        from ..checkpoint.hub import resolve_checkpoint
        from ..checkpoint.sharded import load_sharded
        from ..config import load_config
        from .loop import check_tokenizer_fits

        root = resolve_checkpoint(ckpt)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"model.checkpoint={ckpt}: {root} has no config.json; a distributed run "
                                    f"reads an HF safetensors checkpoint (convert Meta's format with "
                                    f"`llama4 convert` first)")
        mc = load_config(root / "config.json")
        check_tokenizer_fits(mc, self.tok, ckpt)
        self._make_plan(mc.text)
        return load_sharded(root, lambda m: parallelize(m, self.mesh, self.plan), dtype=torch.float32,
                            device=self.device)

    def build_optimizer(self):
        opt = super().build_optimizer()
        if len({isinstance(p, DTensor) for p in self.params}) > 1:
            # Tensor parallel without FSDP leaves norms and router plain beside DTensor shards; the fused
            # and foreach kernels take one kind per call, so step parameter by parameter.
            for g in opt.param_groups:
                g["fused"], g["foreach"] = False, False
        return opt

    # Data --------------------------------------------------------------------------------------------
    def _shard_data(self) -> None:
        data, share = self.data, self.cfg.data.batch_size // self.dp
        lo = self.dp_rank * share

        def next_batch():
            return data.collate(data.next_rows()[lo:lo + share])
        data.next_batch = next_batch

    def count_targets(self, batches: list) -> int:
        return int(all_sum([sum(b.n_targets for b in batches)], self.dp_group)[0])

    # Step --------------------------------------------------------------------------------------------
    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over shards on different meshes (FSDP, TP, EP); then clip."""
        groups = defaultdict(list)
        for p in self.params:
            if p.grad is not None:
                g = p.grad
                groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
        norms = []
        for grads in groups.values():
            n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        total = torch.stack(norms).norm() if norms else torch.zeros(())
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for grads in groups.values():
                torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
        return total

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        row = super().train_step()
        loss, aux, tokens = all_sum([row["loss"], row.get("aux_loss") or 0.0, row["tokens"]], self.dp_group).tolist()
        row.update(loss=loss, tokens=int(tokens), tokens_per_s=tokens / (time.perf_counter() - t0))
        if row.get("aux_loss") is not None:
            row["aux_loss"] = aux
        return row

    def train(self) -> Path:
        try:
            return super().train()
        finally:
            if self.pending is not None:
                self.pending.finish()
                self.pending = None

    # Checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path:
        if self.pending is not None:
            self.pending.finish()
        state = {"step": self.step, "scheduler": self.sched.state_dict(), "data": dict(self.data.state),
                 "rng": dist_checkpoint.rng_state(), "config": self.cfg.to_dict(), "plan": str(self.plan),
                 "world_size": self.world, "expert_bias": {k: v.tolist() for k, v in self.balancer.biases().items()}}
        last = self.step >= self.cfg.train.steps
        self.pending = dist_checkpoint.save(self.out / "checkpoints", self.step, self.model, self.opt, state,
                                            config_to_hf(self.model.config), self.cfg.checkpoint.keep,
                                            async_group=None if last else self.ckpt_group)
        final = self.pending.final
        if last:
            self.pending.finish()
            self.pending = None
        return final

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        if not dist_checkpoint.is_dcp_checkpoint(ckpt):
            raise ValueError(f"--resume: {ckpt} is a one-process checkpoint; resume it without torchrun, or "
                             f"start the distributed run from it with model.checkpoint={ckpt}")
        state = dist_checkpoint.load(ckpt, self.model, self.opt)
        self.balancer.load_biases({k: torch.tensor(v) for k, v in state["expert_bias"].items()}, str(ckpt))
        self.sched.load_state_dict(state["scheduler"])
        self.data.state = dict(state["data"])
        dist_checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        if self.main:  # forget metrics logged after that checkpoint: the resumed run logs them again
            metrics = self.out / "metrics.jsonl"
            if metrics.is_file():
                keep = [ln for ln in metrics.read_text().splitlines()
                        if ln.strip() and json.loads(ln)["step"] <= self.step]
                metrics.write_text("".join(ln + "\n" for ln in keep))
        dist.barrier()
