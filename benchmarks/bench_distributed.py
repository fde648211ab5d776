"""Distributed training mechanics on CPU ranks (gloo): tokens/s, peak RSS per rank and bytes moved by
collectives per step, for 1, 2 and 4 ranks under FSDP2 + expert parallel.

These figures check the mechanics (memory per rank falls, traffic is what the layout implies), not
speed: gloo over loopback on a shared 2-core machine is no model of NCCL on GPUs.

    flock /tmp/bench.lock env PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist

from llama4.config import preset
from llama4.model import Llama4
from llama4.train.distributed import spawn
from llama4.train.loss import chunked_cross_entropy
from llama4.train.parallel import build_mesh, make_plan, parallelize

COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "all_reduce",
               "reduce_scatter_single", "all_gather")


def _count_bytes(counter: dict) -> None:
    """Wrap torch.distributed's collectives to add up the bytes each rank sends in."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kw):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            src = tensors[1] if _name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
                                          "reduce_scatter_single") and len(tensors) > 1 else tensors[0]
            counter[_name] = counter.get(_name, 0) + src.numel() * src.element_size()
            return _fn(*args, **kw)
        setattr(dist, name, wrapped)


def _worker(layers: int, experts: int, batch: int, seq: int, steps: int, ep: int) -> dict:
    world = dist.get_world_size()
    cfg = preset("tiny").replace(num_hidden_layers=layers, vocab_size=8192, num_local_experts=experts,
                                 hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024)
    cfg.vision = None
    torch.manual_seed(0)
    model = Llama4(cfg).init_weights(seed=0)
    if world > 1:
        plan = make_plan(world, cfg.text, ep=min(ep, world))
        parallelize(model, build_mesh(plan, "cpu"), plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, 8192, (batch // world, seq + 1))
    counter: dict[str, int] = {}

    def step():
        h = model(ids[:, :-1], return_hidden=True)
        loss = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), model.output, ids[:, 1:].reshape(-1),
                                     norm=batch * seq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: lazy FSDP init, allocator
    _count_bytes(counter)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tok_s": batch * seq * steps / dt / world, "rss": rss,
            "bytes_per_step": {k: v / steps for k, v in counter.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ep", type=int, default=2)
    a = ap.parse_args()
    print(f"tiny-wide model: {a.layers} layers, D=256, {a.experts} experts; global batch {a.batch} x {a.seq}; "
          f"FSDP2 + ep={a.ep}; gloo, 1 thread per rank")
    print(f"{'ranks':>5} {'tok/s (all ranks)':>18} {'peak RSS/rank':>14} {'MiB sent/rank/step':>20}  by collective")
    for n in (int(x) for x in a.ranks.split(",")):
        res = spawn(_worker, n, a.layers, a.experts, a.batch, a.seq, a.steps, a.ep, timeout_s=900)
        tok_s = sum(r["tok_s"] for r in res)
        rss = max(r["rss"] for r in res)
        per = {k: v / 2**20 for k, v in res[0]["bytes_per_step"].items()}
        detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items()))
        print(f"{n:>5} {tok_s:>18,.0f} {rss / 2**20:>11,.0f} MiB {sum(per.values()):>20.1f}  {detail or '-'}")


if __name__ == "__main__":
    main()
