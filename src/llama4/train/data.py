"""Training data: JSONL chat / text samples and plain text files -> packed rows of token ids.

Accepted inputs, one sample per JSONL line:
    {"messages": [...]}   OpenAI chat shape; image_url / video_url parts with paths relative to the
                          JSONL file; loss on the assistant turns only (their text and end token)
    {"text": "..."}       loss on every token
and `.txt` files (each one document). Other keys on a line (metadata) are ignored.

Documents are tokenized once, up front, so every bad line is reported before training starts; pixels
are loaded per batch, with the same preprocessing as inference. Rows of `seq_len` tokens are packed
from the documents in a per-epoch shuffled order: text may continue into the next row (its loss is
on every token anyway), a chat sample never splits. Each token carries its position inside its
document, which is what the model uses to keep attention inside documents.

Shape legend: B rows, T tokens per row (`seq_len`), N image tiles.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..text.chat import ROLE_HEADERS, ChatRenderer
from ..config import Llama4Config
from ..data.jsonl import iter_jsonl
from ..media.image import load_image, preprocess_image
from ..text.tokenizer import Tokenizer
from .config import DataSection

IGNORE = -100  # label of a position with no loss


@dataclass
class Media:
    kind: str  # "image" or "video"
    path: Path
    grid: tuple[int, int] = (1, 1)
    frame_times: list[float] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        if self.kind == "video":
            return len(self.frame_times)
        rows, cols = self.grid
        return rows * cols + (rows * cols > 1)


@dataclass
class Document:
    ids: np.ndarray  # int64 [L]
    target: np.ndarray  # bool [L]: token i is a loss target (predicted from tokens < i)
    media: list[Media]
    where: str  # "file:line", for errors
    splittable: bool = False  # plain text may continue into the next row; a chat sample may not


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where there is no loss
    doc_pos: torch.Tensor | None  # [B, T] positions inside documents; None when every row is one document
    pixel_values: torch.Tensor | None  # [N, C, S, S] tiles in the order of their slots
    n_tokens: int  # real (non-padding) tokens
    token_mask: torch.Tensor | None = None  # [B, T] bool, True for real tokens (padding stays out of MoE load)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


class Encoder:
    """Text and chat samples -> Documents, checking media files and computing their tile grids."""

    def __init__(self, tokenizer: Tokenizer, model_cfg: Llama4Config, cfg: DataSection):
        self.tok = tokenizer
        self.cfg = cfg
        self.vision = model_cfg.vision
        self._cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, object]] = OrderedDict()
        self._cache_bytes = 0

    def text(self, text: str, where: str) -> Document:
        ids = np.array(self.tok.encode(text, bos=True, eos=True), dtype=np.int64)
        return Document(ids, np.ones(len(ids), dtype=bool), [], where, splittable=True)

    def chat(self, messages: list, base: Path, where: str) -> Document:
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        media: list[Media] = []

        def layout(kind: str, url: str):
            """Decode one image or video (once), note it, and return its tile grid or frame times."""
            m = Media(kind, self._media_path(url, base, where))
            try:
                found = self._decode(m)[1]
            except (ValueError, OSError) as e:
                raise ValueError(f"{where}: {kind} {url!r} cannot be used: {e}") from None
            if kind == "image":
                m.grid = found
            else:
                m.frame_times = found
            media.append(m)
            return found

        def grid(url: str) -> tuple[int, int]:
            return layout("image", url)

        def frames(url: str) -> list[float]:
            return layout("video", url)

        tokens_per_tile = self.vision.tokens_per_tile if self.vision is not None else 1
        # One pass through the chat renderer, noting where each assistant turn's content begins and ends.
        r = ChatRenderer(self.tok, grid, frames, tokens_per_tile)
        header = ChatRenderer(self.tok, None, None, 1)
        header.header("assistant")
        header_len = len(header.ids) - 1  # minus its begin-of-text
        target = []
        for i, msg in enumerate(messages):
            start = len(r.ids)
            try:
                r.message(i, msg)
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            learn = isinstance(msg, dict) and msg.get("role") == "assistant"
            target += [False] * (len(r.ids) - start) if not learn else \
                [False] * header_len + [True] * (len(r.ids) - start - header_len)
        if not any(target):
            raise ValueError(f"{where}: no assistant message, so nothing to learn (roles: "
                             f"{[m.get('role') if isinstance(m, dict) else m for m in messages]}; "
                             f"expected one of {list(ROLE_HEADERS)} with at least one 'assistant')")
        return Document(np.array(r.ids, dtype=np.int64), np.array([False] + target), media, where)

    def _media_path(self, url: str, base: Path, where: str) -> Path:
        if self.vision is None:
            raise ValueError(f"{where}: the sample has media ({url!r}) but the model has no vision encoder")
        local = url[len("file://"):] if url.startswith("file://") else url
        if "://" in local or local.startswith("data:"):
            raise ValueError(f"{where}: media must be a file path relative to the JSONL file, got {url[:60]!r}")
        path = Path(local) if Path(local).is_absolute() else base / local
        if not path.is_file():
            raise FileNotFoundError(f"{where}: media file {url!r} not found (looked for {path})")
        return path

    def pixels(self, m: Media) -> torch.Tensor:
        """Tiles [n, C, S, S] for one media item, exactly as at inference."""
        tiles, layout = self._decode(m)
        assert layout == (m.grid if m.kind == "image" else m.frame_times), (m.path, layout)
        return tiles

    def _decode(self, m: Media) -> tuple[torch.Tensor, tuple[int, int] | list[float]]:
        """(tiles, grid or frame times), decoded once and kept while the cache budget allows: the
        read pass that lays out the tokens and the batches that need the pixels share one decode."""
        key = (m.kind, str(m.path))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        size = self.vision.image_size
        if m.kind == "image":
            tiles, layout = preprocess_image(load_image(m.path), tile_size=size, max_tiles=self.cfg.max_tiles)
        else:
            from ..media.video import load_video

            frames = load_video(m.path, num_frames=self.cfg.video_frames)
            tiles = torch.cat([preprocess_image(f.image, tile_size=size, max_tiles=1)[0] for f in frames])
            layout = [f.timestamp for f in frames]
        budget = self.cfg.media_cache_mb * 2**20
        self._cache[key] = (tiles, layout)
        self._cache_bytes += tiles.numel() * tiles.element_size()
        while self._cache_bytes > budget and self._cache:
            _, (old, _) = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return tiles, layout


def read_documents(paths: list[str], encoder: Encoder) -> list[Document]:
    """Every document of every file, in file order; errors name the file and line."""
    if not paths:
        raise ValueError("data.paths is empty: give at least one .jsonl or .txt file")
    docs: list[Document] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} not found")
        if p.suffix == ".txt":
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(encoder.text(text, str(p)))
        elif p.suffix == ".jsonl":
            docs += _read_jsonl(p, encoder)
        else:
            raise ValueError(f"data file {p}: unsupported type {p.suffix!r}; expected .jsonl or .txt")
    if not docs:
        raise ValueError(f"data files {paths} hold no samples")
    return docs


def _read_jsonl(path: Path, encoder: Encoder) -> list[Document]:
    docs = []
    for where, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or ("messages" in obj) == ("text" in obj):
            raise ValueError(f"{where}: expected an object with either 'messages' (chat) or 'text', "
                             f"got {json.dumps(obj)[:80]!r}")
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise ValueError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
            docs.append(encoder.text(obj["text"], where))
        else:
            docs.append(encoder.chat(obj["messages"], path.parent, where))
    return docs


@dataclass
class Piece:
    doc: int
    start: int
    end: int


class PackedData:
    """An endless, reproducible stream of batches. `state` (epoch, row) is all a resume needs."""

    def __init__(self, docs: list[Document], encoder: Encoder, cfg: DataSection, seed: int, pad_id: int):
        self.docs, self.encoder, self.cfg, self.seed, self.pad_id = docs, encoder, cfg, seed, pad_id
        T = cfg.seq_len
        too_long = [d for d in docs if not d.splittable and len(d.ids) > T]
        if too_long:
            d = too_long[0]
            raise ValueError(f"{d.where}: sample has {len(d.ids)} tokens (images included), more than "
                             f"data.seq_len={T}; raise seq_len or shorten the sample")
        self.state = {"epoch": 0, "row": 0}
        self._rows_epoch, self._rows = -1, []

    def rows(self, epoch: int) -> list[list[Piece]]:
        if self._rows_epoch != epoch:
            order = list(range(len(self.docs)))
            if self.cfg.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._rows, self._rows_epoch = self._pack(order), epoch
        return self._rows

    def _pack(self, order: list[int]) -> list[list[Piece]]:
        T = self.cfg.seq_len
        rows: list[list[Piece]] = []
        row: list[Piece] = []
        used = 0
        for i in order:
            d = self.docs[i]
            if not self.cfg.pack:
                # One document per row; a long text becomes several rows.
                rows += [[Piece(i, s, min(s + T, len(d.ids)))] for s in range(0, len(d.ids), T)]
                continue
            start = 0
            while start < len(d.ids):
                room = T - used
                n = len(d.ids) - start
                if n > room and row and not (d.splittable and room >= 16):
                    rows.append(row)  # close the row: a chat sample never splits, a few tokens of text are not worth it
                    row, used = [], 0
                    continue
                take = min(n, room)
                row.append(Piece(i, start, start + take))
                used += take
                start += take
                if used == T:
                    rows.append(row)
                    row, used = [], 0
        if row:
            rows.append(row)
        return [r for r in rows if r]

    def next_batch(self) -> Batch:
        return self.collate(self.next_rows())

    def next_rows(self) -> list[list[Piece]]:
        """The next `batch_size` rows, advancing the position (data-parallel ranks collate their share)."""
        rows = []
        while len(rows) < self.cfg.batch_size:
            epoch_rows = self.rows(self.state["epoch"])
            if self.state["row"] >= len(epoch_rows):
                self.state = {"epoch": self.state["epoch"] + 1, "row": 0}
                continue
            rows.append(epoch_rows[self.state["row"]])
            self.state = {"epoch": self.state["epoch"], "row": self.state["row"] + 1}
        return rows

    def collate(self, rows: list[list[Piece]]) -> Batch:
        B, T = len(rows), self.cfg.seq_len
        ids_BT = np.full((B, T), self.pad_id, dtype=np.int64)
        labels_BT = np.full((B, T), IGNORE, dtype=np.int64)
        pos_BT = np.zeros((B, T), dtype=np.int64)
        tiles = []
        mask_BT = np.zeros((B, T), dtype=bool)
        n_tokens, packed = 0, False
        for b, row in enumerate(rows):
            at = 0
            for p in row:
                d, n = self.docs[p.doc], p.end - p.start
                ids_BT[b, at:at + n] = d.ids[p.start:p.end]
                # Position t predicts token t+1 of the same document, also across a row break.
                nxt = slice(p.start + 1, min(p.end + 1, len(d.ids)))
                m = len(d.ids[nxt])
                labels_BT[b, at:at + m] = np.where(d.target[nxt], d.ids[nxt], IGNORE)
                pos_BT[b, at:at + n] = np.arange(n)
                tiles += [self.encoder.pixels(m_) for m_ in d.media]
                at += n
            n_tokens += at
            mask_BT[b, :at] = True
            if at < T:  # padding is a document of its own that no real token attends to
                pos_BT[b, at:] = np.arange(T - at)
            packed |= len(row) > 1  # one document and trailing padding: plain causal attention suffices
        return Batch(torch.from_numpy(ids_BT), torch.from_numpy(labels_BT),
                     torch.from_numpy(pos_BT) if packed else None,
                     torch.cat(tiles) if tiles else None, n_tokens, torch.from_numpy(mask_BT))
