"""What the CLI's thread default costs: `llama4 generate` and `llama4 train` as fresh processes under
three thread settings, interleaved, medians of wall time (startup included).

    .venv/bin/python benchmarks/bench_threads.py --repeat 3

Settings: 1 thread; torch's default count (here: the core count) with OMP_WAIT_POLICY=PASSIVE; torch's
default count with the default (spinning) OpenMP wait. The workloads are the shipped default model
A random Llama 4 (D=512, 4 layers, 8 experts, the default model's 2,348-id tokenizer) generating 128
tokens greedily, and 12 training steps of a small one (D=256, 4 layers, 8 experts) on text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    f"{os.cpu_count()} threads, PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    f"{os.cpu_count()} threads, spinning": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def llama4(*argv: str) -> list[str]:
    return [sys.executable, "-m", "llama4", *argv]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from llama4.cli.demo import default_model_path

    import shutil

    import llama4

    tok_dir = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "random"
        tok = llama4.Tokenizer(tok_dir)
        cfg = llama4.preset("tiny").replace(vocab_size=tok.vocab_size, hidden_size=512, num_hidden_layers=4,
                                            num_attention_heads=8, head_dim=64, intermediate_size=1024,
                                            intermediate_size_mlp=1024, num_local_experts=8)
        cfg.vision = None
        llama4.save(llama4.Llama4(cfg).init_weights(seed=0), model)
        shutil.copy(tok_dir / "tokenizer.json", model / "tokenizer.json")
        corpus = tmp / "corpus.txt"
        corpus.write_text(" ".join(f"the {c} {s} is at the {p}." for c in ("red", "blue", "green")
                                   for s in ("circle", "square") for p in ("top", "left", "bottom")) * 200)
        overrides = ["model.preset=tiny", "model.text_only=true",
                     "model.overrides={hidden_size=256, num_hidden_layers=4, num_local_experts=8, "
                     "intermediate_size=512, intermediate_size_mlp=512, head_dim=64}",
                     f'data.paths=["{corpus}"]', f'data.tokenizer="{tok_dir}"', "data.seq_len=256",
                     "data.batch_size=4", "train.steps=12", "checkpoint.every=0", "train.progress=false"]
        jobs = {
            "generate 128 tokens (D=512, 4 layers, 8 experts)": lambda: llama4(
                "generate", "--model", str(model), "--prompt", "what colour is the circle?",
                "--max-new-tokens", "128"),
            "train 12 steps (D=256, 4 layers, 8 experts)": lambda: llama4(
                "train", *overrides, f"train.out_dir={tmp / ('run' + str(time.perf_counter_ns()))}"),
        }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.repeat):
            for job, argv in jobs.items():
                for setting, env in SETTINGS.items():
                    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
                    full_env.update(env, PYTHONPATH=str(ROOT / "src"))
                    start = time.perf_counter()
                    subprocess.run(argv(), env=full_env, check=True, capture_output=True)
                    results.setdefault((job, setting), []).append(time.perf_counter() - start)
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end; wall seconds, median of "
          f"{a.repeat} (process start included)")
    print("| workload | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for job in jobs:
        cells = [f"{statistics.median(results[(job, s)]):.2f}" for s in SETTINGS]
        print(f"| {job} | " + " | ".join(cells) + " |")
    print(json.dumps({f"{j} / {s}": v for (j, s), v in results.items()}))


if __name__ == "__main__":
    main()
