"""Shared benchmark helpers: interleaved timing, peak memory of a fresh process, random HF checkpoints.

Every benchmark times this project and its reference in the same run, alternating between them on
each repeat so that a change in machine load hits both sides alike, and reports medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each callable; one call of each per round, under no_grad."""
    return {name: wall for name, (wall, _) in time_wall_cpu(fns, repeat, warmup).items()}


def time_wall_cpu(fns: dict[str, Callable[[], object]], repeat: int = 5,
                  warmup: int = 1) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median CPU seconds of this process) of each callable, as above.

    On a machine shared with other jobs, wall time also counts the time this process waited for a
    core; with one torch thread, CPU time is close to what the same run takes on an idle machine.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeat):
            for name, fn in fns.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *map(line, cells[1:])])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    # The OpenMP wait policy changes small-kernel timings a lot on a busy machine: say when it is set.
    omp = "".join(f", {k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{omp}, {mem_gb:.0f} GiB RAM; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def dtype_arg(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# Memory ---------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS record (VmHWM) from its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last `reset_peak_rss`."""
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_measured(code: str, *args: str) -> tuple[dict, int]:
    """Run `code` in a fresh Python; return (the JSON object it prints last, its peak RSS in bytes).

    The peak comes from the kernel's rusage of that one child (`os.wait4`), so it covers everything
    the child did, including memory freed before it exited.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"measured child failed with exit code {proc.returncode}; output:\n{out}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


# Checkpoints ----------------------------------------------------------------------------------

def random_hf_checkpoint(path: Path, dtype: torch.dtype = torch.float32, std: float = 0.05, seed: int = 0,
                         **text) -> Path:
    """Save a random transformers `Llama4ForCausalLM` with these text-config fields to `path` (once).

    Weights are normal(0, std) and norms uniform(0.5, 1.5) so activations stay lively through the
    layers (transformers' own init is tiny). Reused if `path` already holds the same config.
    """
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    import llama4
    from llama4.config import config_to_hf

    cfg = llama4.Llama4Config(llama4.TextConfig(**text), None, name="bench")
    stamp = json.dumps({"text": text, "dtype": str(dtype), "std": std, "seed": seed}, sort_keys=True)
    if (path / "bench-stamp.json").exists() and (path / "bench-stamp.json").read_text() == stamp:
        return path
    d = config_to_hf(cfg, spelling=5)
    d.pop("architectures")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Llama4ForCausalLM(Llama4TextConfig(**d))
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    (path / "bench-stamp.json").write_text(stamp)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
