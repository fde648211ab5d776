"""`llama4 demo`: the default model, a tiny Llama 4 trained on the synthetic shapes task, answering
questions about images and a video it has never seen.

Every part of the architecture is in it: the ViT tower with 2D RoPE and pixel shuffle, early fusion at
the `<|patch|>` slots, iRoPE (chunked local RoPE layers and a global NoPE layer with temperature
tuning) and a sparse MoE with a shared expert in every layer. `docs/default_model.md` says how it was
trained (the exact command and its log).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from importlib import resources
from pathlib import Path

import torch

DEFAULT_MODEL = "default_model"


def default_model_path() -> Path:
    """The checkpoint shipped inside the package (config.json, model.safetensors, tokenizer.json)."""
    path = Path(str(resources.files("llama4") / "assets" / DEFAULT_MODEL))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the default model is missing from this installation")
    return path


def _questions(root: Path, image_size: int, seed: int) -> list[tuple[dict, str]]:
    """Fresh images and a video (a seed the training data never used) with questions and answers."""
    from ..media.prompt import user_message
    from ..data.synth import image_sample, render_items, video_frames, write_video

    rng = random.Random(seed)
    out = []
    for task in ("color", "shape", "count", "position"):
        items, question, answer = image_sample(rng, task)
        path = root / f"{task}.png"
        render_items(items, image_size, rng).save(path)
        out.append((user_message(question, images=[str(path)]), answer))
    frames, question, answer = video_frames(rng, image_size, 4)
    path = root / "clip.mp4"
    write_video(frames, path)
    out.append((user_message(question, videos=[str(path)]), answer))
    return out


def run_demo(model_dir: Path | None = None, *, seed: int = 2026, out=None) -> list[tuple[str, str, str]]:
    """Ask the default model (or `model_dir`) five questions; returns (question, expected, answer)."""
    import sys

    from ..checkpoint import load
    from ..generation import generate
    from ..media.prompt import encode_prompt
    from ..text.tokenizer import Tokenizer

    out = out or sys.stdout
    model_dir = Path(model_dir) if model_dir else default_model_path()
    model = load(model_dir)
    tokenizer = Tokenizer(model_dir)
    stop = set(model.config.text.eos_token_id)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for message, expected in _questions(Path(tmp), model.config.vision.image_size, seed):
            prompt = encode_prompt(tokenizer, [message], model.config, num_frames=4)
            with torch.no_grad():
                new = generate(model, prompt.ids, max_new_tokens=8, pixel_values=prompt.pixel_values)
            answer = tokenizer.decode([t for t in new if t not in stop]).strip()
            media = message["content"][0]
            kind = "video" if media["type"] == "video_url" else "image"
            name = Path(media[media["type"]]["url"]).name
            question = message["content"][-1]["text"]
            mark = "ok" if answer.lower() == expected else f"expected {expected!r}"
            print(f"[{kind} {name:>12}] {question:<40} -> {answer!r:<16} ({mark})", file=out)
            results.append((question, expected, answer))
    return results


def cmd_demo(args: argparse.Namespace) -> int:
    from .common import apply_threads

    apply_threads(args)
    path = Path(args.model) if args.model else default_model_path()
    print(f"llama4 demo: {path}")
    results = run_demo(path, seed=args.seed)
    right = sum(a.lower() == e for _, e, a in results)
    print(f"{right}/{len(results)} answers correct on fresh images and a video (seed {args.seed}); "
          f"`llama4 eval --model {path}` scores the 400 held-out questions.")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the default tiny Llama 4 answering questions about images and a video")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped default model)")
    p.add_argument("--seed", type=int, default=2026, help="seed for the fresh images and video")
    from .common import add_threads

    add_threads(p)
    p.set_defaults(func=cmd_demo)
