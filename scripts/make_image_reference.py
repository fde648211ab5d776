"""Write tests/fixtures/image_reference.json: transformers' Llama4ImageProcessor outputs for many cases.

transformers' processor needs torchvision, which the project's own environment does not carry,
so this oracle runs in a separate one:

    python3 -m venv /tmp/imgoracle
    /tmp/imgoracle/bin/pip install torch==2.14.1 torchvision==0.29.1 "transformers>=5,<6" pillow
    /tmp/imgoracle/bin/pip install --no-deps llama-models==0.3.0   # optional: Meta's transform too
    /tmp/imgoracle/bin/python scripts/make_image_reference.py

Whole tensors would be megabytes, so each case keeps its tile grid, a SHA-256 of the tiles, per-tile
mean and standard deviation, and a few hundred pixels at seeded positions. The inputs are built
from integer formulas (`case_image`), which tests/test_media.py imports to rebuild them exactly.
A sweep of random sizes records the reference's canvas and resize choices without any pixels.
When llama-models is installed, each case also records the tile grid Meta's own
`VariableSizeImageTransform` (plus its global view) chooses and how far its pixels are from
transformers' (Meta resizes with Pillow and normalises in float32).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "image_reference.json"
SAMPLES_PER_CASE = 256
SWEEP_SIZE = 3000

_SIZES = [
    (1, 1), (2, 3), (5, 1), (1, 5), (17, 29), (100, 100), (335, 337), (337, 335),
    (336, 336), (336, 672), (672, 336), (1008, 336), (672, 672), (1344, 1344),
    (1, 1000), (1000, 1), (1, 5000), (3, 4000), (4000, 3), (40, 2000), (2000, 40),
    (600, 800), (800, 600), (1080, 1920), (1920, 1080), (500, 2000), (2000, 500),
    (1321, 1321), (2266, 4532), (768, 1024), (3000, 4000), (4000, 3000),
]
# (name, height, width, max_tiles, tile_size, mode)
CASES = (
    [(f"size-{h}x{w}", h, w, 16, 336, "RGB") for h, w in _SIZES]
    + [(f"max_tiles-{m}", 700, 2100, m, 336, "RGB") for m in range(1, 17)]
    + [(f"max_tiles-{m}-square", 1024, 1000, m, 336, "RGB") for m in (1, 2, 5, 9)]
    + [(f"mode-{mode}", 480, 640, 4, 336, mode)
       for mode in ("RGBA", "LA", "L", "P", "P-transparency", "CMYK", "I;16", "1")]
    + [(f"exif-{o}", 300, 500, 4, 336, f"EXIF{o}") for o in (3, 6, 8)]
    + [("tile224", 500, 900, 8, 224, "RGB"), ("tile448-tiny", 7, 9, 4, 448, "RGB")]
)


def _rgb_array(height: int, width: int) -> np.ndarray:
    """Gradients, checkers and rings: enough structure to expose any resampling difference.

    int32 (exact for sides under 46,000 px) because int64 floor division is several times slower.
    """
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    r = (x * 3 + y * 5 + ((x // 7 + y // 5) % 2) * 90) % 256
    g = (x * y // 3 + 40 * ((x // 13) % 2)) % 256
    b = (255 - (x * x + y * y) // 97) % 256
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


def case_image(height: int, width: int, mode: str) -> Image.Image | bytes:
    """The input of one case: a Pillow image, or PNG bytes for the EXIF cases (decoded by the caller)."""
    rgb = _rgb_array(height, width)
    alpha = ((np.arange(width)[None, :] + np.arange(height)[:, None] * 2) % 256).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]))
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], alpha]))
    if mode == "L":
        return Image.fromarray(rgb[..., 1])
    if mode in ("P", "P-transparency"):
        palette = bytes((i * k) % 256 for i in range(256) for k in (1, 3, 7))
        image = Image.frombytes("P", (width, height), (rgb[..., 0] ^ rgb[..., 2]).tobytes())
        image.putpalette(palette)
        if mode == "P-transparency":
            image.info["transparency"] = 5
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), np.dstack([rgb, alpha]).tobytes())
    if mode == "I;16":
        wide = rgb[..., 0].astype(np.uint16) * 251 + rgb[..., 1].astype(np.uint16)
        return Image.frombytes("I;16", (width, height), wide.astype("<u2").tobytes())
    if mode == "1":
        return Image.fromarray(rgb[..., 2] > 127)
    if mode.startswith("EXIF"):
        exif = Image.Exif()
        exif[0x0112] = int(mode[4:])  # Orientation
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", exif=exif.tobytes())
        return buf.getvalue()
    raise ValueError(f"unknown case mode {mode!r}")


def oracle_input(image: Image.Image | bytes) -> Image.Image:
    """What the reference is given. transformers applies EXIF only when it loads a file itself, and
    clips 16-bit images at 255 where llama4 rescales them, so both are done here first."""
    from PIL import ImageOps

    if isinstance(image, bytes):
        return ImageOps.exif_transpose(Image.open(io.BytesIO(image)))
    if image.mode == "I;16":
        wide = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    return image


def sample_positions(numel: int, name: str) -> list[int]:
    rng = random.Random(name)
    return sorted(rng.randrange(numel) for _ in range(SAMPLES_PER_CASE))


def tiles_digest(tiles) -> str:
    """SHA-256 of a tile tensor's float32 bytes."""
    return hashlib.sha256(tiles.float().contiguous().numpy().tobytes()).hexdigest()


def sweep_sizes() -> list[tuple[int, int, int]]:
    """Random (height, width, max_tiles), weighted towards strips and exact multiples of a tile."""
    rng = random.Random(0)
    out = []
    for _ in range(SWEEP_SIZE):
        kind = rng.random()
        if kind < 0.3:
            h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        elif kind < 0.6:
            h, w = rng.randint(1, 20000), rng.randint(1, 400)
        elif kind < 0.8:
            h = rng.randint(1, 3000)
            w = max(h * rng.randint(1, 16) // rng.randint(1, 16), 1)
        else:
            h = max(336 * rng.randint(1, 8) * rng.randint(1, 16) // rng.randint(1, 16), 1)
            w = rng.randint(1, 6000)
        if rng.random() < 0.5:
            h, w = w, h
        out.append((h, w, rng.randint(1, 16)))
    return out


def meta_tiles(image: Image.Image, max_tiles: int, tile_size: int):
    """Meta's llama-models pipeline (chat_format.ChatFormat): tiles, then the global view if tiled."""
    import torch
    from llama_models.llama4.preprocess import ResizeNormalizeImageTransform, VariableSizeImageTransform

    tiles, grid = VariableSizeImageTransform(tile_size)(image, max_num_chunks=max_tiles)
    if tiles.shape[0] > 1:
        tiles = torch.cat([tiles, ResizeNormalizeImageTransform(tile_size, tile_size)(image)[None]])
    return tiles, list(grid)


def main() -> None:
    import torch
    import transformers
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import SizeDict
    from transformers.models.llama4.image_processing_llama4 import (Llama4ImageProcessor, find_supported_resolutions,
                                                                     get_best_fit, get_max_res_without_distortion)

    with_meta = importlib.util.find_spec("llama_models") is not None
    cases = []
    for name, height, width, max_tiles, tile_size, mode in CASES:
        processor = Llama4ImageProcessor(size={"height": tile_size, "width": tile_size}, max_patches=max_tiles)
        image = oracle_input(case_image(height, width, mode))
        out = processor(images=[image], return_tensors="pt")
        tiles = out["pixel_values"].float()
        rows, cols = out["aspect_ratios"][0].tolist()
        flat = tiles.flatten()
        positions = sample_positions(flat.numel(), name)
        cases.append({
            "name": name, "height": height, "width": width, "max_tiles": max_tiles, "tile_size": tile_size,
            "mode": mode, "grid": [rows, cols], "num_tiles": tiles.shape[0], "sha256": tiles_digest(tiles),
            "tile_mean": [round(v, 7) for v in tiles.mean(dim=(1, 2, 3)).double().tolist()],
            "tile_std": [round(v, 7) for v in tiles.std(dim=(1, 2, 3)).double().tolist()],
            "sample_positions": positions, "sample_values": flat[positions].tolist(),
        })
        if with_meta:
            meta, meta_grid = meta_tiles(Image.fromarray(convert_to_rgb(image, return_numpy=True)), max_tiles, tile_size)
            diff = (meta - tiles).abs() if meta.shape == tiles.shape else None
            cases[-1].update({"meta_grid": meta_grid,
                              "meta_max_abs_diff": None if diff is None else round(diff.max().item(), 6),
                              "meta_mean_abs_diff": None if diff is None else round(diff.mean().item(), 7)})
        print(f"{name:24s} {rows}x{cols} tiles={tiles.shape[0]}", file=sys.stderr)

    # The canvas and resize choices, taken from the reference's own helpers as its processor calls them.
    sweep = []
    tile = SizeDict(height=336, width=336)
    for height, width, max_tiles in sweep_sizes():
        canvases = torch.tensor(find_supported_resolutions.__wrapped__(max_tiles, tile))
        canvas = get_best_fit((height, width), canvases)
        limit = (min(max(height, 336), canvas[0]), min(max(width, 336), canvas[1]))
        new_h, new_w = get_max_res_without_distortion((height, width), limit)
        sweep.append([height, width, max_tiles, *map(int, canvas.tolist()), max(int(new_h), 1), max(int(new_w), 1)])

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generator": "scripts/make_image_reference.py",
        "oracle": f"transformers {transformers.__version__} Llama4ImageProcessor, torch {torch.__version__}"
                  + (", llama-models VariableSizeImageTransform" if with_meta else ""),
        "cases": cases,
        "size_sweep_columns": ["height", "width", "max_tiles", "canvas_h", "canvas_w", "resized_h", "resized_w"],
        "size_sweep": sweep,
    }, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes, {len(cases)} cases, {len(sweep)} sweep sizes)", file=sys.stderr)


if __name__ == "__main__":
    main()
