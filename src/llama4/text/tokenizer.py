"""The Llama 4 tokenizer: byte-level BPE with 2,048 special tokens, encoded exactly as Meta encodes it.

Two file formats carry the same kind of tokenizer:

- Meta's `tokenizer.model`: one `<base64 bytes> <rank>` line per ordinary token, run with tiktoken.
  This is the published tokenizer; `Tokenizer()` loads the copy inside the `llama-models` package.
- A Hugging Face `tokenizer.json` (byte-level BPE), run with the `tokenizers` library. Checkpoint
  directories converted to the HF layout carry one, and `llama4 tokenizer train` writes one.

Either way the text goes through the same segmentation as `llama_models.llama4.tokenizer` before the
BPE sees it, so ids match Meta's token for token, including on multi-megabyte inputs.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import operator
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Sequence

import numpy as np

from .chat import ChatEncoding, encode_dialog

if TYPE_CHECKING:
    from .chat import ImageGrids, VideoFrames

# The Llama 4 (o200k-style) pre-tokenizer pattern, as in llama_models.llama4.tokenizer.
SPLIT_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_SPECIAL_TOKENS = 2048


def _numbered(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def _special_token_strings() -> list[str]:
    """The 2,048 special tokens in id order (id = ordinary vocabulary size + index)."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"] + _numbered("text_post_train", 61, 8)
    vision = ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    vision += _numbered("vision", 4, 2) + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    vision += _numbered("vision", 1041, 7)
    reasoning = _numbered("reasoning", 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]


SPECIAL_TOKENS: list[str] = _special_token_strings()

# The tokens this package relies on; a tokenizer.json lacking one cannot drive a Llama 4 model.
_REQUIRED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>",
                      "<|eot|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                      "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")

# Meta's reference cuts text into 400k-character pieces (tiktoken panics on much longer inputs) and cuts
# any run of >25k whitespace or non-whitespace characters every 25k (tiktoken's regex goes quadratic on
# them; openai/tiktoken#195). Each piece is encoded on its own, which changes the ids at the cuts, so we
# cut at exactly the same places.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Segments handed to the tokenizer.json backend per call: bounds its memory to a few segments' Encodings.
HF_BATCH_SEGMENTS = 4
# str.isspace() per code point (the reference's test for a run), looked up in one vectorised step instead
# of a Python loop over every character. No code point above the BMP is whitespace; the last entry, which
# all larger code points are clamped to, is False.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x10000)] + [False])
# Every special token has this shape and none can start inside another match of it, so scanning for the
# shape and keeping the allowed ones finds the same tokens as tiktoken's own special-token search.
_SPECIAL_SHAPE = re.compile(r"<\|[^\s<|>]+\|>")


def _long_runs(chunk: str) -> list[tuple[int, int]]:
    """(start, end) of each run of more than MAX_RUN_CHARS whitespace, or non-whitespace, characters."""
    codepoints = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    space = _IS_SPACE[np.minimum(codepoints, len(_IS_SPACE) - 1)]
    edges = np.flatnonzero(space[1:] != space[:-1]) + 1
    bounds = np.concatenate(([0], edges, [len(space)]))
    return [(int(bounds[i]), int(bounds[i + 1])) for i in np.flatnonzero(np.diff(bounds) > MAX_RUN_CHARS)]


def _segments(text: str) -> list[str]:
    """Cut text where llama_models' Tokenizer.encode cuts it (see MAX_ENCODE_CHARS)."""
    out = []
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        pos = 0
        for run_start, run_end in _long_runs(chunk):
            # The reference starts a new piece every MAX_RUN_CHARS characters into the run.
            for cut in range(run_start + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS):
                out.append(chunk[pos:cut])
                pos = cut
        out.append(chunk[pos:])
    return out


def default_tokenizer_path() -> Path:
    """The published Llama 4 `tokenizer.model`, as shipped inside the `llama-models` package."""
    from importlib.resources import files

    try:
        path = Path(str(files("llama_models") / "llama4" / "tokenizer.model"))
    except ModuleNotFoundError:
        raise FileNotFoundError("Tokenizer() loads llama_models/llama4/tokenizer.model, but the llama-models "
                                "package is not installed; `pip install llama-models` or pass a path") from None
    if not path.is_file():
        raise FileNotFoundError(f"the installed llama-models package has no tokenizer file at {path}")
    return path


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        # Meta's own file first: it is the published tokenizer, bit for bit.
        for name in ("tokenizer.model", "tokenizer.json"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: directory has neither tokenizer.model nor tokenizer.json")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    return p


class _TiktokenBackend:
    def __init__(self, path: Path):
        import tiktoken

        ranks = self._load_ranks(path)
        self.special_tokens = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.n_vocab = len(ranks) + len(SPECIAL_TOKENS)
        self._enc = tiktoken.Encoding(name=path.name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    @staticmethod
    def _load_ranks(path: Path) -> dict[bytes, int]:
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except (ValueError, binascii.Error):
                    raise ValueError(f"{path}: line {lineno} is not '<base64 token> <rank>'; expected a tiktoken "
                                     f"BPE file such as Llama 4's tokenizer.model") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each used once; the file is corrupt")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{path}: no token for byte(s) {missing[:8]}; a byte-level BPE needs all 256")
        return ranks

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One after another: tiktoken's thread pool (encode_ordinary_batch) measured ~30% slower on the
        # 2-core machine this was tuned on, where the regex caches of fresh threads start cold.
        return [self._enc.encode_ordinary(t) for t in texts]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(ids)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return {c: b for b, c in chars.items()}


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer, decoders

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for every kind of bad file
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        if not isinstance(tok.decoder, decoders.ByteLevel):
            raise ValueError(f"{path}: decoder is {type(tok.decoder).__name__}; expected a byte-level BPE "
                             f"(decoder ByteLevel) like Llama 4's")
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # special strings in the text are plain text unless we cut them out
        self._tok = tok
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.n_vocab = len(vocab)
        if sorted(vocab.values()) != list(range(self.n_vocab)):
            raise ValueError(f"{path}: token ids are not 0..{self.n_vocab - 1}, each used once")
        byte_of = _byte_level_alphabet()
        self._bytes: list[bytes] = [b""] * self.n_vocab
        for piece, i in vocab.items():
            if i in added:
                self._bytes[i] = piece.encode()
            elif all(c in byte_of for c in piece):
                self._bytes[i] = bytes(byte_of[c] for c in piece)
            else:
                raise ValueError(f"{path}: token {piece!r} (id {i}) is not written in the byte-level alphabet")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A few segments at a time: `tokenizers` keeps a full Encoding (token strings, offsets, masks) per
        # segment until the call returns, ~100 bytes a token, so one call on a 50 MB text held GBs. The
        # segments are the reference's own cuts (see _segments), so batching them changes no id.
        out: list[list[int]] = []
        for start in range(0, len(texts), HF_BATCH_SEGMENTS):
            batch = texts[start:start + HF_BATCH_SEGMENTS]
            try:
                encodings = self._encode(batch)
            except (TypeError, UnicodeEncodeError, ValueError, OverflowError):
                # A lone surrogate (from argv or stdin decoded with surrogateescape) is not valid UTF-8,
                # which the Rust side cannot take. Replace it with U+FFFD, as tiktoken does.
                encodings = self._encode([t.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                                          for t in batch])
            out += [e.ids for e in encodings]
        return out

    def _encode(self, texts: list[str]):
        # encode_batch_fast skips the character offsets we never read.
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return fast(texts, add_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)


class StreamDecoder:
    """Text for ids as they arrive; bytes of a character split across tokens wait for the rest.

    `push` returns only whole characters, so a streamed emoji never shows up as U+FFFD halves; bytes that
    can never become valid UTF-8 do come out as U+FFFD, as in `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Sequence[int]) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([ids] if isinstance(ids, int) else ids))

    def flush(self) -> str:
        """End of stream: whatever is still held back (an unfinished character) becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Llama 4 tokenizer. `Tokenizer()` is the published one; `Tokenizer(path)` loads a file or directory."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = default_tokenizer_path() if path is None else _resolve(path)
        self._backend = _HFBackend(self.path) if self.path.suffix == ".json" else _TiktokenBackend(self.path)
        self.special_tokens: dict[str, int] = self._backend.special_tokens
        missing = [s for s in _REQUIRED_SPECIALS if s not in self.special_tokens]
        if missing:
            raise ValueError(f"{self.path}: missing Llama 4 special token(s) {missing}")
        odd = [s for s in self.special_tokens if not _SPECIAL_SHAPE.fullmatch(s)]
        if odd:
            raise ValueError(f"{self.path}: special token(s) {odd[:4]} are not of the form <|name|>")
        self.vocab_size: int = self._backend.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        self.stop_ids: list[int] = [self.eos_id, self.eom_id, self.eot_id]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allow_special: bool | Collection[str] = False) -> list[int]:
        """Ids for `text`. Special-token strings in it are plain text unless allowed (True = all of them)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        if allow_special is True:
            allowed: Collection[str] = self.special_tokens
        elif allow_special is False:
            allowed = ()
        else:
            allowed = set(allow_special)
            unknown = sorted(allowed - self.special_tokens.keys())
            if unknown:
                raise ValueError(f"allow_special names {unknown[:4]}, which are not special tokens of this tokenizer")
        # Plain-text pieces interleaved with special ids, in order.
        items: list[str | int] = []
        for segment in _segments(text):
            pos = 0
            if allowed:
                for m in _SPECIAL_SHAPE.finditer(segment):
                    if m.group() in allowed:
                        items += [segment[pos:m.start()], self.special_tokens[m.group()]]
                        pos = m.end()
            items.append(segment[pos:])
        encoded = iter(self._backend.encode_batch([x for x in items if isinstance(x, str) and x]))
        ids = [self.bos_id] if bos else []
        for x in items:
            if isinstance(x, int):
                ids.append(x)
            elif x:
                ids += next(encoded)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes behind `ids`; may end inside a UTF-8 character."""
        ids = [operator.index(i) for i in ids]  # ints, numpy ints; not floats
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise ValueError(f"token id(s) {bad[:4]} out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return self._backend.decode_bytes(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        """An incremental decoder for generation: `push(id)` returns only complete characters."""
        return StreamDecoder(self)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    image_grids: ImageGrids = None, video_frames: VideoFrames = None,
                    tokens_per_tile: int = 144) -> list[int]:
        """Prompt ids for an OpenAI-style message list, as Meta's ChatFormat renders it (see llama4.chat)."""
        return self.encode_dialog(messages, add_generation_prompt, image_grids, video_frames, tokens_per_tile).ids

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                      image_grids: ImageGrids = None, video_frames: VideoFrames = None,
                      tokens_per_tile: int = 144) -> ChatEncoding:
        """Like `encode_chat`, plus where each image (and video frame) sits in the ids, in order."""
        return encode_dialog(self, messages, add_generation_prompt, image_grids, video_frames, tokens_per_tile)
