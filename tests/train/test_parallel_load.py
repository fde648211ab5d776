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


def test_sharded_hf_load_equals_one_process(tmp_path):
    ckpt = _save_tiny(tmp_path)
    plans = [{"dp_shard": 2, "ep": 2}, {"tp": 2}, {"dp_shard": 2, "checkpointing": True}]
    for errs in spawn(_load_worker, 2, str(ckpt), plans):
        assert max(errs) < 1e-5, dict(zip(map(str, plans), errs))


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
