"""An HF checkpoint read straight into a sharded model on gloo CPU ranks: the same logits as a
one-process load, every rank reading only its slices (peak RSS per rank measured, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama4.checkpoint import load, save
from llama4.config import preset
from llama4.model import Llama4
from llama4.train.distributed import spawn

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


def _save_tiny(d: Path, dtype=torch.bfloat16, **over) -> Path:
    cfg = preset("tiny").replace(**{"num_hidden_layers": 2, "vocab_size": 512, **over})
    cfg.vision = None
    model = Llama4(cfg).init_weights(seed=0)
    with torch.no_grad():  # a trained-looking routing bias, which travels in expert_bias.json
        bias_E = model.layers[1].feed_forward.expert_bias
        bias_E.copy_(torch.linspace(-0.1, 0.3, bias_E.numel()))
    return save(model.to(dtype), d / "hf", max_shard_size="100KB")  # several files


def _load_worker(ckpt: str, plans: list[dict]) -> list[float]:
    import torch.distributed as dist

    from llama4.checkpoint.sharded import load_sharded
    from llama4.train.parallel import build_mesh, make_plan, parallelize

    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    whole = load(ckpt, dtype=torch.float32)
    want = whole(ids)
    errs = []
    for kw in plans:
        plan = make_plan(dist.get_world_size(), whole.config.text, **kw)
        mesh = build_mesh(plan, "cpu")
        model = load_sharded(ckpt, lambda m: parallelize(m, mesh, plan), dtype=torch.float32)
        got = model(ids)
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        errs.append(float((got - want).abs().max() / want.abs().max()))
    return errs


LOAD_PLANS = [{"dp_shard": 2, "ep": 2}, {"tp": 2}, {"dp_shard": 2, "checkpointing": True}]


def _two_rank_worker(ckpt: str) -> tuple:
    return _load_worker(ckpt, LOAD_PLANS), _generate_worker(ckpt)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(checkpoint, each rank's results): the loading and generation checks share one pair of processes."""
    ckpt = _save_tiny(tmp_path_factory.mktemp("sharded"))
    return ckpt, spawn(_two_rank_worker, 2, str(ckpt))


def test_sharded_hf_load_equals_one_process(two_ranks):
    for errs, _ in two_ranks[1]:
        assert max(errs) < 1e-5, dict(zip(map(str, LOAD_PLANS), errs))


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def _rss_worker(ckpt: str, plan_kw: dict | None) -> dict:
    """Peak RSS growth of this process while it loads `ckpt` (sharded by `plan_kw`, or whole)."""
    import torch.distributed as dist

    from llama4.checkpoint.sharded import load_sharded
    from llama4.config import load_config
    from llama4.train.parallel import build_mesh, make_plan, parallelize

    cfg = load_config(Path(ckpt) / "config.json")
    shard = (lambda m: m)
    if plan_kw is not None:
        plan = make_plan(dist.get_world_size(), cfg.text, **plan_kw)
        mesh = build_mesh(plan, "cpu")
        shard = (lambda m: parallelize(m, mesh, plan))
    with torch.device("meta"):  # the first parallelize imports FSDP / DTensor / dynamo: not the load's cost
        shard(Llama4(cfg))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the present RSS
    before = _peak_rss()
    model = load_sharded(ckpt, shard, dtype=torch.float32)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    return {"grew": _peak_rss() - before, "held": held}


@pytest.mark.slow
@pytest.mark.parametrize("world,plan_kw", [(2, {"dp_shard": 2, "ep": 2}), (4, {"dp_shard": 4, "ep": 4})])
def test_sharded_hf_load_peak_rss_per_rank_near_one_nth(tmp_path, world, plan_kw):
    # ~150 MB of fp32 weights: large beside the processes' own noise
    ckpt = _save_tiny(tmp_path, dtype=torch.float32, hidden_size=256, vocab_size=32000, intermediate_size=1024,
                      intermediate_size_mlp=2048, num_local_experts=8, num_hidden_layers=4)
    full = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
    whole = spawn(_rss_worker, 1, str(ckpt), None)[0]
    ranks = spawn(_rss_worker, world, str(ckpt), plan_kw)
    assert whole["grew"] > 0.9 * full, (whole, full)  # the measure sees a whole load
    for r in ranks:
        assert r["held"] < full / world * 1.05, (r, full)
        assert r["grew"] < full * (1 / world + 0.1), (r, full, [x["grew"] / full for x in ranks])


# Distributed generation --------------------------------------------------------------------------------
PROMPTS = [[1, 7, 42, 99, 5], [300, 2, 17]]  # ragged: prefilled as a mixed batch


def _generate_worker(ckpt: str) -> dict:
    """Greedy tokens of the model split by TP, then by EP, over the ranks (no FSDP), each loaded with
    only this rank's slices."""
    import torch.distributed as dist

    from llama4 import generate_batch
    from llama4.train.parallel import load_parallel

    out = {}
    for name, kw in (("tp", {"tp": 2}), ("ep", {"ep": 2})):
        model = load_parallel(ckpt, dtype=torch.float32, **kw)
        out[name] = generate_batch(model, PROMPTS, max_new_tokens=12)
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        out[name + "_held"] = held
        dist.barrier()
    return out


def test_distributed_greedy_generation_equals_one_process(two_ranks):
    from llama4 import generate_batch

    ckpt, results = two_ranks
    whole = load(ckpt, dtype=torch.float32)
    want = generate_batch(whole, PROMPTS, max_new_tokens=12)
    n = sum(p.numel() for p in whole.parameters())
    for _, r in results:
        assert r["tp"] == want and r["ep"] == want, (r, want)
        assert r["tp_held"] < n and r["ep_held"] < n  # each rank holds only part of the model


@pytest.mark.slow
def test_torchrun_generate_tp_and_ep_equal_one_process(tmp_path):
    import os
    import subprocess
    import sys

    import llama4
    from llama4.text.bpe import train_tokenizer

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tok = llama4.Tokenizer(train_tokenizer([tmp_path / "corpus.txt"], 300, tmp_path / "tok"))
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=tok.vocab_size)
    cfg.vision = None
    ckpt = save(Llama4(cfg).init_weights(seed=0), tmp_path / "hf", tokenizer=tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(llama4.__file__).parents[1])}
    args = ["-m", "llama4", "generate", "--model", str(ckpt), "--prompt", "the quick brown", "--max-new-tokens",
            "16", "--temperature", "0", "--dtype", "fp32"]

    def run(*cmd):
        p = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        return p.stdout

    want = run(*args)
    assert want.strip()
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert run(*torchrun, *args, "--tp", "2") == want
    assert run(*torchrun, *args, "--ep", "2") == want
