"""Vision encoder throughput (tiles/s): this project's `VisionEncoder` vs transformers' `Llama4VisionModel`
+ `Llama4MultiModalProjector`, on the same weights (copied through the checkpoint key map), same tiles.

Scout's tower is 34 layers of width 1408 on 336-px tiles. Every layer is identical, so the ratio does
not depend on depth; `--layers` trims it to keep a CPU run short (34 = the full tower).

    .venv/bin/python benchmarks/bench_vision.py                    # Scout geometry, 4 layers, 4 tiles
    .venv/bin/python benchmarks/bench_vision.py --layers 34 --dtype bf16
    .venv/bin/python benchmarks/bench_vision.py --quick            # the tiny preset's tower, seconds
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import llama4
from common import dtype_arg, machine, set_threads, table, time_interleaved
from llama4.checkpoint import KeyMap
from llama4.model.vision import VisionEncoder

TEXT_DIM = 5120  # Scout's text width: the projector's output


def build(v: llama4.VisionConfig, text_dim: int, dtype: torch.dtype, seed: int = 0):
    """(transformers tower, transformers projector, ours) sharing one random set of weights."""
    from transformers import Llama4Config as HFConfig
    from transformers import Llama4TextConfig, Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    d = dataclasses.asdict(v)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    hf_v = Llama4VisionConfig(**d)
    torch.manual_seed(seed)
    with torch.device("meta"):
        tower = Llama4VisionModel(hf_v)
        projector = Llama4MultiModalProjector(HFConfig(vision_config=hf_v,
                                                       text_config=Llama4TextConfig(hidden_size=text_dim)))
    tower = tower.to_empty(device="cpu")
    tower.set_attn_implementation("sdpa")  # what from_pretrained picks by default, its fastest on CPU
    projector = projector.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in [*tower.named_parameters(), *projector.named_parameters()]:
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    ours = VisionEncoder(v, text_dim)
    keymap = KeyMap(multimodal=True)
    hf_state = {**{f"vision_model.{k}": t for k, t in tower.state_dict().items()},
                **{f"multi_modal_projector.{k}": t for k, t in projector.state_dict().items()}}
    mapped = {keymap.from_hf(k): t for k, t in hf_state.items() if keymap.from_hf(k) is not None}
    ours.load_state_dict({k.removeprefix("vision."): t for k, t in mapped.items()}, strict=True)
    # Cast parameters only: `Module.to(dtype)` would also cast transformers' complex RoPE buffer to real.
    for p in [*tower.parameters(), *projector.parameters()]:
        p.data = p.data.to(dtype)
    # Buffers built on meta are empty after to_empty: rebuild the RoPE table transformers' way.
    tower.rotary_embedding.freqs_ci = type(tower.rotary_embedding)._compute_freqs_ci(hf_v)
    return tower.eval(), projector.eval(), ours.to(dtype).eval()


def run(v: llama4.VisionConfig, text_dim: int, tiles: int, dtype: torch.dtype, repeat: int) -> list[object]:
    tower, projector, ours = build(v, text_dim, dtype)
    pixels = (torch.rand(tiles, v.num_channels, v.image_size, v.image_size) * 2 - 1).to(dtype)
    theirs = lambda: projector(tower(pixels).last_hidden_state)  # noqa: E731
    mine = lambda: ours(pixels)  # noqa: E731
    with torch.no_grad():
        ref = theirs().float()
        err = float((mine().float() - ref).abs().max() / ref.abs().max())
    t = time_interleaved({"ours": mine, "hf": theirs}, repeat=repeat)
    return [f"{v.num_hidden_layers} x {v.hidden_size}", f"{v.image_size}px", tiles, str(dtype).removeprefix("torch."),
            f"{tiles / t['ours']:.2f}", f"{tiles / t['hf']:.2f}", f"{t['hf'] / t['ours']:.2f}x", f"{err:.1e}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="tower depth (Scout: 34)")
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="the tiny preset's tower (56-px tiles)")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.quick:
        v, text_dim = llama4.preset("tiny").vision, 128
    else:
        v, text_dim = dataclasses.replace(llama4.preset("scout").vision, num_hidden_layers=args.layers), TEXT_DIM
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    rows = [run(v, text_dim, args.tiles, dtype_arg(d), args.repeat) for d in dtypes]
    print(machine())
    print(table(["tower", "tile", "tiles", "dtype", "ours tiles/s", "hf tiles/s", "speedup", "max rel diff"], rows))


if __name__ == "__main__":
    main()
