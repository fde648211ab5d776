"""Chat messages with images and videos -> prompt ids with `<|patch|>` slots + the tiles that fill them.

The glue between the media loaders (`media.load_image` / `preprocess_image`, `video.load_video`), the
chat format (`Tokenizer.encode_dialog`, which needs each image's tile grid and each video's frame
times before it can lay out the slots) and the model (`model(ids, pixel_values=...)`, which writes the
tiles' features into the slots in order). Every tile size and slot count comes from the model config.

Shape legend: N tiles, C channels, S tile side in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..text.chat import MediaSlot, media_url
from ..config import Llama4Config
from .image import load_image, preprocess_image
from ..text.tokenizer import Tokenizer


@dataclass
class Prompt:
    ids: list[int]
    pixel_values: torch.Tensor | None  # [N, C, S, S]: every tile of every image / frame, in prompt order
    media: list[MediaSlot]  # where each image block (or video frame) sits in `ids`


def user_message(text: str, images: Sequence[str] = (), videos: Sequence[str] = ()) -> dict:
    """One user turn for `--prompt TEXT --image PATH ... --video PATH`: media first, then the question."""
    parts = [{"type": "image_url", "image_url": {"url": str(p)}} for p in images]
    parts += [{"type": "video_url", "video_url": {"url": str(p)}} for p in videos]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _media_parts(messages: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(kind, url, where) for every image_url / video_url part, in the order the chat layer meets them."""
    found = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list):
            continue  # plain text (or malformed: encode_dialog reports that with its own message)
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in ("image_url", "video_url"):
                where = f"messages[{i}].content[{j}]"
                found.append((kind, media_url(part, kind, where), where))
    return found


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[dict], config: Llama4Config, *,
                  max_tiles: int = 16, num_frames: int = 8, fps: float | None = None,
                  add_generation_prompt: bool = True) -> Prompt:
    """Load and tile every image (up to `max_tiles` tiles + a thumbnail) and sample every video
    (`num_frames` frames, one tile each), then render the chat with matching `<|patch|>` slots.

    Media may be local paths, file:// or data: URLs; network URLs are refused by the loaders.
    """
    parts = _media_parts(messages)
    if not parts:
        enc = tokenizer.encode_dialog(messages, add_generation_prompt)
        return Prompt(enc.ids, None, enc.media)
    v = config.vision
    if v is None:
        raise ValueError(f"{parts[0][2]}: the prompt has {parts[0][0]} parts but this model is text-only "
                         f"(its config has no vision_config)")
    patch_id = tokenizer.special_tokens["<|patch|>"]
    if patch_id != config.image_token_index:
        raise ValueError(f"the tokenizer's <|patch|> id {patch_id} differs from the model's image_token_index "
                         f"{config.image_token_index}: image features would land in the wrong places")
    from .video import load_video  # PyAV is only needed when a prompt has a video

    grids, frame_times, tiles = [], [], []
    for kind, url, _ in parts:
        if kind == "image_url":
            tiles_NCSS, grid = preprocess_image(load_image(url), tile_size=v.image_size, max_tiles=max_tiles)
            grids.append(grid)
            tiles.append(tiles_NCSS)
        else:
            frames = load_video(url, num_frames=num_frames, fps=fps)
            frame_times.append([f.timestamp for f in frames])
            # A frame is one tile (grid 1x1), so the chat layer writes one `<|image|>` view per frame.
            tiles += [preprocess_image(f.image, tile_size=v.image_size, max_tiles=1)[0] for f in frames]
    enc = tokenizer.encode_dialog(messages, add_generation_prompt, image_grids=grids, video_frames=frame_times,
                                  tokens_per_tile=v.tokens_per_tile)
    pixels_NCSS = torch.cat(tiles)
    n_slots = sum(t == patch_id for t in enc.ids)
    assert n_slots == pixels_NCSS.shape[0] * v.tokens_per_tile, (n_slots, pixels_NCSS.shape)
    return Prompt(enc.ids, pixels_NCSS, enc.media)
