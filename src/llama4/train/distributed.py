"""torch.distributed plumbing for training and inference: joining the process group that torchrun
describes, rank-0-only output, sums over data-parallel ranks, and running a function on N local
processes (tests and benchmarks; gloo on CPU).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist


def launched() -> bool:
    """True under torchrun (or anything else that sets the torch.distributed environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env() -> None:
    """Join the group torchrun describes: NCCL on CUDA (one device per local rank), else gloo."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_sum(values: list[float] | torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (default: everyone), in float64 so token counts stay exact."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def spawn(fn, world: int, *args, timeout_s: float = 300.0) -> list:
    """Run `fn(*args)` on `world` fresh processes joined in one gloo group; the ranks' return values.

    `fn` must be importable by name (a module-level function). A failure on any rank raises here with
    that rank's traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="llama4-dist-") as tmp:
        store = Path(tmp) / "store"
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(fn, r, world, str(store), queue, args), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < world:
            # After a failure the other ranks may wait forever in a collective: give them a moment.
            wait = 10.0 if errors else deadline - time.monotonic()
            try:
                r, ok, value = queue.get(timeout=max(wait, 0.1))
            except Empty:
                missing = sorted(set(range(world)) - set(results) - set(errors))
                errors.update({m: "no result (timed out or stuck in a collective)" for m in missing})
                break
            (results if ok else errors)[r] = value
        for p in procs:
            p.join(5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        r = min(errors)
        raise RuntimeError(f"rank {r} of {world} failed:\n{errors[r]}")
    return [results[r] for r in range(world)]


def _worker(fn, r: int, world: int, store: str, queue, args) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=world,
                                timeout=timedelta(seconds=120))
        out = fn(*args)
        queue.put((r, True, out))
    except BaseException:
        queue.put((r, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
