"""Packed-document training step: per-document attention (today) vs the [B, 1, T, T] mask (before).

Both sides run the same model, batch and document boundaries: forward with `doc_pos`, cross-entropy,
backward. "mask" swaps `backends.documents_causal` for the old formulation (a boolean [B, 1, T, T]
mask per layer kind, fed to SDPA), which is also the test reference. Each side runs in a fresh
process so its peak RSS is its own; timings are medians over interleaved rounds.

    .venv/bin/python benchmarks/bench_packed.py --threads 1            # D=256, 4 layers, 2 x 4096 tokens
"""

from __future__ import annotations

import argparse

from common import machine, run_measured, table

_CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
import llama4
from llama4.model import backends
side, T, rows, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)

def masked(q, k, v, pos_BT, chunk):
    group = torch.cumsum(pos_BT == 0, dim=1)
    if chunk is not None:
        group = group * (int(pos_BT.max()) // chunk + 1) + pos_BT // chunk
    same = group[:, :, None] == group[:, None, :]
    mask = (same & torch.ones(pos_BT.shape[1], pos_BT.shape[1], dtype=torch.bool).tril()).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

if side == "mask":
    backends.documents_causal = masked
cfg = llama4.preset("tiny").replace(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=64, intermediate_size=512, intermediate_size_mlp=1024,
                                    attention_chunk_size=512, max_position_embeddings=1 << 16)
cfg.vision = None
model = llama4.Llama4(cfg).init_weights(seed=0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 4096, (rows, T), generator=g)
pos = []
for _ in range(rows):
    parts, n = [], 0
    while n < T:
        L = min(int(torch.randint(64, 1024, (1,), generator=g)), T - n)
        parts.append(torch.arange(L)); n += L
    pos.append(torch.cat(parts))
doc_pos = torch.stack(pos)
times = []
for _ in range(repeat + 1):
    t = time.perf_counter()
    logits = model(ids, doc_pos=doc_pos)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 4096), ids[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps({"s": sorted(times[1:])[len(times[1:]) // 2], "loss": float(loss.detach())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per row")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(machine())
    res = {}
    for side in ("documents", "mask", "documents", "mask"):  # interleaved: load hits both alike
        r, peak = run_measured(_CHILD, side, str(a.tokens), str(a.rows), str(a.threads), str(a.repeat))
        best = res.get(side)
        res[side] = (min(r["s"], best[0]) if best else r["s"], max(peak, best[1]) if best else peak, r["loss"])
    tok = a.rows * a.tokens
    print(f"packed training step (fwd + bwd), D=256, 4 layers (1 global), chunk 512, {a.rows} x {a.tokens} tokens, "
          f"documents of 64-1023 tokens, fp32, {a.threads} thread(s)")
    print(table(["attention", "step s", "tokens/s", "peak RSS MiB", "loss"],
                [[side, f"{s:.3f}", f"{tok / s:,.0f}", f"{peak / 2**20:,.0f}", f"{loss:.6f}"]
                 for side, (s, peak, loss) in res.items()]))
    d, m = res["documents"], res["mask"]
    print(f"per-document vs mask: {m[0] / d[0]:.2f}x faster, {d[1] / m[1]:.2f}x the peak memory")


if __name__ == "__main__":
    main()
