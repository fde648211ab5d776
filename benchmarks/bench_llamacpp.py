"""llama4 against llama.cpp on the same random Llama 4 checkpoint, each precision against its counterpart.

A random checkpoint (hidden 512 or 1024, 8 layers, 16 experts on every layer, F=1024, the default
model's 2,400-token vocabulary) is saved by llama4 and converted by llama.cpp's own
convert_hf_to_gguf.py; Q4_0 comes from llama-quantize. Pairs: fp32 vs F32, bf16 vs BF16, int8
(per channel, every linear) vs Q8_0, int4 g32 (every linear) vs Q4_0 (also 32-value blocks).
Prefill: a 512-token prompt. Decode: 128 greedy tokens after that prompt (llama-bench `-d 512 -n 128`;
llama4: generate(prompt, 128) minus generate(prompt, 1)). Medians of interleaved rounds.
llama.cpp runs with flash attention off (its CPU flash attention is approximate).

    bash scripts/build_llamacpp.sh   # or reuse /work/llama.cpp (LLAMACPP_DIR)
    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/bench_llamacpp.py --dims 512 1024 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, machine, table

LLAMACPP = Path(os.environ.get("LLAMACPP_DIR", "/work/llama.cpp"))
TOKENIZER = ROOT / "src" / "llama4" / "assets" / "default_model" / "tokenizer.json"
PAIRS = [("fp32", "F32"), ("bf16", "BF16"), ("int8", "Q8_0"), ("int4-g32", "Q4_0")]

# The converter refuses a BPE tokenizer whose pre-tokenizer hash it does not know (ours is small and
# trained here); its regex is Llama 4's, so name it that.
CONVERT = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama4"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
"""


def make_checkpoint(path: Path, dim: int) -> Path:
    import llama4

    vocab = len(json.loads(TOKENIZER.read_text())["model"]["vocab"]) + len(json.loads(TOKENIZER.read_text())["added_tokens"])
    # llama.cpp hard-codes chunk 8192, floor_scale 8192, attn_scale 0.1 and NoPE on every 4th layer:
    # the config uses exactly those so that both compute the same model.
    text = llama4.TextConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=dim // 8, intermediate_size=1024,
                             intermediate_size_mlp=1024, num_local_experts=16, num_experts_per_tok=1,
                             interleave_moe_layer_step=1, attention_chunk_size=8192, floor_scale=8192,
                             attn_scale=0.1, max_position_embeddings=1 << 16, bos_token_id=1, eos_token_id=[2],
                             pad_token_id=0)
    model = llama4.Llama4(llama4.Llama4Config(text, None, name=f"bench{dim}")).init_weights(std=0.05, seed=0)
    llama4.save(model, path)
    shutil.copy(TOKENIZER, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": None, "eos_token": None}))
    return path


def convert(ckpt: Path, out: Path, kind: str) -> Path:
    gguf = out / f"{ckpt.name}-{kind}.gguf"
    if kind == "Q4_0":
        src = convert(ckpt, out, "F32")
        subprocess.run([str(LLAMACPP / "build/bin/llama-quantize"), str(src), str(gguf), "Q4_0"], check=True,
                       capture_output=True)
        return gguf
    outtype = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0"}[kind]
    if not gguf.exists():
        subprocess.run([sys.executable, "-c", CONVERT.format(root=str(LLAMACPP)), str(ckpt), "--outtype", outtype,
                        "--outfile", str(gguf)], check=True, capture_output=True)
    return gguf


def llamacpp(gguf: Path, threads: int, prompt: int, new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s after `prompt` tokens) from one llama-bench run of each test."""
    base = [str(LLAMACPP / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads), "-fa", "0", "-r", "1",
            "-o", "json"]
    pp = json.loads(subprocess.run(base + ["-p", str(prompt), "-n", "0"], check=True, capture_output=True,
                                   text=True).stdout)[0]["avg_ts"]
    tg = json.loads(subprocess.run(base + ["-p", "0", "-n", str(new), "-d", str(prompt)], check=True,
                                   capture_output=True, text=True).stdout)[0]["avg_ts"]
    return pp, tg


def ours(model, prompt_ids: list[int], new: int) -> tuple[float, float]:
    import llama4

    t0 = time.perf_counter()
    llama4.generate(model, prompt_ids, max_new_tokens=1, stop_ids=[])
    t1 = time.perf_counter()
    llama4.generate(model, prompt_ids, max_new_tokens=new, stop_ids=[])
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), (new - 1) / ((t2 - t1) - (t1 - t0))


def load_ours(ckpt: Path, precision: str):
    import llama4

    if precision == "fp32":
        return llama4.load(ckpt, dtype=torch.float32)
    if precision == "bf16":
        return llama4.load(ckpt, dtype=torch.bfloat16)
    return llama4.load(ckpt, dtype=torch.bfloat16, quantize=precision, quantize_only="all")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pairs", nargs="+", default=[p for p, _ in PAIRS], help="llama4 precisions to run")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    if not (LLAMACPP / "build/bin/llama-bench").exists():
        sys.exit(f"no llama.cpp build in {LLAMACPP}: run scripts/build_llamacpp.sh (or set LLAMACPP_DIR)")
    work = a.dir or Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    print(machine())
    rows = []
    for dim in a.dims:
        ckpt = work / f"d{dim}"
        if not ckpt.exists():
            make_checkpoint(ckpt, dim)
        prompt = torch.randint(3, 2000, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        for mine, theirs in [p for p in PAIRS if p[0] in a.pairs]:
            gguf = convert(ckpt, work, theirs)
            model = load_ours(ckpt, mine)
            for threads in a.threads:
                torch.set_num_threads(threads)
                ours(model, prompt[:64], 4)  # warm-up
                res = {"ours": [], "cpp": []}
                for _ in range(a.rounds):  # interleaved, so that machine load hits both alike
                    res["ours"].append(ours(model, prompt, a.new))
                    res["cpp"].append(llamacpp(gguf, threads, a.prompt, a.new))
                med = {k: [statistics.median(x[i] for x in v) for i in range(2)] for k, v in res.items()}
                rows.append([dim, threads, f"{mine} / {theirs}", f"{med['ours'][0]:.0f}", f"{med['cpp'][0]:.0f}",
                             f"{med['ours'][0] / med['cpp'][0]:.2f}", f"{med['ours'][1]:.1f}", f"{med['cpp'][1]:.1f}",
                             f"{med['ours'][1] / med['cpp'][1]:.2f}"])
                print(rows[-1], flush=True)
            del model
    print(f"\nprompt {a.prompt} tokens, then {a.new} greedy tokens; medians of {a.rounds} interleaved rounds")
    print(table(["D", "threads", "llama4 / llama.cpp", "prefill tok/s llama4", "llama.cpp", "ratio",
                 "decode tok/s llama4", "llama.cpp", "ratio"], rows))


if __name__ == "__main__":
    main()
