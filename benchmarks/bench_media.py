"""Image tiling and video sampling speed: llama4 vs transformers' Llama4ImageProcessor.

    PYTHONPATH=src /tmp/imgoracle/bin/python benchmarks/bench_media.py [--repeat 5] [--threads N]

transformers' processor needs torchvision, so this runs in the oracle environment described in
scripts/make_image_reference.py (the project's own environment lacks torchvision; there the
transformers column is skipped). Every image is checked to tile identically on both sides before
its time counts. The video part times `load_video` on a synthetic ten-minute 640x360 clip with
seeking and with decoding every frame, and reports each one's peak memory in a fresh process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import machine, run_measured, set_threads, table, time_interleaved

import llama4

SIZES = [(480, 640), (1080, 1920), (3000, 4000), (336, 4000)]

_VIDEO_RUN = """
import json, sys, time
from llama4 import load_video, video
video.SEEK_AHEAD_S = float(sys.argv[2])
start = time.perf_counter()
frames = load_video(sys.argv[1], num_frames=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start, "frames": len(frames)}))
"""


def photo_like(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:height, :width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], axis=-1)
    noise = rng.integers(-20, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def bench_images(repeat: int) -> None:
    try:
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
        reference = Llama4ImageProcessor()
    except ImportError as e:
        print(f"transformers' Llama4ImageProcessor unavailable ({e}); timing llama4 alone", file=sys.stderr)
        reference = None
    rows = []
    for height, width in SIZES:
        image = photo_like(height, width)
        fns = {"llama4": lambda: llama4.preprocess_image(image)}
        if reference is not None:
            ours, _ = fns["llama4"]()
            theirs = reference(images=[image], return_tensors="pt")["pixel_values"].float()
            assert torch.equal(ours, theirs), f"{height}x{width}: outputs differ"
            fns["transformers"] = lambda: reference(images=[image], return_tensors="pt")
        times = time_interleaved(fns, repeat=repeat)
        ref_ms = f"{times['transformers'] * 1e3:.1f}" if reference is not None else "-"
        ratio = f"{times['transformers'] / times['llama4']:.2f}x" if reference is not None else "-"
        rows.append([f"{height}x{width}", f"{times['llama4'] * 1e3:.1f}", ref_ms, ratio])
    print(table(["image (HxW)", "llama4 ms", "transformers ms", "speed-up"], rows))


def bench_video() -> None:
    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ten_minutes.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            frame = np.zeros((360, 640, 3), np.uint8)
            for i in range(600 * 25):
                frame[:] = 0
                frame[100:160, (i * 4) % 580:(i * 4) % 580 + 60] = 255
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        rows = []
        for label, seek_ahead_s, num_frames in [("8 frames, seeking", 4.0, 8), ("8 frames, decode all", 1e9, 8),
                                                ("64 frames, seeking", 4.0, 64)]:
            result, peak = run_measured(_VIDEO_RUN, str(path), str(seek_ahead_s), str(num_frames))
            rows.append([label, f"{result['seconds']:.2f}", f"{peak / 2**20:.0f}"])
        print(table(["10-min 640x360 clip", "seconds", "peak RSS MiB (process)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine())
    bench_images(args.repeat)
    bench_video()


if __name__ == "__main__":
    main()
