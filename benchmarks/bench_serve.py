"""`llama4 serve` under load: aggregate output tokens/s and TTFT / TPOT at 1, 4, 16, 64 concurrent streams,
against sequential `llama4.generate` on the same model (and llama.cpp's llama-server when a GGUF is given).

The server runs in its own process (`python -m llama4 serve`, one torch thread); this process generates
the load with httpx streaming requests on loopback, `ignore_eos` so every request writes exactly
`--max-tokens` tokens. TTFT is request sent -> first content chunk; TPOT is the mean gap between a
request's later tokens. Also printed: the KV blocks one request holds per layer kind (the paged store
keeps the layer-kind bound: chunked layers at most one chunk, global layers the whole sequence).

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
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


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int, model: str) -> tuple[float, float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt_text(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = 0
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
    ttft = (first or time.perf_counter()) - t0
    tpot = (last - first) / max(1, n - 1) if first and last else 0.0
    return ttft, tpot, n


async def load(url: str, concurrency: int, n_requests: int, max_tokens: int, model: str) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def run(i):
            async with sem:
                return await one(client, url, i, max_tokens, model)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ttft, tpot = [r[0] for r in results], [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"tok_s": tokens / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "tpot50": pct(tpot, 50),
            "tpot99": pct(tpot, 99), "requests": n_requests, "tokens": tokens}


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
    total = sum(len(llama4.generate(model, p, max_new_tokens=max_tokens, stop_ids=[])) for p in prompts)
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
    ap.add_argument("--requests-per-stream", type=int, default=2)
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
    rows, results = [], {}
    try:
        asyncio.run(load(url, 2, 4, 8, "bench"))  # warm-up
        for c in levels:
            r = asyncio.run(load(url, c, max(4, args.requests_per_stream * c), args.max_tokens, "bench"))
            results[c] = r
            rows.append(["llama4 serve", c, f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}x",
                         f"{r['ttft50'] * 1e3:.0f}", f"{r['ttft99'] * 1e3:.0f}", f"{r['tpot50'] * 1e3:.1f}",
                         f"{r['tpot99'] * 1e3:.1f}"])
    finally:
        proc.terminate()
        proc.wait(30)
    if args.gguf and Path(args.llama_server).exists():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        lc = [args.llama_server, "-m", args.gguf, "--port", str(port), "-t", "1", "-np", str(max(levels)),
              "-c", str(max(levels) * 512), "-fa", "off", "--alias", "bench"]
        proc = start_server(lc, url, env)
        try:
            for c in levels:
                r = asyncio.run(load(url, c, max(4, args.requests_per_stream * c), args.max_tokens, "bench"))
                rows.append(["llama-server", c, f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}x",
                             f"{r['ttft50'] * 1e3:.0f}", f"{r['ttft99'] * 1e3:.0f}", f"{r['tpot50'] * 1e3:.1f}",
                             f"{r['tpot99'] * 1e3:.1f}"])
        finally:
            proc.terminate()
            proc.wait(30)
    else:
        print("llama-server: skipped (no --gguf of this model given)\n")
    print(table(["server", "streams", "output tok/s", "vs sequential", "TTFT p50 ms", "TTFT p99 ms",
                 "TPOT p50 ms", "TPOT p99 ms"], rows))
    if 1 in results and 16 in results:
        print(f"\ngoal 1: 16 streams / 1 stream aggregate = {results[16]['tok_s'] / results[1]['tok_s']:.2f}x "
              f"(goal >= 5x)")
        print(f"goal 2: TTFT p99 at 16 streams / idle TTFT p99 = {results[16]['ttft99'] / results[1]['ttft99']:.2f}x "
              f"(goal <= 3x)")
    print("\nKV blocks one request holds (prompt 200 + 300 new tokens, block 16):")
    print(table(["layer kind", "peak blocks", "bound"], kv_by_kind(model, 200, 300, 16)))


if __name__ == "__main__":
    main()
