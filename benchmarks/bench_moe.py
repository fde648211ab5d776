"""MoE layer: this project's sparse dispatch vs transformers' `Llama4TextMoe` vs a dense SwiGLU.

The dense SwiGLU has the MoE's *active* parameters: hidden size 2F (the shared expert plus the one
routed expert each token uses), run on the same tokens. All three share one set of weights where
they overlap, and the two MoEs' outputs are checked against each other before timing.

    .venv/bin/python benchmarks/bench_moe.py            # E = 16 and 128, 2048 tokens, fp32 and bf16
    .venv/bin/python benchmarks/bench_moe.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse

import torch

import llama4
from common import dtype_arg, machine, set_threads, table, time_wall_cpu
from llama4.model.layers import SwiGLU
from llama4.model.moe import MoE

GOAL_VS_HF = {16: 10.0, 128: 40.0}  # the targets: speedup over transformers
GOAL_VS_DENSE = {16: 1.2, 128: 1.5}  # and the most our time may be over the dense SwiGLU's


def build(E: int, D: int, F: int, dtype: torch.dtype, seed: int = 0):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    torch.manual_seed(seed)
    cfg = llama4.TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=1,
                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, head_dim=D // 8)
    ours = MoE(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, D ** -0.5)
    ours = ours.to(dtype).eval()
    ours.expert_bias = torch.zeros(E)
    hf = Llama4TextMoe(Llama4TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                        num_experts_per_tok=1)).to(dtype).eval()
    # Same tensors, not copies: E = 128 expert weights are large.
    hf.router.weight = ours.router.weight
    hf.experts.gate_up_proj = ours.experts.gate_up_proj
    hf.experts.down_proj = ours.experts.down_proj
    hf.shared_expert.gate_proj.weight = ours.shared_expert.w1.weight
    hf.shared_expert.up_proj.weight = ours.shared_expert.w3.weight
    hf.shared_expert.down_proj.weight = ours.shared_expert.w2.weight
    dense = SwiGLU(D, 2 * F)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, D ** -0.5)
    return ours, hf, dense.to(dtype).eval()


def run_case(E: int, D: int, F: int, T: int, dtype: torch.dtype, repeat: int) -> list[object]:
    ours, hf, dense = build(E, D, F, dtype)
    x_BTD = torch.randn(1, T, D, dtype=dtype)
    with torch.no_grad():
        ref = hf(x_BTD)[0].float()
        err = float((ours(x_BTD).float().view_as(ref) - ref).abs().max() / ref.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:  # NaN fails too
        raise SystemExit(f"E={E} {dtype}: our MoE differs from transformers' by {err:.2e} (> {tol:g}); not timing")
    t = time_wall_cpu({"ours": lambda: ours(x_BTD), "hf": lambda: hf(x_BTD), "dense": lambda: dense(x_BTD)},
                      repeat=repeat)
    cells = [E, str(dtype).removeprefix("torch.")]
    for i in (0, 1):  # wall, then CPU
        vs_hf, vs_dense = t["hf"][i] / t["ours"][i], t["ours"][i] / t["dense"][i]
        met = E in GOAL_VS_HF and vs_hf >= GOAL_VS_HF[E] and vs_dense <= GOAL_VS_DENSE[E]
        cells += [f"{t['ours'][i] * 1e3:.0f}", f"{t['hf'][i] * 1e3:.0f}", f"{t['dense'][i] * 1e3:.0f}",
                  f"{vs_hf:.1f}x", f"{vs_dense:.2f}x", "both met" if met else _which_missed(E, vs_hf, vs_dense)]
    return cells + [f"{err:.1e}"]


def _which_missed(E: int, vs_hf: float, vs_dense: float) -> str:
    if E not in GOAL_VS_HF:
        return "-"
    missed = [f"vs HF (< {GOAL_VS_HF[E]:g}x)"] if vs_hf < GOAL_VS_HF[E] else []
    missed += [f"vs dense (> {GOAL_VS_DENSE[E]:g}x)"] if vs_dense > GOAL_VS_DENSE[E] else []
    return "missed " + ", ".join(missed)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--dim", type=int, default=1024, help="model dim D")
    ap.add_argument("--hidden", type=int, default=1024, help="expert hidden size F")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="D=256, F=256, 512 tokens, 2 repeats")
    a = ap.parse_args()
    if a.quick:
        a.dim, a.hidden, a.tokens, a.repeat = 256, 256, 512, 2
    set_threads(a.threads)
    print(f"# MoE layer, top-1 routing + shared expert: D={a.dim}, F={a.hidden}, {a.tokens} tokens, "
          f"median of {a.repeat} interleaved runs (wall and process CPU time)\n# {machine()}")
    rows = []
    for E in a.experts:
        for name in a.dtypes:
            rows.append(run_case(E, a.dim, a.hidden, a.tokens, dtype_arg(name), a.repeat))
            print(f"  done E={E} {name}", flush=True)
    heads = ["ours ms", "HF ms", "dense ms", "HF / ours", "ours / dense", "goals"]
    print(table(["E", "dtype", *[f"{h} (wall)" for h in heads], *[f"{h} (CPU)" for h in heads], "rel diff vs HF"],
                rows))
    print("HF = transformers' Llama4TextMoe; dense = one SwiGLU with hidden 2F (the MoE's active parameters).")


if __name__ == "__main__":
    main()
