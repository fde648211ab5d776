"""Scale-out on gloo CPU processes: the plan's checks, expert-parallel dispatch against local routing,
and (slow) torchrun training under FSDP2 / EP / TP equal to one process, with DCP checkpoints that
resume on another world size and export to HF."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama4
from llama4.config import preset
from llama4.train import config_from_dict
from llama4.train.distributed import spawn
from llama4.train.parallel import make_plan

from test_train_parts import corpus_text, tok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


# Plan --------------------------------------------------------------------------------------------------
def test_plan_fills_dp_shard_and_checks_sizes():
    text = preset("tiny").text  # 4 heads, 2 kv heads, 4 experts
    plan = make_plan(8, text, tp=2, ep=2)
    assert (plan.dp_replicate, plan.dp_shard, plan.tp, plan.ep, plan.dp) == (1, 4, 2, 2, 4)
    with pytest.raises(ValueError, match="world size is 6"):
        make_plan(6, text, dp_shard=4)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        make_plan(4, text, tp=4)
    with pytest.raises(ValueError, match="num_local_experts=4"):
        make_plan(8, text, ep=8)
    with pytest.raises(ValueError, match="ep=2 must divide dp_shard=1"):
        make_plan(2, text, tp=2, ep=2)
    with pytest.raises(ValueError, match="parallel.dp_shard"):
        config_from_dict({"parallel": {"dp_shard": 0}})


def test_parallel_sizes_without_torchrun_are_refused(tok, tmp_path):
    from llama4.train import run

    with pytest.raises(ValueError, match="torchrun"):
        run({"model": {"preset": "tiny", "text_only": True}, "data": {"tokenizer": str(tok.path)},
             "train": {"out_dir": str(tmp_path)}, "parallel": {"ep": 2}})


# Expert-parallel dispatch ------------------------------------------------------------------------------
def _ep_worker(tokens_per_rank: list[int]) -> tuple[float, float, float]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llama4.model.moe import MoE
    from llama4.train.expert_parallel import ExpertParallel

    r, world = dist.get_rank(), dist.get_world_size()
    text = preset("tiny").text.__class__(**{**preset("tiny").text.__dict__, "num_local_experts": 8,
                                           "num_experts_per_tok": 2})
    torch.manual_seed(0)
    moe = MoE(text)
    moe.init_weights(0.1)
    moe.experts.kernel = "loop"
    torch.manual_seed(100 + r)  # each rank routes its own tokens
    x = torch.randn(1, tokens_per_rank[r], text.hidden_size, requires_grad=True)
    local = copy.deepcopy(moe)
    local(x).square().sum().backward()
    gx_local, x.grad = x.grad.clone(), None
    g_local = local.experts.gate_up_proj.grad.clone()
    dist.all_reduce(g_local)  # every rank's tokens reach the experts
    moe.experts = ExpertParallel(moe.experts, init_device_mesh("cpu", (world,)))
    y = moe(x)
    y.square().sum().backward()
    n = 8 // world
    def rel(a, b):  # error relative to the reference's scale (summed squares make large gradients)
        return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))
    with torch.no_grad():
        y_local = local(x)
    return (rel(y.detach(), y_local), rel(x.grad, gx_local),
            rel(moe.experts.gate_up_proj.grad.to_local(), g_local[r * n:(r + 1) * n]))


def test_ep_all_to_all_equals_local_routing_with_idle_experts():
    # One rank routes a single token (top-2 of 8): most experts, and the other rank's whole half,
    # get no rows from it; outputs, input gradients and expert gradients still match.
    for dy, dx, dw in spawn(_ep_worker, 2, [9, 1]):
        assert dy < 1e-5 and dx < 1e-5 and dw < 1e-5, (dy, dx, dw)


@pytest.mark.slow
def test_ep_all_to_all_four_ranks():
    for dy, dx, dw in spawn(_ep_worker, 4, [3, 1, 7, 2]):
        assert dy < 1e-5 and dx < 1e-5 and dw < 1e-5, (dy, dx, dw)


# torchrun training -------------------------------------------------------------------------------------
def _config(tok, tmp_path: Path, steps: int = 20, every: int = 0) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    f = tmp_path / "train.toml"
    f.write_text(f"""
[model]
preset = "tiny"
text_only = true
overrides = {{num_hidden_layers = 2}}
[data]
paths = ["{corpus}"]
tokenizer = "{tok.path}"
seq_len = 48
batch_size = 4
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = {steps}
progress = false
[moe]
bias_update_rate = 0.01
[checkpoint]
every = {every}
""")
    return f


def _torchrun(n: int, *args: str, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(llama4.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "llama4", "train", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def _close(got: list[float], want: list[float]) -> float:
    """Largest relative difference. Reduction order differs across layouts (tensor parallel sums
    partial products), and AdamW's normalised steps carry an fp32 rounding difference along: after 20
    steps TP is ~2.5e-5 relative (1.5e-4 absolute) off, FSDP/EP ~1e-6."""
    return max(abs(a - b) / abs(b) for a, b in zip(got, want))


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tok, tmp_path_factory):
    """The one-process run every layout must reproduce (20 steps)."""
    d = tmp_path_factory.mktemp("single")
    from llama4.train import run

    return _losses(run(_config(tok, d), overrides=[f"train.out_dir={d / 'run'}"]))


@pytest.mark.slow
@pytest.mark.parametrize("n,plan", [(2, ["parallel.dp_shard=2"]), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"]),
                                    (4, ["parallel.tp=2", "parallel.ep=2"]),
                                    (4, ["parallel.dp_replicate=2", "parallel.ep=2"])])
def test_torchrun_training_equals_one_process(tok, tmp_path, single, n, plan):
    cfg = _config(tok, tmp_path)
    _torchrun(n, "--config", str(cfg), *plan, f"train.out_dir={tmp_path / 'run'}")
    got = _losses(tmp_path / "run")
    assert len(got) == 20
    assert _close(got, single) < 1e-4, (got, single)
    assert (tmp_path / "run" / "loss.png").is_file()  # rank 0 wrote the plots


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2)])
def test_dcp_resume_on_another_world_size(tok, tmp_path, single, before, after):
    import shutil

    cfg = _config(tok, tmp_path, every=10)
    out = tmp_path / "run"
    plan_of = {1: [], 2: ["parallel.ep=2"], 4: ["parallel.ep=2", "parallel.tp=2"]}
    _torchrun(before, "--config", str(cfg), *plan_of[before], f"train.out_dir={out}")
    shutil.rmtree(out / "checkpoints" / "step_0000020")  # as if the run had died after step 10's save
    _torchrun(after, "--config", str(cfg), *plan_of[after], f"train.out_dir={out}", "--resume")
    got = _losses(out)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 21))
    assert _close(got, single) < 1e-4, (got, single)
    # The DCP checkpoint exports to HF safetensors that llama4 (and so transformers) reads.
    from llama4.train.dist_checkpoint import export_hf

    hf = export_hf(out / "checkpoints" / "step_0000020", tmp_path / "hf", dtype=torch.float32)
    model = llama4.load(hf)
    assert model.layers[1].feed_forward.expert_bias.abs().sum() > 0


# Planner against measured shards -----------------------------------------------------------------------
def _state_bytes_worker(plan_kw: dict) -> float:
    """Bytes this rank holds for weights, gradients and AdamW moments after one FSDP(+EP) step."""
    import torch.distributed as dist

    from llama4.model import Llama4
    from llama4.train.parallel import build_mesh, parallelize

    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=4096)
    cfg.vision = None
    torch.manual_seed(0)
    model = Llama4(cfg).init_weights(seed=0)
    plan = make_plan(dist.get_world_size(), cfg.text, **plan_kw)
    parallelize(model, build_mesh(plan, "cpu"), plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 4096, (1, 16))
    model(ids).float().square().mean().backward()
    opt.step()

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    total = 0
    for p in model.parameters():
        total += 2 * local(p).numel() * 4  # weight + gradient, fp32
        st = opt.state[p]
        total += sum(local(st[k]).numel() * 4 for k in ("exp_avg", "exp_avg_sq"))
    return float(total)


@pytest.mark.slow
@pytest.mark.parametrize("world,plan_kw", [(2, {"ep": 2}), (4, {"ep": 2})])
def test_planner_training_state_matches_measured_shards(world, plan_kw):
    from llama4.planner import Request, estimate

    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=4096)
    cfg.vision = None
    measured = spawn(_state_bytes_worker, world, plan_kw)
    est = estimate(cfg, Request(gpus=world, gpu_bytes=80e9, train=True), 1, plan_kw["ep"])
    predicted = sum(v for k, v in est.terms.items() if k.startswith(("weights", "gradients", "optimizer")))
    for m in measured:
        assert abs(m - predicted) / m < 0.10, (m, predicted)


def test_plan_cli_scout_10m_context_fits(capsys):
    from llama4.cli import main

    assert main(["plan", "--model", "scout", "--context", "10000000", "--gpus", "8xH200", "--kv-dtype", "fp8",
                 "--quant", "int4"]) == 0
    out = capsys.readouterr().out
    for term in ("routed experts", "KV: chunked", "KV: global", "activations", "-> fits", "tp=8"):
        assert term in out, out
    assert main(["plan", "--model", "maverick", "--gpus", "8xH100"]) == 0  # bf16 Maverick: 800 GB
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--model", "scout", "--gpus", "8xQ9"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
