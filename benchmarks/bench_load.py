"""Checkpoint load time and peak memory: `llama4.load` vs transformers' `from_pretrained`.

Each load runs in a fresh Python process; its peak resident set size comes from the kernel
(`os.wait4` rusage of that child). The library is imported before the baseline is taken, so
"load peak" = peak RSS minus the RSS of the interpreter with torch and the library imported. The
checkpoint is written once and then sits in the page cache, so times are warm-cache times. Each
child also runs one 16-token forward after loading (timed with the load, and inside the peak), since
a loader that maps the file lazily pays for touching its pages only then.

    .venv/bin/python benchmarks/bench_load.py            # ~2 GB bf16 checkpoint (17 layers, 16 experts)
    .venv/bin/python benchmarks/bench_load.py --quick    # ~100 MB
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import checkpoint_bytes, dtype_arg, machine, random_hf_checkpoint, run_measured, table

GOAL = 1.3  # peak RSS at most 1.3x the checkpoint's size

CHILD = """
import json, sys, time
import torch
from common import rss_bytes
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "ours":
    import llama4
    load = lambda: llama4.load(path, dtype=dtype)
    forward = lambda model, ids: model(ids)
else:
    from transformers import Llama4ForCausalLM
    load = lambda: Llama4ForCausalLM.from_pretrained(path, dtype=dtype)
    forward = lambda model, ids: model(input_ids=ids, use_cache=False)
base = rss_bytes()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
# A lazily mapped checkpoint pays for reading its pages on first use: time a short forward too.
with torch.no_grad():
    forward(model, torch.ones(1, 16, dtype=torch.long))
first = time.perf_counter() - start
print(json.dumps({"base": base, "seconds": seconds, "first_forward": first}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=17)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="checkpoint and load dtype")
    ap.add_argument("--repeat", type=int, default=3, help="loads per side (alternating)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama4-bench"))
    ap.add_argument("--quick", action="store_true", help="2 layers, D=512: ~100 MB, 2 loads per side")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.dim, a.hidden, a.vocab, a.repeat = 2, 512, 512, 8192, 2
    text = dict(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=8,
                num_key_value_heads=2, head_dim=a.dim // 8, intermediate_size=a.hidden,
                intermediate_size_mlp=2 * a.hidden, num_local_experts=a.experts, num_experts_per_tok=1,
                bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    path = a.dir / f"load-D{a.dim}-F{a.hidden}-L{a.layers}-E{a.experts}-V{a.vocab}-{a.dtype}"
    random_hf_checkpoint(path, dtype_arg(a.dtype), std=0.02, **text)
    size = checkpoint_bytes(path)
    print(f"# Load {path}: {size / 1e9:.2f} GB of {a.dtype} safetensors ({len(list(path.glob('*.safetensors')))} "
          f"file(s)), warm page cache, {a.repeat} loads per side\n# {machine()}")
    results: dict[str, list[tuple[dict, int]]] = {"ours": [], "transformers": []}
    for _ in range(a.repeat):
        for which in results:
            results[which].append(run_measured(CHILD, which, str(path), str(dtype_arg(a.dtype)).removeprefix("torch.")))
    rows = []
    for which, runs in results.items():
        seconds = statistics.median(r["seconds"] for r, _ in runs)
        first = statistics.median(r["first_forward"] for r, _ in runs)
        peak = max(p for _, p in runs)
        base = statistics.median(r["base"] for r, _ in runs)
        load_peak = peak - base
        rows.append([which, f"{seconds:.2f}", f"{first:.2f}", f"{peak / 1e9:.2f}", f"{base / 1e9:.2f}", f"{load_peak / 1e9:.2f}",
                     f"{peak / size:.2f}x", f"{load_peak / size:.2f}x", "met" if load_peak / size <= GOAL else "missed"])
    print(table(["loader", "load s", "load + 16-token forward s", "peak RSS GB", "RSS after imports GB", "load peak GB",
                 "peak / size", "load peak / size", f"goal <= {GOAL}x (load peak)"], rows))
    for key, what in [("seconds", "load"), ("first_forward", "load + first forward")]:
        t = {w: statistics.median(r[key] for r, _ in runs) for w, runs in results.items()}
        print(f"{what} time (median): transformers / ours = {t['transformers'] / t['ours']:.2f}x")


if __name__ == "__main__":
    main()
