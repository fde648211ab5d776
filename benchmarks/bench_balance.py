"""Expert balancing and portability: loss-free bias vs auxiliary loss vs nothing, on a short real run.

Each setting trains the same tiny MoE model (same data, seed and steps) with `llama4 train`'s loop, then
evaluates the final checkpoint on held-out text twice: as llama4 computes it (with the routing bias it
trained) and as transformers / vLLM / llama.cpp compute it (the same weights, no bias: they ignore
expert_bias.json). Figures: training loss and imbalance (busiest expert's load / mean; 1.0 = perfect)
over the last steps, held-out loss and imbalance both ways, and the logits' relative difference.

    nice -n 10 env PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_balance.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SETTINGS = {  # name -> (bias_update_rate, aux_loss_coef)
    "loss-free bias 1e-3": (1e-3, 0.0),
    "loss-free bias 1e-2": (1e-2, 0.0),
    "aux loss 1e-2": (0.0, 1e-2),
    "aux loss 1e-3": (0.0, 1e-3),
    "none": (0.0, 0.0),
}
ROOT = Path(__file__).resolve().parents[1]


def corpora(tmp: Path) -> tuple[Path, str]:
    """Training text: this package's sources and docs; held-out text: the README (never trained on)."""
    train = tmp / "train.txt"
    files = sorted((ROOT / "src" / "llama4").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md"))
    train.write_text("\n".join(f.read_text() for f in files))
    return train, (ROOT / "README.md").read_text()


@torch.no_grad()
def evaluate(model, ids, seq: int, with_bias: bool):
    """Held-out loss and imbalance with the model's routing bias, or with it zeroed (as other frameworks run)."""
    from llama4.model.moe import MoE
    from llama4.train.balance import imbalance

    moes = [b.feed_forward for b in model.layers if isinstance(b.feed_forward, MoE)]
    saved = [m.expert_bias.clone() for m in moes]
    counts = [torch.zeros(m.n_experts) for m in moes]
    hooks = []
    for j, m in enumerate(moes):
        if not with_bias:
            m.expert_bias.zero_()

        def count(mod, args, logits_NE, j=j, m=m):  # the choice the MoE makes: fp32 logits plus its bias
            idx = torch.topk(logits_NE.float() + m.expert_bias, m.top_k, dim=-1).indices
            counts[j] += torch.bincount(idx.flatten(), minlength=m.n_experts)
        hooks.append(m.router.register_forward_hook(count))
    n = (len(ids) - 1) // seq * seq
    x = torch.tensor(ids[:n]).view(-1, seq)
    y = torch.tensor(ids[1:n + 1]).view(-1, seq)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()
    for h in hooks:
        h.remove()
    for m, b in zip(moes, saved):
        m.expert_bias.copy_(b)
    load = [(c / c.sum()).tolist() for c in counts]
    return loss, imbalance(load), logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--only", nargs="*", default=None, help="run only these settings (names as in SETTINGS)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import llama4
    from llama4.text.bpe import train_tokenizer
    from llama4.train import config_from_dict, latest_checkpoint
    from llama4.train import run as train_run

    tmp = Path(tempfile.mkdtemp(prefix="bench_balance_"))
    train_file, held_out = corpora(tmp)
    tok = llama4.Tokenizer(train_tokenizer([train_file], 1000, tmp / "tok"))
    held_ids = tok.encode(held_out)[:4097]
    rows = {}
    for name, (rate, aux) in SETTINGS.items():
        if a.only is not None and name not in a.only:
            continue
        out = tmp / name.replace(" ", "_")
        cfg = {"model": {"preset": "tiny", "text_only": True,
                         "overrides": {"num_local_experts": a.experts, "interleave_moe_layer_step": 1}},
               "data": {"paths": [str(train_file)], "tokenizer": str(tok.path), "seq_len": 128, "batch_size": 8},
               "optim": {"lr": 3e-3, "warmup_steps": 10},
               "moe": {"bias_update_rate": rate, "aux_loss_coef": aux},
               "train": {"steps": a.steps, "out_dir": str(out), "progress": False, "seed": 0},
               "checkpoint": {"every": 0}}
        train_run(config_from_dict(cfg))
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-20:]
        model = llama4.load(latest_checkpoint(out)).eval()
        loss_b, imb_b, logits_b = evaluate(model, held_ids, 128, with_bias=True)
        loss_n, imb_n, logits_n = evaluate(model, held_ids, 128, with_bias=False)
        rel = float((logits_b - logits_n).norm() / logits_b.norm())
        rows[name] = dict(train_loss=sum(r["loss"] for r in last) / len(last),
                          train_imbalance=sum(r["imbalance"] for r in last) / len(last),
                          held_loss_llama4=loss_b, held_imbalance_llama4=imb_b,
                          held_loss_elsewhere=loss_n, held_imbalance_elsewhere=imb_n, logits_rel_diff=rel)
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\n{a.steps} steps, tiny preset text-only with {a.experts} experts on every layer (top-1), "
          f"seq 128 x batch 8; last-20-step means; held-out = README.md ({len(held_ids)} tokens)\n")
    print("| balancing | train loss | train imbalance | held-out loss (llama4) | held-out loss (transformers/"
          "vLLM/llama.cpp) | held-out imbalance (llama4 / elsewhere) | logits rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_loss']:.3f} | {r['train_imbalance']:.2f} | {r['held_loss_llama4']:.3f} | "
              f"{r['held_loss_elsewhere']:.3f} | {r['held_imbalance_llama4']:.2f} / {r['held_imbalance_elsewhere']:.2f} | "
              f"{r['logits_rel_diff']:.1%} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
