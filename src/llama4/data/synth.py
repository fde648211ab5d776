"""A synthetic multimodal task: images of coloured shapes and short videos of a moving square, with
question/answer pairs, written as chat JSONL that `llama4 train` reads.

Small enough that a tiny Llama 4 learns it on a laptop CPU, and varied enough to need every part of
the model: the vision tower must see colour, shape, count and position; video questions need the
decoder to compare frames across the token stream.

Layout of a generated dataset directory:
    train.jsonl, heldout.jsonl   one chat sample per line, with "task" and "modality" fields
    images/*.png, videos/*.mp4   paths in the JSONL are relative to the directory
    corpus.txt                   every text the samples contain (for training a small tokenizer)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
# Quadrants: the tiny tower's 2 x 2 output tokens per tile each see one of these.
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
COUNTS = ("zero", "one", "two", "three", "four")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
IMAGE_TASKS = ("color", "shape", "count", "position")


@dataclass
class Item:
    shape: str
    color: str
    place: str


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render_items(items: list[Item], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    q = size / 2
    for it in items:
        qx, qy = PLACES[it.place]
        r = q * rng.uniform(0.28, 0.4)
        jitter = q * 0.08
        cx = qx * q + q / 2 + rng.uniform(-jitter, jitter)
        cy = qy * q + q / 2 + rng.uniform(-jitter, jitter)
        draw_shape(draw, it.shape, it.color, cx, cy, r)
    return image


def image_sample(rng: random.Random, task: str) -> tuple[list[Item], str, str]:
    """Items to draw, a question about them and its one-or-two-word answer."""
    n = 1 if task == "position" else rng.randint(1, 3)
    places = rng.sample(list(PLACES), n)
    shapes = rng.sample(SHAPES, n)  # distinct shapes and colours keep every question unambiguous
    colors = rng.sample(list(COLORS), n)
    items = [Item(s, c, p) for s, c, p in zip(shapes, colors, places)]
    target = rng.choice(items)
    if task == "color":
        return items, f"What color is the {target.shape}?", target.color
    if task == "shape":
        return items, f"What shape is {target.color}?", target.shape
    if task == "count":
        return items, "How many shapes are there?", COUNTS[n]
    return items, f"Where is the {target.shape}?", target.place


def video_frames(rng: random.Random, size: int, n_frames: int) -> tuple[list[Image.Image], str, str]:
    """A square crossing the frame in one direction; the question asks which way it moves."""
    color = rng.choice(list(COLORS))
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    r = size * rng.uniform(0.12, 0.16)
    lo, hi = r + 1, size - r - 1
    fixed = rng.uniform(lo, hi)
    frames = []
    for k in range(n_frames):
        along = lo + (hi - lo) * k / (n_frames - 1)
        if dx:
            cx, cy = (along if dx > 0 else size - along), fixed
        else:
            cx, cy = fixed, (along if dy > 0 else size - along)
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw_shape(ImageDraw.Draw(image), "square", color, cx, cy, r)
        frames.append(image)
    return frames, f"Which way is the {color} square moving?", direction


def write_video(frames: list[Image.Image], path: Path, fps: int = 2) -> None:
    from ..media.video import import_av

    av = import_av()

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: colours must survive compression
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _message(media_part: dict, question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": [media_part, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


def make_dataset(out: str | Path, *, n_train: int = 4000, n_heldout: int = 400, video_fraction: float = 0.25,
                 image_size: int = 56, video_frames_n: int = 4, seed: int = 0) -> Path:
    """Write a synthetic dataset; the held-out split uses its own random stream (no shared images)."""
    if n_train < 0 or n_heldout < 0 or not 0 <= video_fraction <= 1:
        raise ValueError(f"need n_train, n_heldout >= 0 and 0 <= video_fraction <= 1, got {n_train}, {n_heldout}, "
                         f"{video_fraction}")
    if image_size < 16 or video_frames_n < 2:
        raise ValueError(f"image_size must be >= 16 and video frames >= 2, got {image_size}, {video_frames_n}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root}: exists and is not a directory (the dataset is written into a directory)")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(exist_ok=True)
    corpus = set()
    for split, n, split_seed in (("train", n_train, seed), ("heldout", n_heldout, seed + 1_000_003)):
        rng = random.Random(split_seed)
        lines = []
        for i in range(n):
            name = f"{split}-{i:06d}"
            if rng.random() < video_fraction:
                frames, question, answer = video_frames(rng, image_size, video_frames_n)
                write_video(frames, root / "videos" / f"{name}.mp4")
                part = {"type": "video_url", "video_url": {"url": f"videos/{name}.mp4"}}
                sample = {"messages": _message(part, question, answer), "task": "motion", "modality": "video"}
            else:
                task = rng.choice(IMAGE_TASKS)
                items, question, answer = image_sample(rng, task)
                render_items(items, image_size, rng).save(root / "images" / f"{name}.png")
                part = {"type": "image_url", "image_url": {"url": f"images/{name}.png"}}
                sample = {"messages": _message(part, question, answer), "task": task, "modality": "image"}
            corpus.update((question, answer))
            lines.append(json.dumps(sample))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "corpus.txt").write_text("\n".join(sorted(corpus)) + "\n")
    return root
