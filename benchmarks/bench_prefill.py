"""Whole-model prefill: `llama4.load(dir)(ids)` vs transformers' `Llama4ForCausalLM.from_pretrained(dir)`.

Both load the same random 16-expert checkpoint (saved by transformers) and run one forward over the
whole prompt, logits for every position, no KV cache. The prompt is longer than the attention chunk,
so the chunked local layers matter. Logits are compared before timing.

    .venv/bin/python benchmarks/bench_prefill.py            # D=1024, 4 layers, 4096 tokens, fp32 + bf16
    .venv/bin/python benchmarks/bench_prefill.py --quick    # small model, 1024 tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import llama4
from common import (checkpoint_bytes, dtype_arg, machine, random_hf_checkpoint, run_measured, set_threads, table,
                    time_wall_cpu)

GOAL = 5.0  # the target speedup over transformers

# One forward in a fresh process; the peak RSS is restarted after loading, so it counts activations only.
MEMORY_CHILD = """
import json, sys
import torch
from common import peak_rss_bytes, reset_peak_rss, rss_bytes
which, path, T, dtype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if which == "ours":
    import llama4
    model = llama4.load(path, dtype=dtype)
    forward = lambda ids: model(ids)
    vocab = model.config.text.vocab_size
else:
    from transformers import Llama4ForCausalLM
    model = Llama4ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    forward = lambda ids: model(input_ids=ids, use_cache=False).logits
    vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0))
reset_peak_rss()
base = rss_bytes()
with torch.no_grad():
    forward(ids)
print(json.dumps({"forward_peak": peak_rss_bytes() - base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024, help="expert (and shared expert) hidden size")
    ap.add_argument("--layers", type=int, default=4, help="every 4th layer is NoPE + global attention")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024, help="attention_chunk_size of the local layers")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama4-bench"), help="where the checkpoint is written")
    ap.add_argument("--quick", action="store_true", help="D=256, 2 layers, 1024 tokens, chunk 256, 2 repeats")
    ap.add_argument("--memory-tokens", type=int, nargs="+", default=None, metavar="T",
                    help="instead of timing: peak activation memory of one forward at each prompt length")
    a = ap.parse_args()
    if a.quick:
        a.dim, a.hidden, a.layers, a.tokens, a.chunk, a.repeat = 256, 256, 2, 1024, 256, 2
    set_threads(a.threads)
    from transformers import Llama4ForCausalLM

    text = dict(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=8,
                num_key_value_heads=2, head_dim=a.dim // 8, intermediate_size=a.hidden,
                intermediate_size_mlp=2 * a.hidden, num_local_experts=a.experts, num_experts_per_tok=1,
                attention_chunk_size=a.chunk, max_position_embeddings=max(8192, a.tokens, *(a.memory_tokens or [])),
                bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    path = a.dir / f"prefill-D{a.dim}-F{a.hidden}-L{a.layers}-E{a.experts}-V{a.vocab}-C{a.chunk}"
    random_hf_checkpoint(path, torch.float32, std=a.dim ** -0.5, **text)
    what = f"1 x {a.memory_tokens} tokens, peak memory" if a.memory_tokens else \
        f"1 x {a.tokens} tokens, median of {a.repeat} interleaved runs (wall and CPU)"
    print(f"# Prefill, {what}: D={a.dim}, F={a.hidden}, {a.layers} layers (every 4th NoPE/global), {a.experts} "
          f"experts top-1, chunk {a.chunk}, vocab {a.vocab}; checkpoint {path} "
          f"({checkpoint_bytes(path) / 1e6:.0f} MB fp32)\n# {machine()}")
    if a.memory_tokens:
        return memory_table(path, a)
    ids = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in a.dtypes:
        dtype = dtype_arg(name)
        ours = llama4.load(path, dtype=dtype)
        hf = Llama4ForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            ref = hf(input_ids=ids, use_cache=False).logits.float()
            err = float((ours(ids).float() - ref).abs().max() / ref.abs().max())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        if not err <= tol:  # NaN fails too
            raise SystemExit(f"{name}: logits differ from transformers' by {err:.2e} (> {tol:g}); not timing")
        t = time_wall_cpu({"ours": lambda: ours(ids), "hf": lambda: hf(input_ids=ids, use_cache=False)},
                          repeat=a.repeat)
        row = [name]
        for i in (0, 1):  # wall, then CPU
            speedup = t["hf"][i] / t["ours"][i]
            row += [f"{t['ours'][i]:.2f}", f"{t['hf'][i]:.2f}", f"{speedup:.1f}x", "met" if speedup >= GOAL else "missed"]
        rows.append(row + [f"{a.tokens / t['ours'][0]:.0f}", f"{a.tokens / t['hf'][0]:.0f}", f"{err:.1e}"])
        print(f"  done {name}", flush=True)
        del ours, hf
    heads = ["ours s", "HF s", "HF / ours", f"goal >= {GOAL:g}x"]
    print(table(["dtype", *[f"{h} (wall)" for h in heads], *[f"{h} (CPU)" for h in heads], "ours tok/s (wall)",
                 "HF tok/s (wall)", "max rel logit diff"], rows))


def memory_table(path: Path, a: argparse.Namespace) -> None:
    """Peak RSS above the loaded model during one forward, per prompt length and side."""
    rows = []
    for name in a.dtypes:
        for T in a.memory_tokens:
            mb = {}
            for which in ("ours", "hf"):
                out, _ = run_measured(MEMORY_CHILD, which, str(path), str(T), str(dtype_arg(name)).removeprefix("torch."),
                                      str(a.threads or torch.get_num_threads()))
                mb[which] = out["forward_peak"] / 2**20
            rows.append([name, T, f"{mb['ours']:.0f}", f"{mb['hf']:.0f}", f"{mb['ours'] / T * 1024:.0f}",
                         f"{mb['hf'] / T * 1024:.0f}"])
            print(f"  done {name} T={T}", flush=True)
    print(table(["dtype", "tokens", "ours MiB", "HF MiB", "ours MiB per 1K tokens", "HF MiB per 1K tokens"], rows))
    print("Peak RSS during one forward minus RSS before it (model loaded), each in a fresh process.")


if __name__ == "__main__":
    main()
