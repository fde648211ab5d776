"""KV dtype: fp8 / int8 global-layer KV against the weights' dtype (bf16), same model, same prompt.

Reports the bytes each store allocates by layer kind (global / local), the decode step time after a
long prefill (the step reads every global key: dequantizing is the cost), prefill time, and how far
the logits move (max error over max |logit| of the decode steps, and greedy agreement). Random
weights; the reference side is our own store in the compute dtype (fp32 by default; the memory is
also given against what a bf16 store of the same shape allocates).

    .venv/bin/python benchmarks/bench_kv_dtype.py --threads 1              # D=512, 8 layers, 4096 tokens
    .venv/bin/python benchmarks/bench_kv_dtype.py --threads 1 --quick      # 1024 tokens
"""

from __future__ import annotations

import argparse

import torch

import llama4
from common import machine, set_threads, table, time_wall_cpu
from llama4.generation import decode_step
from llama4.kv import ContiguousKV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--context", type=int, default=None)
    # fp32 compute by default: bf16 matmuls are ~15x slower than fp32 on this CPU (no native bf16).
    ap.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    args = ap.parse_args()
    set_threads(args.threads)
    T = args.context or (1024 if args.quick else 4096)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    text = llama4.TextConfig(vocab_size=2048, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=128, intermediate_size=512, intermediate_size_mlp=1024,
                             num_local_experts=4, attention_chunk_size=512, max_position_embeddings=T + 64,
                             bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    model = llama4.Llama4(llama4.Llama4Config(text, None, name="bench")).init_weights(std=0.05, seed=0)
    model = model.to(dtype).eval()
    ids = torch.randint(3, 2048, (1, T), generator=torch.Generator().manual_seed(0))
    steps = 16
    print(machine() + "\n" + f"| threads {args.threads} | context {T} | compute {args.dtype} | D=512, 8 layers "
          f"(2 global), 2 kv heads x 128", flush=True)

    stores, logits = {}, {}
    with torch.no_grad():
        for name in ("weights dtype", "fp8", "int8"):
            kv = ContiguousKV(text, 1, T + steps + 64, dtype, kv_dtype=None if name == "weights dtype" else name)
            kv.add()
            model(ids, cache=kv, return_hidden=True)
            toks = ids[0, -steps:]
            out = []
            for t in toks:
                out.append(decode_step(model, t.view(1), kv.plan([(0, 1)]), kv))
            stores[name], logits[name] = kv, torch.cat(out).float()

    def prefill(name):
        kv = ContiguousKV(text, 1, T + 1, dtype, kv_dtype=None if name == "weights dtype" else name)
        kv.add()

        def run():
            kv.rollback(0, kv.length(0))
            model(ids, cache=kv, return_hidden=True)
        return run

    def decode(name):
        kv = stores[name]
        tok = ids[0, :1]

        def run():
            decode_step(model, tok, kv.plan([(0, 1)]), kv)
            kv.rollback(0, 1)
        return run

    fns = {f"prefill {n}": prefill(n) for n in stores} | {f"decode {n}": decode(n) for n in stores}
    times = time_wall_cpu(fns, repeat=3, warmup=1)
    ref = logits["weights dtype"]
    base = stores["weights dtype"].nbytes_by_kind()
    bf16 = ContiguousKV(text, 1, T + steps + 64, torch.bfloat16).nbytes_by_kind()  # what a bf16 store allocates
    rows = []
    for name, kv in stores.items():
        b = kv.nbytes_by_kind()
        err = float((logits[name] - ref).abs().max() / ref.abs().max())
        agree = float((logits[name].argmax(-1) == ref.argmax(-1)).float().mean())
        pw, pc = times[f"prefill {name}"]
        dw, dc = times[f"decode {name}"]
        rows.append([name, f"{b['global'] / 2**20:.1f}", f"{b['global'] / base['global']:.3f}", f"{b['global'] / bf16['global']:.3f}",
                     f"{b['local'] / 2**20:.1f}", f"{pw * 1e3:.0f}", f"{pw / times['prefill weights dtype'][0]:.2f}",
                     f"{dw * 1e3:.1f}", f"{dw / times['decode weights dtype'][0]:.2f}", f"{err:.2e}", f"{agree:.2f}"])
    print(table(["KV", "global MiB", f"vs {args.dtype}", "vs bf16", "local MiB", "prefill ms", "prefill ratio", "decode ms",
                 "decode ratio", "logit err", "argmax agree"], rows))


if __name__ == "__main__":
    main()
