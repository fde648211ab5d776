"""Quality of each quantization scheme against bf16 on the shipped default model.

For every scheme: top-1 next-token agreement with bf16 and mean KL(bf16 || scheme) over every position
of the held-out prompts (teacher forcing, images included), and the held-out accuracy that
`llama4 eval` reports (greedy answers). Goals (issue 15): int8 >= 99% top-1, int4 g128 >= 95%,
accuracy within 2 points of bf16.

    flock /tmp/bench.lock env PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_quant_quality.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import llama4
from llama4.eval.synth_qa import evaluate, heldout_synthetic, read_samples
from llama4.media.prompt import encode_prompt

from common import ROOT, machine, set_threads, table

MODEL = ROOT / "src" / "llama4" / "assets" / "default_model"
SCHEMES = [("int8", "experts"), ("int8", "all"), ("fp8", "experts"), ("fp8", "all"), ("int4-g32", "experts"),
           ("int4-g64", "experts"), ("int4-g128", "experts"), ("int4-g128", "all")]


def absolute_paths(messages: list, base: Path) -> list:
    """The data file's media paths are relative to it."""
    out = json.loads(json.dumps(messages))
    for msg in out:
        for part in msg["content"] if isinstance(msg.get("content"), list) else []:
            for key in ("image_url", "video_url"):
                if isinstance(part, dict) and isinstance(part.get(key), dict) and not Path(part[key]["url"]).is_absolute():
                    part[key]["url"] = str(base / part[key]["url"])
    return out


def prompts(model, tokenizer, data: Path, n: int):
    """Each held-out conversation with its answer, as ids [1, T] and pixel values."""
    out = []
    for s in read_samples(data)[:n]:
        p = encode_prompt(tokenizer, absolute_paths(s["messages"], data.parent), model.config, num_frames=4,
                          add_generation_prompt=False)
        out.append((torch.tensor([p.ids]), p.pixel_values))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200, help="held-out samples for accuracy and agreement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    print(machine())
    tokenizer = llama4.Tokenizer(MODEL / "tokenizer.json")
    base = llama4.load(MODEL, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        data = heldout_synthetic(base, Path(tmp), args.samples, seed=0)
        ps = prompts(base, tokenizer, data, args.samples)
        with torch.no_grad():
            ref = [base(ids, pixel_values=px).float() for ids, px in ps]
        acc_base = evaluate(base, tokenizer, data).summary()["all"]["accuracy"]
        rows = [["bf16", "-", "100.00%", "0", f"{acc_base:.1%}", "-"]]
        for scheme, only in SCHEMES:
            model = llama4.load(MODEL, dtype=torch.bfloat16, quantize=scheme.replace("-g128", ""), quantize_only=only)
            agree = total = 0
            kl_sum = 0.0
            with torch.no_grad():
                for (ids, px), r in zip(ps, ref):
                    q = model(ids, pixel_values=px).float()
                    agree += int((q.argmax(-1) == r.argmax(-1)).sum())
                    total += r.shape[0] * r.shape[1]
                    kl_sum += float(F.kl_div(F.log_softmax(q, -1), F.log_softmax(r, -1), log_target=True,
                                             reduction="sum"))
            acc = evaluate(model, tokenizer, data).summary()["all"]["accuracy"]
            rows.append([scheme, only, f"{agree / total:.2%}", f"{kl_sum / total:.2e}", f"{acc:.1%}",
                         f"{(acc - acc_base) * 100:+.1f}"])
            print(rows[-1], flush=True)
    print(f"\ndefault model, {args.samples} held-out samples ({total} teacher-forced positions), bf16 activations")
    print(table(["scheme", "quantized", "top-1 agreement", "mean KL", "held-out accuracy", "vs bf16 (points)"], rows))


if __name__ == "__main__":
    main()
