"""Distributed fine-tuning from an HF checkpoint on gloo CPU ranks: the checkpoint is read straight into
the parallelized model (each rank reads only its slices; the whole-model `load` is never called), the
losses equal a one-process fine-tune, and (slow) peak RSS per rank stays below a whole load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llama4
from llama4.model import Llama4
from llama4.train.distributed import spawn

from test_parallel import _close, _losses, _torchrun  # noqa: F401
from test_train_parts import corpus_text, tok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


def _hf_checkpoint(tok, d: Path, dtype=torch.float32, with_tokenizer: bool = True, **over) -> Path:
    """A text-only random checkpoint whose vocabulary and special ids are the tokenizer's, with a
    nonzero routing bias (it must reach every rank)."""
    cfg = llama4.preset("tiny").replace(**{"num_hidden_layers": 2, "vocab_size": tok.vocab_size,
                                           "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id,
                                           "eos_token_id": [tok.eos_id, tok.eom_id, tok.eot_id], **over})
    cfg.vision = None
    model = Llama4(cfg).init_weights(seed=5)
    with torch.no_grad():
        for block in model.layers:
            if hasattr(block.feed_forward, "expert_bias"):
                b_E = block.feed_forward.expert_bias
                b_E.copy_(torch.linspace(-0.05, 0.05, b_E.numel()))
    return llama4.save(model.to(dtype), d, max_shard_size="200KB",
                       tokenizer=tok if with_tokenizer else None)


def _sections(tok, ckpt: Path, tmp: Path, steps: int, parallel: dict | None = None, seq_len: int = 48) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "corpus.txt"
    corpus.write_text(corpus_text())
    return {"model": {"checkpoint": str(ckpt)},
            "data": {"paths": [str(corpus)], "tokenizer": str(tok.path), "seq_len": seq_len, "batch_size": 4},
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "moe": {"bias_update_rate": 0.01},
            "train": {"steps": steps, "progress": False, "out_dir": str(tmp / "run")},
            "parallel": parallel or {}}


def _finetune_worker(sections: dict, ckpt: str) -> dict:
    """Build the distributed trainer from the checkpoint with the whole-model loader disabled, compare
    its weights with the checkpoint's, and train."""
    import llama4.checkpoint
    from llama4.train.parallel_trainer import ParallelTrainer
    from llama4.train.loop import as_config

    whole = llama4.load(ckpt, dtype=torch.float32)

    def refuse(*a, **k):
        raise AssertionError("the distributed trainer loaded the whole checkpoint on a rank")

    real, llama4.checkpoint.load = llama4.checkpoint.load, refuse
    try:
        trainer = ParallelTrainer(as_config(sections, []))
    finally:
        llama4.checkpoint.load = real
    got = trainer.model.state_dict()
    differ = [k for k, v in whole.state_dict().items()
              if not torch.equal(got[k].full_tensor() if hasattr(got[k], "full_tensor") else got[k], v)]
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.model.parameters())
    trainer.train()
    return {"differ": differ, "held": held, "total": sum(p.numel() for p in whole.parameters())}


def test_distributed_finetune_reads_shards_and_equals_one_process(tok, tmp_path):
    from llama4.train import run

    ckpt = _hf_checkpoint(tok, tmp_path / "hf")
    single = _losses(run(_sections(tok, ckpt, tmp_path / "one", 3, seq_len=32)))
    par = _sections(tok, ckpt, tmp_path / "two", 3, {"dp_shard": 2, "ep": 2}, seq_len=32)
    for r in spawn(_finetune_worker, 2, par, str(ckpt)):
        assert not r["differ"], r["differ"]  # every weight, and the routing bias, as in the checkpoint
        assert r["held"] < 0.6 * r["total"], r  # each rank holds about half
    got = _losses(tmp_path / "two" / "run")
    assert len(got) == 3 and _close(got, single) < 1e-4, (got, single)


def test_distributed_finetune_refuses_a_tokenizer_bigger_than_the_checkpoint(tok, tmp_path):
    ckpt = _hf_checkpoint(tok, tmp_path / "hf", with_tokenizer=False, vocab_size=tok.vocab_size - 1)
    sections = _sections(tok, ckpt, tmp_path, 1, {"dp_shard": 1})
    with pytest.raises(RuntimeError, match=f"has {tok.vocab_size} ids but checkpoint .* has vocab_size="):
        spawn(_finetune_worker, 1, sections, str(ckpt))  # refused before any collective


@pytest.mark.slow
def test_torchrun_finetune_from_hf_checkpoint_equals_one_process(tok, tmp_path):
    """The CLI path, 20 steps: `torchrun -m llama4 train --config F model.checkpoint=DIR` under FSDP+EP."""
    from llama4.train import run

    ckpt = _hf_checkpoint(tok, tmp_path / "hf")
    single = _losses(run(_sections(tok, ckpt, tmp_path / "one", 20)))
    cfg = tmp_path / "train.toml"
    s = _sections(tok, ckpt, tmp_path / "two", 20)
    cfg.write_text(f"""
[data]
paths = {json.dumps(s['data']['paths'])}
tokenizer = "{tok.path}"
seq_len = 48
batch_size = 4
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = 20
progress = false
[moe]
bias_update_rate = 0.01
""")
    _torchrun(2, "--config", str(cfg), f"model.checkpoint={ckpt}", "parallel.dp_shard=2", "parallel.ep=2",
              f"train.out_dir={tmp_path / 'two' / 'run'}")
    got = _losses(tmp_path / "two" / "run")
    assert len(got) == 20 and _close(got, single) < 1e-4, (got, single)


# Peak RSS per rank -------------------------------------------------------------------------------------
def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def _rss_worker(sections: dict) -> dict:
    """Peak RSS growth of building the trainer (one-process `Trainer` on one rank, else the distributed
    one) from the checkpoint."""
    import torch.distributed as dist

    from llama4.config import load_config
    from llama4.train.loop import Trainer, as_config
    from llama4.train.parallel import build_mesh, make_plan, parallelize
    from llama4.train.parallel_trainer import ParallelTrainer

    cfg = as_config(sections, [])
    world = dist.get_world_size()
    if world > 1:  # the first parallelize imports FSDP / DTensor: not the load's cost
        mc = load_config(Path(cfg.model.checkpoint) / "config.json")
        plan = make_plan(world, mc.text, ep=cfg.parallel.ep)
        mesh = build_mesh(plan, "cpu")
        with torch.device("meta"):
            parallelize(Llama4(mc), mesh, plan)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the present RSS
    before = _peak_rss()
    trainer = (ParallelTrainer if world > 1 else Trainer)(cfg)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in trainer.model.parameters())
    return {"grew": _peak_rss() - before, "held": held}


@pytest.mark.slow
def test_distributed_finetune_peak_rss_per_rank_below_a_whole_load(tok, tmp_path):
    # ~140 MB of fp32 weights: large beside the processes' own noise
    ckpt = _hf_checkpoint(tok, tmp_path / "hf", hidden_size=256, vocab_size=32000, intermediate_size=1024,
                          intermediate_size_mlp=2048, num_local_experts=8, num_hidden_layers=4)
    full = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
    whole = spawn(_rss_worker, 1, _sections(tok, ckpt, tmp_path / "one", 1, seq_len=32))[0]
    ranks = spawn(_rss_worker, 2, _sections(tok, ckpt, tmp_path / "two", 1, {"ep": 2}, seq_len=32))
    assert whole["grew"] > 0.9 * full, (whole, full)  # the measure sees a whole load
    for r in ranks:
        assert r["held"] < full / 2 * 1.05, (r, full)
        # Its half of the weights plus no more than the one-process trainer's own overhead (tokenizer,
        # data, buffers: what it grew beyond the weights), and well under the one-process peak.
        assert r["grew"] < full / 2 + (whole["grew"] - full), (r, whole, full)
        assert r["grew"] < 0.6 * whole["grew"], (r, whole, full)
