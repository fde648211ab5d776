"""Image tiling and video sampling speed: llama4 vs transformers' Llama4ImageProcessor.

    PYTHONPATH=src /tmp/imgoracle/bin/python benchmarks/bench_media.py [--repeat 5] [--threads N]

transformers' processor needs torchvision, so this runs in the oracle environment described in
scripts/make_image_reference.py (the project's own environment lacks torchvision; there the
transformers column is skipped). Every image is checked to tile identically on both sides before
its time counts. The video part samples a synthetic ten-minute 640x360 clip with `load_video`
(seeking, and decoding every frame) and with transformers' `video_utils.load_video` (PyAV backend),
each in a fresh process, and reports how far each raises peak memory.
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

# Peak RSS growth over the call, sampled by a thread: the kernel's peak (ru_maxrss) would include
# the transient peak of importing torch, which can hide everything after it.
_VIDEO_RUN = """
import json, sys, threading, time
from common import rss_bytes
from llama4 import load_video
from llama4.media import video
path, side, num_frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
if side == "transformers":
    from transformers.video_utils import load_video as load
    run = lambda: len(load(path, num_frames=num_frames, backend="pyav")[0])
else:
    video.SEEK_AHEAD_S = 4.0 if side == "llama4" else 1e9
    run = lambda: len(load_video(path, num_frames=num_frames))
before, peak, done = rss_bytes(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_bytes())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
frames = run()
seconds = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps({"seconds": seconds, "frames": frames, "peak_growth": peak[0] - before}))
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
        for num_frames in (8, 64):
            for side in ("llama4", "llama4 (no seeking)", "transformers"):
                try:
                    result, _ = run_measured(_VIDEO_RUN, str(path), side, str(num_frames))
                except RuntimeError as e:  # transformers' video loader is optional
                    print(f"{side}: {e}", file=sys.stderr)
                    continue
                assert result["frames"] == num_frames
                rows.append([f"{num_frames} frames", side, f"{result['seconds']:.2f}",
                             f"{result['peak_growth'] / 2**20:.1f}"])
        print(table(["10-min 640x360 clip", "loader", "seconds", "peak RSS growth MiB"], rows))


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
