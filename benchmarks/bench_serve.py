"""`llama4 serve` under load: aggregate output tokens/s and TTFT / TPOT at 1, 4, 16, 64 concurrent streams,
against sequential `llama4.generate` on the same model, and the same load against llama.cpp's
`llama-server` when a GGUF of the model is given.

Each server runs in its own process with one compute thread; this process generates the load with
httpx streaming chat requests on loopback (greedy, `ignore_eos`, output lengths spread around
`--max-tokens`). At each level:

- a burst: every stream sends one request at once ("burst TTFT", the worst case);
- the steady state: closed-loop streams of `--requests-per-stream` requests, stream k starting at
  k / streams of one idle request's latency; TTFT leaves out each stream's first request.

TTFT is request sent -> first content chunk; TPOT the mean gap between a request's later tokens;
"server CPU ms/token" the server process's CPU time per output token (steady run), which the other
jobs of a shared machine disturb far less than wall time. Also printed: the KV blocks one request holds
per layer kind (chunked layers at most one chunk, global layers the whole sequence).

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py \
        [--gguf model.gguf --llama-server /work/llama.cpp/build/bin/llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, table  # noqa: E402

import llama4  # noqa: E402
from llama4.generation.scheduler import Request, Scheduler  # noqa: E402
from llama4.kv.paged import PagedKV  # noqa: E402

DEFAULT_MODEL = ROOT / "src/llama4/assets/default_model"


def prompt_text(i: int) -> str:
    return f"Request {i}: describe the shapes in picture number {i} and their colours, one by one."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def max_tokens_of(i: int, mean: int) -> int:
    """Output length of request i: spread over [mean/2, 3*mean/2] (deterministic), so that streams drift
    apart as real users' do instead of finishing in lockstep."""
    return max(1, mean // 2 + (i * 37) % (mean + 1))


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt_text(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = chunks = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    n = n or chunks  # a server that sends no usage: one token per content chunk
    ttft = (first or time.perf_counter()) - t0
    tpot = (last - first) / max(1, n - 1) if first and last else 0.0
    return {"ttft": ttft, "tpot": tpot, "n": n, "t0": t0}


async def load(url: str, concurrency: int, per_stream: int, max_tokens: int, model: str, *, ramp: float,
               max_seconds: float) -> dict:
    """`concurrency` closed-loop streams of `per_stream` requests each (stream k starts at k * ramp /
    concurrency; ramp 0 is a burst). TTFT "steady" leaves out each stream's first request, which met a
    server still filling up; with ramp 0, "burst" is the TTFT of those first requests."""
    deadline = time.perf_counter() + max_seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def stream(k):
            await asyncio.sleep(k * ramp / concurrency)
            out = []
            for j in range(per_stream):
                if j and time.perf_counter() > deadline:
                    break
                i = k + j * concurrency
                out.append((j, await one(client, url, i, max_tokens_of(i, max_tokens), model)))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(k) for k in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    firsts = [r["ttft"] for j, r in results if j == 0]
    steady = [r["ttft"] for j, r in results if j > 0] or firsts
    tpot = [r["tpot"] for _, r in results]
    tokens = sum(r["n"] for _, r in results)
    return {"tok_s": tokens / wall, "ttft50": pct(steady, 50), "ttft99": pct(steady, 99),
            "first99": pct(firsts, 99), "tpot50": pct(tpot, 50), "tpot99": pct(tpot, 99),
            "requests": len(results), "tokens": tokens, "wall": wall}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_levels(name: str, url: str, pid: int, levels: list[int], args) -> dict[int, dict]:
    """Each level twice: a burst (every stream at once) and staggered starts (the steady state)."""
    out = {}
    for c in levels:
        ramp = out[1]["latency"] if 1 in out else 0.0
        burst = asyncio.run(load(url, c, 1, args.max_tokens, "bench", ramp=0.0, max_seconds=args.max_seconds))
        cpu0 = cpu_seconds(pid)
        r = asyncio.run(load(url, c, args.requests_per_stream, args.max_tokens, "bench", ramp=ramp,
                             max_seconds=args.max_seconds))
        r["cpu_ms_tok"] = 1e3 * (cpu_seconds(pid) - cpu0) / max(1, r["tokens"])
        r["burst99"] = burst["first99"]
        r["latency"] = r["wall"] / args.requests_per_stream
        out[c] = r
    return out


def start_server(cmd: list[str], url: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up")


def sequential_generate(model, tok, n: int, max_tokens: int) -> float:
    """Output tokens/s of one request after another through llama4.generate."""
    prompts = [tok.encode_chat([{"role": "user", "content": prompt_text(i)}]) for i in range(n)]
    llama4.generate(model, prompts[0], max_new_tokens=4, stop_ids=[])  # warm-up
    t0 = time.perf_counter()
    total = sum(len(llama4.generate(model, p, max_new_tokens=max_tokens_of(i, max_tokens), stop_ids=[]))
                for i, p in enumerate(prompts))
    return total / (time.perf_counter() - t0)


def kv_by_kind(model, prompt_len: int, new: int, block_size: int) -> list[list[object]]:
    """Peak blocks one request holds per layer kind in the paged store, against the bound."""
    cfg = model.config.text
    kv = PagedKV(cfg, 100_000, block_size)
    s = Scheduler(model, kv, prefill_chunk=64)
    req = s.add(Request(list(range(10, 10 + prompt_len)), new))
    peak = {"chunked": 0, "global": 0}
    while s.has_work():
        s.step()
        if req.seq is not None:
            for i, t in enumerate(kv.held(req.seq)):
                kind = "global" if kv.chunks[i] is None else "chunked"
                peak[kind] = max(peak[kind], len(t))
    total = prompt_len + new
    chunk = cfg.attention_chunk_size
    return [["chunked (per layer)", peak["chunked"], -(-min(chunk, total) // block_size)],
            ["global (per layer)", peak["global"], -(-total // block_size)]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=60, help="per level: no new request after this")
    ap.add_argument("--llama-server", default="/work/llama.cpp/build/bin/llama-server")
    ap.add_argument("--gguf", default=None, help="the same model as GGUF, for llama-server")
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [int(x) for x in args.levels.split(",")]
    model = llama4.load(args.model).eval()
    tok_path = next(p for p in (Path(args.model) / "tokenizer.json", Path(args.model) / "tokenizer.model") if p.exists())
    tok = llama4.Tokenizer(tok_path)
    print(machine())
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"{args.max_tokens} output tokens per request, greedy, ignore_eos\n")
    base = sequential_generate(model, tok, 8, args.max_tokens)
    print(f"sequential llama4.generate: {base:.0f} output tok/s\n")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "llama4", "serve", "--model", args.model, "--port", str(port), "--threads", "1",
           "--kv-memory", "256MiB", "--max-running", "64", "--served-model-name", "bench"]
    proc = start_server(cmd, url, env)
    results = {}
    try:
        asyncio.run(load(url, 2, 2, 8, "bench", ramp=0.0, max_seconds=60))  # warm-up
        results["llama4 serve"] = run_levels("llama4 serve", url, proc.pid, levels, args)
    finally:
        proc.terminate()
        proc.wait(30)
    if args.gguf and Path(args.llama_server).exists():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # One thread, as the llama4 server; a slot per stream; -c is split between the slots.
        lc = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "1",
              "-tb", "1", "-np", str(max(levels)), "-c", str(max(levels) * 256), "--alias", "bench", "--jinja"]
        proc = start_server(lc, url, env)
        try:
            asyncio.run(load(url, 2, 2, 8, "bench", ramp=0.0, max_seconds=60))
            results["llama-server"] = run_levels("llama-server", url, proc.pid, levels, args)
        finally:
            proc.terminate()
            proc.wait(30)
    else:
        why = "no --gguf given" if not args.gguf else f"{args.llama_server} not built"
        print(f"llama-server: skipped ({why})\n")
    rows = []
    for name, res in results.items():
        for c, r in res.items():
            rows.append([name, c, r["requests"], f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}x",
                         f"{r['ttft50'] * 1e3:.0f}", f"{r['ttft99'] * 1e3:.0f}", f"{r['burst99'] * 1e3:.0f}",
                         f"{r['tpot50'] * 1e3:.1f}", f"{r['tpot99'] * 1e3:.1f}", f"{r['cpu_ms_tok']:.2f}"])
    print(table(["server", "streams", "requests", "output tok/s", "vs sequential", "TTFT p50 ms", "TTFT p99 ms",
                 "burst TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "server CPU ms/token"], rows))
    for name, res in results.items():
        if 1 in res and 16 in res:
            print(f"\n{name}: goal 1: 16 streams / 1 stream aggregate = {res[16]['tok_s'] / res[1]['tok_s']:.2f}x "
                  f"(goal >= 5x)")
            print(f"{name}: goal 2: TTFT p99 at 16 streams / idle TTFT p99 = "
                  f"{res[16]['ttft99'] / res[1]['ttft99']:.2f}x steady, "
                  f"{res[16]['burst99'] / res[1]['ttft99']:.2f}x burst (goal <= 3x)")
    print("\nKV blocks one request holds (prompt 200 + 300 new tokens, block 16):")
    print(table(["layer kind", "peak blocks", "bound"], kv_by_kind(model, 200, 300, 16)))


if __name__ == "__main__":
    main()
