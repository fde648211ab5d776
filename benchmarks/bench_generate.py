"""Generation side by side with transformers' `generate` on the same random checkpoint.

    .venv/bin/python benchmarks/bench_generate.py decode [--compile]  # tokens/s, D=512, 8 layers, 16 experts
    .venv/bin/python benchmarks/bench_generate.py prefill    # 32K-token prompt, tiny iRoPE model: time + peak RSS
    .venv/bin/python benchmarks/bench_generate.py long       # 256K-token prompt, ours only (transformers' mask alone
                                                             # would be 256K x 256K): time + peak RSS
Each measured run of `prefill` and `long` is a fresh process, so its peak RSS (kernel rusage) is its own.
Greedy decoding on both sides; the tokens are compared as well as timed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, random_hf_checkpoint, run_measured, set_threads, table, time_interleaved

GIB = 2**30


def tiny_irope(chunk: int) -> dict:
    """The `tiny` preset's text decoder (D=128, 4 layers, the published 202,048-token vocabulary)."""
    return dict(vocab_size=202048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, intermediate_size=256, intermediate_size_mlp=512, num_local_experts=4,
                interleave_moe_layer_step=2, attention_chunk_size=chunk, floor_scale=32,
                max_position_embeddings=1 << 20)


def decode(a: argparse.Namespace) -> None:
    from transformers import Llama4ForCausalLM

    import llama4

    text = dict(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=8,
                num_key_value_heads=2, head_dim=a.dim // 8, intermediate_size=a.hidden, intermediate_size_mlp=2 * a.hidden,
                num_local_experts=a.experts, attention_chunk_size=8192, max_position_embeddings=1 << 16,
                bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    path = random_hf_checkpoint(a.dir / "decode", **text)
    ours = llama4.load(path).eval()
    hf = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))

    def ours_gen(n, compile=False):
        return llama4.generate(ours, prompt[0], max_new_tokens=n, stop_ids=[], compile=compile)

    def hf_gen(n):
        out = hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)
        return out[0, a.prompt:].tolist()

    same = ours_gen(a.new) == hf_gen(a.new)
    fns = {"ours_1": lambda: ours_gen(1), "ours_n": lambda: ours_gen(a.new),
           "hf_1": lambda: hf_gen(1), "hf_n": lambda: hf_gen(a.new)}
    sides = [("llama4 eager", "ours"), ("transformers", "hf")]
    if a.compile:
        t0 = time.perf_counter()
        same_compiled = ours_gen(a.new, compile=True) == ours_gen(a.new)
        compile_s = time.perf_counter() - t0
        fns.update({"comp_1": lambda: ours_gen(1, True), "comp_n": lambda: ours_gen(a.new, True)})
        sides.insert(1, ("llama4 compiled", "comp"))
    t = time_interleaved(fns, repeat=a.repeat)
    tps = {k: (a.new - 1) / (t[f"{k}_n"] - t[f"{k}_1"]) for _, k in sides}
    print(f"decode: D={a.dim}, {a.layers} layers, {a.experts} experts (F={a.hidden}), vocab {a.vocab}, fp32; "
          f"prompt {a.prompt}, {a.new} new tokens greedy; tokens identical to transformers: {same}")
    if a.compile:
        print(f"compiled decode step (torch.compile fullgraph, inductor): first call incl. compilation "
              f"{compile_s:.1f} s; tokens identical to eager: {same_compiled}")
    print(table(["", "prefill+1 s", f"prefill+{a.new} s", "decode tok/s", "vs transformers"],
                [[name, f"{t[f'{k}_1']:.3f}", f"{t[f'{k}_n']:.3f}", f"{tps[k]:.1f}", f"{tps[k] / tps['hf']:.2f}x"]
                 for name, k in sides]))
    print(f"decode speedup (eager): {tps['ours'] / tps['hf']:.2f}x (goal >= 3x)")


# Child processes for the memory-measured runs: load, make a prompt, time generation, print JSON.
_CHILD = r"""
import json, sys, time, torch
from common import rss_bytes
side, path, tokens, new, threads, pchunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
if threads:
    torch.set_num_threads(threads)
if side == "llama4":
    import llama4
    model = llama4.load(path).eval()
    vocab = model.config.text.vocab_size
else:
    from transformers import Llama4ForCausalLM
    model = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
prompt = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
loaded = rss_bytes()
t0 = time.perf_counter()
if side == "llama4":
    out = []
    for tok in llama4.generate_stream(model, prompt[0], max_new_tokens=new, stop_ids=[], prefill_chunk=pchunk):
        out.append(tok)
        if len(out) == 1:
            t1 = time.perf_counter()
else:
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                             pad_token_id=0)[0, tokens:].tolist()
    t1 = time.perf_counter()
t2 = time.perf_counter()
print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": out, "loaded_rss": loaded}))
"""


def _measure(side: str, path: Path, tokens: int, new: int, a: argparse.Namespace) -> dict:
    res, peak = run_measured(_CHILD, side, str(path), str(tokens), str(new), str(a.threads or 0), str(a.prefill_chunk))
    res["peak_rss"] = peak
    return res


def prefill(a: argparse.Namespace) -> None:
    path = random_hf_checkpoint(a.dir / f"irope{a.chunk}", **tiny_irope(a.chunk))
    rows = []
    for n in a.tokens:
        ours = _measure("llama4", path, n, 1, a)
        hf = _measure("transformers", path, n, 1, a)
        rows.append([f"{n:,}", f"{ours['prefill_s']:.2f}", f"{hf['prefill_s']:.2f}",
                     f"{hf['prefill_s'] / ours['prefill_s']:.1f}x", f"{ours['peak_rss'] / GIB:.2f}",
                     f"{hf['peak_rss'] / GIB:.2f}", f"{ours['peak_rss'] / hf['peak_rss']:.2f}",
                     "yes" if ours["tokens"] == hf["tokens"] else "NO"])
    print(f"prefill: tiny iRoPE (D=128, 4 layers, 1 global, chunk {a.chunk}, vocab 202,048), fp32, "
          f"generate(max_new_tokens=1), prefill slices of {a.prefill_chunk}; fresh process per run")
    print(table(["prompt", "llama4 s", "transformers s", "speedup", "llama4 peak GiB", "transformers peak GiB",
                 "memory ratio", "same token"], rows))
    print("goal at 32K: >= 10x faster, memory ratio <= 0.25")


def long(a: argparse.Namespace) -> None:
    path = random_hf_checkpoint(a.dir / f"irope{a.chunk}", **tiny_irope(a.chunk))
    n = a.tokens[-1]
    r = _measure("llama4", path, n, a.new, a)
    print(f"long: {n:,}-token prompt on tiny iRoPE (chunk {a.chunk}), fp32, prefill slices of {a.prefill_chunk}, "
          f"then {a.new} tokens greedy; one fresh process")
    print(table(["prompt", "prefill (to first token) s", "decode tok/s", "peak RSS GiB", "RSS after load GiB"],
                [[f"{n:,}", f"{r['prefill_s']:.1f}", f"{(a.new - 1) / r['decode_s']:.1f}",
                  f"{r['peak_rss'] / GIB:.2f}", f"{r['loaded_rss'] / GIB:.2f}"]]))
    print(f"new tokens: {r['tokens']}")
    print("goal: within 4 GiB of RAM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["decode", "prefill", "long"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024, help="expert hidden size (decode)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (decode)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (decode)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (decode: 128, long: 16)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="prompt lengths (prefill: 32768; long: 262144)")
    ap.add_argument("--chunk", type=int, default=2048, help="attention_chunk_size (prefill, long)")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="decode: also time generate(compile=True)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama4-bench"), help="where checkpoints are written")
    a = ap.parse_args()
    a.new = a.new or {"decode": 128, "long": 16}.get(a.what, 1)
    a.tokens = a.tokens or ([262144] if a.what == "long" else [32768])
    set_threads(a.threads)
    print(machine())
    {"decode": decode, "prefill": prefill, "long": long}[a.what](a)


if __name__ == "__main__":
    main()
