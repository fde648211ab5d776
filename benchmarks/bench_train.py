"""Training step: this project's trainer pieces vs transformers' `Llama4ForCausalLM`, same 16-expert config.

Both sides run the same step on the same random token batch: forward, next-token cross-entropy,
backward, AdamW (fused where the device has it). Ours: sparse MoE dispatch and the chunked
cross-entropy (`llama4.train.loss`); transformers: its own forward with `labels=` (every expert on
every token, full fp32 logits). bf16 autocast on CUDA, fp32 on CPU.

Each side runs in its own fresh process, so peak memory is that side's alone (CUDA: max allocated;
CPU: the process's peak RSS). Rounds alternate ours / transformers so that machine load hits both
alike; the table shows medians of tokens/s and the largest peak memory seen.

    .venv/bin/python benchmarks/bench_train.py                 # 16 experts, D=512, 8 layers, 4 x 512 tokens
    .venv/bin/python benchmarks/bench_train.py --quick         # small shapes, seconds
    .venv/bin/python benchmarks/bench_train.py --vocab 202048  # the real vocabulary
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

GOAL_SPEEDUP = 3.0  # the target: training tokens/s over transformers, with peak memory no higher


def model_config(a):
    import llama4

    cfg = llama4.preset("tiny").replace(
        vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=a.dim // 64,
        num_key_value_heads=max(1, a.dim // 256), head_dim=64, intermediate_size=2 * a.dim,
        intermediate_size_mlp=4 * a.dim, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        attention_chunk_size=8192, floor_scale=8192, rope_scaling=None, bos_token_id=0, eos_token_id=[1],
        pad_token_id=2)
    cfg.vision = None
    return cfg


def step_ours(a, device):
    import llama4
    from llama4.train.config import config_from_dict
    from llama4.train.loop import make_optimizer
    from llama4.train.loss import chunked_cross_entropy

    with torch.device(device):
        model = llama4.Llama4(model_config(a))
    model.init_weights(seed=0)
    opt = make_optimizer(list(model.parameters()), config_from_dict({}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(ids, labels):
        with autocast:
            h_BTD = model(ids, return_hidden=True)
            loss = chunked_cross_entropy(h_BTD.flatten(0, 1), model.output, labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def step_hf(a, device):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from llama4.config import config_to_hf

    d = config_to_hf(model_config(a), spelling=5)
    d.pop("architectures")
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama4ForCausalLM(Llama4TextConfig(**d, attn_implementation="sdpa"))
    model.train()
    try:  # the same fused AdamW kernel as ours wherever torch has one
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(ids, labels):
        with autocast:
            # transformers shifts labels itself: pass the inputs as labels.
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def child(a) -> None:
    """One side, in this fresh process: prints {"tok_s", "peak_bytes", "loss"} as JSON."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = (step_ours if a.side == "ours" else step_hf)(a, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, a.vocab, (a.batch, a.seq + 1), generator=g)
    inp, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
    if a.side == "hf":
        inp = labels = ids[:, :-1].to(device)
    times, cpu_times, loss = [], [], None
    for i in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(inp, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tok_s": a.batch * a.seq / statistics.median(times), "peak_bytes": peak,
                      "tok_cpu_s": a.batch * a.seq / statistics.median(cpu_times), "loss": float(loss)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="D=256, 2 layers, 2 x 256 tokens")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(dim=256, layers=2, batch=2, seq=256, vocab=8192)
        a = p.parse_args()
    if a.side:
        return child(a)
    args = [f"--{k}={getattr(a, k)}" for k in ("dim", "layers", "vocab", "batch", "seq", "steps", "warmup",
                                               "threads")]
    results = {"ours": [], "hf": []}
    for _ in range(a.rounds):
        for side in ("ours", "hf"):
            out = subprocess.run([sys.executable, __file__, f"--side={side}", *args], capture_output=True,
                                 text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tok_s = {s: statistics.median(r["tok_s"] for r in results[s]) for s in results}
    tok_cpu = {s: statistics.median(r["tok_cpu_s"] for r in results[s]) for s in results}
    peak = {s: max(r["peak_bytes"] for r in results[s]) for s in results}
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu, {os.cpu_count()} cores, torch threads {a.threads or torch.get_num_threads()}"
    print(f"training step, 16 experts top-1, D={a.dim}, {a.layers} layers, vocab {a.vocab}, "
          f"{a.batch} x {a.seq} tokens; {device}; torch {torch.__version__}")
    # On a shared machine wall time includes waiting for a core; with one thread, tokens per CPU-second
    # is close to what an idle machine gives.
    print("| side | tokens/s (wall) | tokens per CPU-second | peak memory | loss (first process) |")
    print("|---|---:|---:|---:|---:|")
    for s, name in (("ours", "llama4 (this project)"), ("hf", "transformers Llama4ForCausalLM")):
        print(f"| {name} | {tok_s[s]:,.0f} | {tok_cpu[s]:,.0f} | {peak[s] / 2**20:,.0f} MiB | "
              f"{results[s][0]['loss']:.3f} |")
    speed, speed_cpu, mem = tok_s["ours"] / tok_s["hf"], tok_cpu["ours"] / tok_cpu["hf"], peak["ours"] / peak["hf"]
    verdict = "met" if min(speed, speed_cpu) >= GOAL_SPEEDUP else "NOT met"
    print(f"speedup {speed:.2f}x wall, {speed_cpu:.2f}x CPU time (goal >= {GOAL_SPEEDUP:g}x: {verdict}); "
          f"peak memory ours/transformers {mem:.2f} ({'no higher' if mem <= 1 else 'HIGHER'})")


if __name__ == "__main__":
    main()
