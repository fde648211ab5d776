"""PNG plots of a run from its `metrics.jsonl`, drawn with Pillow (no plotting dependency).

    loss.png         training loss per step (and the auxiliary loss, when there is one)
    expert_load.png  one strip per MoE layer: x = step, y = expert, colour = that expert's share of the
                     routed tokens relative to an even share (white even, red more, blue fewer)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, M = 800, 400, 60  # canvas and margin


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    written = [plot_loss(rows, out_dir / "loss.png")]
    if any(r.get("expert_load") for r in rows):
        written.append(plot_expert_load(rows, out_dir / "expert_load.png"))
    return written


def _axes(draw: ImageDraw.ImageDraw, x0: float, x1: float, y0: float, y1: float, title: str, xlabel: str) -> None:
    draw.rectangle([M, M // 2, W - 20, H - M], outline="black")
    draw.text((M, 8), title, fill="black")
    draw.text((W // 2 - 20, H - 22), xlabel, fill="black")
    for i in range(5):
        fy = i / 4
        y = H - M - fy * (H - M - M // 2)
        draw.line([M - 4, y, M, y], fill="black")
        draw.text((4, y - 6), f"{y0 + fy * (y1 - y0):.3g}", fill="black")
        x = M + fy * (W - 20 - M)
        draw.line([x, H - M, x, H - M + 4], fill="black")
        draw.text((x - 10, H - M + 6), f"{x0 + fy * (x1 - x0):.0f}", fill="black")


def plot_loss(rows: list[dict], path: Path) -> Path:
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    series = [("loss", (20, 60, 200))] + ([("aux_loss", (220, 120, 0))] if any(r.get("aux_loss") for r in rows)
                                          else [])
    pts = [(r["step"], r[k]) for r in rows for k, _ in series if r.get(k) is not None and math.isfinite(r[k])]
    if not pts:
        img.save(path)
        return path
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    _axes(draw, x0, x1, y0, y1, "training loss" + (" (orange: auxiliary loss)" if len(series) > 1 else ""), "step")

    def xy(s, v):
        return M + (s - x0) / (x1 - x0) * (W - 20 - M), H - M - (v - y0) / (y1 - y0) * (H - M - M // 2)

    for key, colour in series:
        line = [xy(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
    img.save(path)
    return path


def _colour(rel: float) -> tuple[int, int, int]:
    """rel = load / even share: 1 white, 0 blue, >= 2 red."""
    t = max(-1.0, min(1.0, rel - 1.0))
    fade = int(255 * (1 - abs(t)))
    return (255, fade, fade) if t > 0 else (fade, fade, 255)


def plot_expert_load(rows: list[dict], path: Path) -> Path:
    rows = [r for r in rows if r.get("expert_load")]
    layers = sorted(rows[-1]["expert_load"], key=int)
    strip = 24 + max(len(rows[-1]["expert_load"][k]) for k in layers) * 6
    img = Image.new("RGB", (W, 30 + strip * len(layers) + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((M, 8), f"expert load per MoE layer, steps {rows[0]['step']}-{rows[-1]['step']} "
                      f"(white: even share, red: more, blue: fewer)", fill="black")
    width = W - M - 20
    for li, layer in enumerate(layers):
        top = 30 + li * strip
        draw.text((4, top + 4), f"layer {layer}", fill="black")
        E = len(rows[-1]["expert_load"][layer])
        for j, r in enumerate(rows):
            load = r["expert_load"].get(layer)
            if not load:
                continue
            xa, xb = M + j * width / len(rows), M + (j + 1) * width / len(rows)
            for e, share in enumerate(load):
                ya = top + 18 + e * 6
                draw.rectangle([xa, ya, max(xa, xb - 1), ya + 5], fill=_colour(share * E))
    img.save(path)
    return path
