"""`llama4 data synth`: write the synthetic shapes / moving-square QA set."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_threads, apply_threads
from ..data.synth import make_dataset


def cmd_synth(args: argparse.Namespace) -> int:
    apply_threads(args)
    root = make_dataset(args.out, n_train=args.train, n_heldout=args.heldout, video_fraction=args.video_fraction,
                        image_size=args.image_size, video_frames_n=args.frames, seed=args.seed)
    print(f"wrote {args.train} training and {args.heldout} held-out samples to {root}")
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="synthetic shapes / moving-square dataset with questions and answers")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=4000, help="training samples")
    s.add_argument("--heldout", type=int, default=400, help="held-out samples")
    s.add_argument("--video-fraction", type=float, default=0.25, help="share of samples that are videos")
    s.add_argument("--image-size", type=int, default=56, help="image and video side in pixels")
    s.add_argument("--frames", type=int, default=4, help="frames per video")
    s.add_argument("--seed", type=int, default=0)
    add_threads(s)
    s.set_defaults(func=cmd_synth)
