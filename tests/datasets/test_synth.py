"""The synthetic multimodal dataset: well-formed chat JSONL, readable media, answers that match pixels."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from llama4.cli import main
from llama4.data.synth import COLORS, PLACES, image_sample, make_dataset, render_items


def test_dataset_files(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=30, n_heldout=10, video_fraction=0.3, seed=1)
    train = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (root / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(held) == 10
    assert {s["modality"] for s in train} == {"image", "video"}
    for s in train + held:
        user, answer = s["messages"]
        media = user["content"][0]
        url = media.get("image_url", media.get("video_url"))["url"]
        assert (root / url).exists()
        assert answer["role"] == "assistant" and answer["content"]
    train_urls = {s["messages"][0]["content"][0].get("image_url", {}).get("url") for s in train}
    held_urls = {s["messages"][0]["content"][0].get("image_url", {}).get("url") for s in held}
    assert not (train_urls & held_urls) - {None}


def test_video_frames_decode_with_motion(tmp_path):
    from llama4.media.video import load_video

    root = make_dataset(tmp_path / "v", n_train=8, n_heldout=0, video_fraction=1.0, seed=2)
    sample = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    frames = load_video(root / sample["messages"][0]["content"][0]["video_url"]["url"], num_frames=4)
    assert [round(f.timestamp, 2) for f in frames] == [0.0, 0.5, 1.0, 1.5]

    def centre(img):  # centre of the non-white pixels
        px = [(x, y) for x in range(img.width) for y in range(img.height) if sum(img.getpixel((x, y))) < 600]
        return sum(p[0] for p in px) / len(px), sum(p[1] for p in px) / len(px)

    (x0, y0), (x1, y1) = centre(frames[0].image), centre(frames[-1].image)
    direction = sample["messages"][1]["content"]
    moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[direction]
    assert moved > 15


def test_answers_match_pixels():
    rng = random.Random(0)
    for _ in range(20):
        items, question, answer = image_sample(rng, "position")
        img = render_items(items, 56, rng)
        qx, qy = PLACES[answer]
        centre = img.getpixel((qx * 28 + 14, qy * 28 + 14))
        assert centre == COLORS[items[0].color]


def test_cli_and_bad_args(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--train", "3", "--heldout", "1"]) == 0
    assert (tmp_path / "c" / "corpus.txt").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--video-fraction", "2"]) == 2
    assert "video_fraction" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(tmp_path / "f", image_size=4)
    assert Image.open(next((tmp_path / "c" / "images").glob("*.png"))).size == (56, 56)
