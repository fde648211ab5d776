"""Llama 4 chat prompts from OpenAI-style messages, rendered as Meta's ChatFormat renders them.

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>     one per message
    <|header_start|>assistant<|header_end|>\\n\\n                    the open turn the model completes

Details follow `llama_models.llama4.chat_format.ChatFormat`, which the tests compare against id for id:
each text part is encoded on its own (so two parts never merge into one token), the `tool` role is
written `ipython`, and tool results and assistant turns that call a tool end with `<|eom|>` (the model
expects to continue after the tool answers) instead of `<|eot|>`.

Images become placeholder blocks whose size depends on the image's tile grid, which only the image
preprocessor knows. The caller passes the grids (or a function computing them); `encode_dialog` returns,
next to the ids, a `MediaSlot` per block saying which image it is and where it sits, so the
multimodal step can put pixels there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence, Union

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Image i's tile grid (rows, cols): a list in image order, or a function of the image URL.
ImageGrids = Optional[Union[Sequence[tuple[int, int]], Callable[[str], tuple[int, int]]]]
# Video v's frame timestamps in seconds: a list in video order, or a function of the video URL.
VideoFrames = Optional[Union[Sequence[Sequence[float]], Callable[[str], Sequence[float]]]]

ROLE_HEADERS = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}
# Meta's built-in tools are called in their own syntax rather than as JSON (llama_models ToolUtils).
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")


@dataclass(frozen=True)
class MediaSlot:
    """One image block: `ids[start:end]` runs from `<|image_start|>` to `<|image_end|>` inclusive."""

    kind: Literal["image", "video"]
    url: str  # the part's image_url / video_url, for the caller to load pixels from
    grid: tuple[int, int]  # tile rows x cols; (1, 1) is one tile with no separate global view
    start: int
    end: int
    message: int  # index of the message the part is in
    frame_time: float | None = None  # seconds into the video, for video frames


@dataclass
class ChatEncoding:
    ids: list[int]
    media: list[MediaSlot]  # in the order the blocks appear in ids


def image_block_ids(tokenizer: Tokenizer, grid: tuple[int, int], tokens_per_tile: int = 144) -> list[int]:
    """Placeholder ids for one image cut into `grid` tiles, `tokens_per_tile` `<|patch|>` ids per tile.

    A multi-tile image lists its tiles row by row (x separators between tiles, a y separator after each
    row), then `<|image|>` and the global thumbnail view; a one-tile image is only the `<|image|>` view.
    """
    sp = tokenizer.special_tokens
    patches = [sp["<|patch|>"]] * tokens_per_tile
    rows, cols = grid
    ids = [sp["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                ids += patches
                if col < cols - 1:
                    ids.append(sp["<|tile_x_separator|>"])
            ids.append(sp["<|tile_y_separator|>"])
    return ids + [sp["<|image|>"]] + patches + [sp["<|image_end|>"]]


def media_url(part: dict, key: str, where: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ValueError(f"{where}: {key} part needs {{'{key}': {{'url': str}}}}, got {value!r}")
    return url


def _tool_call_text(call: object, where: str) -> str:
    """An OpenAI tool call written the way Meta's ToolUtils.encode_tool_call writes it (JSON format)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: expected {{'type': 'function', 'function': {{'name': str, 'arguments': "
                         f"JSON str or dict}}}}, got {call!r}")
    name, args = fn["name"], fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments of {name!r} are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: arguments of {name!r} must be a JSON object, got {args!r}")
    needed = "query" if name in _QUERY_TOOLS else "code" if name == "code_interpreter" else None
    if needed is not None and needed not in args:
        raise ValueError(f"{where}: built-in tool {name!r} needs a {needed!r} argument, got {sorted(args)}")
    if name in _QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    return json.dumps({"type": "function", "name": name, "parameters": args})


class ChatRenderer:
    """Renders messages into ids, recording where each image block lands (shared by prompts and training)."""

    def __init__(self, tokenizer: Tokenizer, image_grids: ImageGrids, video_frames: VideoFrames,
                 tokens_per_tile: int):
        if tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be positive, got {tokens_per_tile}")
        self.tok = tokenizer
        self.image_grids = image_grids
        self.video_frames = video_frames
        self.tokens_per_tile = tokens_per_tile
        self.ids = [tokenizer.bos_id]
        self.media: list[MediaSlot] = []
        self.n_images = 0
        self.n_videos = 0

    def header(self, role: str) -> None:
        sp = self.tok.special_tokens
        self.ids += [sp["<|header_start|>"], *self.tok.encode(ROLE_HEADERS[role]), sp["<|header_end|>"]]
        self.ids += self.tok.encode("\n\n")

    def message(self, index: int, msg: object) -> None:
        where = f"messages[{index}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLE_HEADERS:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLE_HEADERS)}")
        content = msg.get("content")
        if content is None and role == "assistant":  # OpenAI: a pure tool-call turn has no content
            content = ""
        self.header(role)
        if isinstance(content, str):
            self.ids += self.tok.encode(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                self.part(index, part, f"{where}.content[{j}]")
        else:
            raise ValueError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
        calls = msg.get("tool_calls") or []
        if calls and role != "assistant":
            raise ValueError(f"{where}: only assistant messages carry tool_calls, this one is {role!r}")
        if not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
        for k, call in enumerate(calls):
            self.ids += self.tok.encode(_tool_call_text(call, f"{where}.tool_calls[{k}]"))
        self.ids.append(self.tok.eom_id if role == "tool" or calls else self.tok.eot_id)

    def part(self, index: int, part: object, where: str) -> None:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: a text part needs {{'text': str}}, got {part!r}")
            self.ids += self.tok.encode(part["text"])
        elif kind == "image_url":
            url = media_url(part, "image_url", where)
            self.image(index, "image", url, self.grid_for(url, where))
            self.n_images += 1
        elif kind == "video_url":
            url = media_url(part, "video_url", where)
            for t in self.frames_for(url, where):
                self.ids += self.tok.encode(f"Frame at {t:.1f}s:")
                self.image(index, "video", url, (1, 1), float(t))
            self.n_videos += 1
        else:
            raise ValueError(f"{where}: expected a part {{'type': 'text' | 'image_url' | 'video_url', ...}}, "
                             f"got {part!r}")

    def image(self, index: int, kind: Literal["image", "video"], url: str, grid: tuple[int, int],
              frame_time: float | None = None) -> None:
        start = len(self.ids)
        self.ids += image_block_ids(self.tok, grid, self.tokens_per_tile)
        self.media.append(MediaSlot(kind, url, grid, start, len(self.ids), index, frame_time))

    def grid_for(self, url: str, where: str) -> tuple[int, int]:
        if self.image_grids is None:  # not preprocessed yet: one tile
            return (1, 1)
        if callable(self.image_grids):
            grid = self.image_grids(url)
        elif self.n_images < len(self.image_grids):
            grid = self.image_grids[self.n_images]
        else:
            raise ValueError(f"{where}: image {self.n_images} has no entry in image_grids "
                             f"({len(self.image_grids)} given)")
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2
                and all(isinstance(n, int) and n >= 1 for n in grid)):
            raise ValueError(f"{where}: image grid must be (rows, cols) of positive ints, got {grid!r}")
        return (grid[0], grid[1])

    def frames_for(self, url: str, where: str) -> Sequence[float]:
        if self.video_frames is None:
            raise ValueError(f"{where}: video {url!r} needs frame timestamps; pass video_frames= (one list of "
                             f"seconds per video, or a function of the URL)")
        if callable(self.video_frames):
            frames = self.video_frames(url)
        elif self.n_videos < len(self.video_frames):
            frames = self.video_frames[self.n_videos]
        else:
            raise ValueError(f"{where}: video {self.n_videos} has no entry in video_frames "
                             f"({len(self.video_frames)} given)")
        if not frames or not all(isinstance(t, (int, float)) and t >= 0 for t in frames):
            raise ValueError(f"{where}: frame timestamps must be a non-empty list of seconds >= 0, got {frames!r}")
        return frames


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  image_grids: ImageGrids = None, video_frames: VideoFrames = None,
                  tokens_per_tile: int = 144) -> ChatEncoding:
    """Prompt ids for `messages` and the image blocks in them; see the module docstring."""
    r = ChatRenderer(tokenizer, image_grids, video_frames, tokens_per_tile)
    for i, msg in enumerate(messages):
        r.message(i, msg)
    if isinstance(image_grids, Sequence) and len(image_grids) != r.n_images:
        raise ValueError(f"image_grids has {len(image_grids)} entries but the messages hold {r.n_images} images")
    if isinstance(video_frames, Sequence) and len(video_frames) != r.n_videos:
        raise ValueError(f"video_frames has {len(video_frames)} entries but the messages hold {r.n_videos} videos")
    if add_generation_prompt:
        r.header("assistant")
    return ChatEncoding(r.ids, r.media)
