"""Image input for Llama 4: safe loading and the variable-size tiling the vision encoder expects.

The tiling reproduces transformers' `Llama4ImageProcessor` (itself a port of Meta's
`VariableSizeImageTransform`) step for step:

1. list every canvas of `rows x cols` tiles with `rows * cols <= max_tiles`;
2. pick the canvas that needs the least upscaling (or, if every canvas is smaller than the
   image, the least downscaling), preferring the smaller area on ties;
3. resize without distortion so the image fits that canvas, but never upscale past one tile;
4. pad right and bottom with black, normalise to [-1, 1], cut into tiles row-major;
5. when there is more than one tile, append a thumbnail: the whole image squashed to one tile.

Pixels are resized as uint8 with torch's antialiased bilinear kernel (what torchvision runs on
uint8 tensors on AVX2 and ARM CPUs; within one grey level of Pillow's, which Meta's code uses) and
normalised in bfloat16, as transformers does, so the tiles match its output exactly rather than
merely within bf16 rounding.

Shape legend: `C` channels (3), `H`/`W` image height/width, `S` tile side, `N` tiles,
`K` candidate canvases.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Union
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default. Checked against the header before any pixel is decoded, so a small
# file that claims a huge size (a decompression bomb) costs nothing.
MAX_IMAGE_PIXELS = 89_478_485

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5

MediaSource = Union[str, Path, bytes, bytearray]


# --------------------------------------------------------------------------------------------
# Sources: local paths, file:// and data: URLs, raw bytes. Never the network.
# --------------------------------------------------------------------------------------------

# Directories local media may be read from; None = anywhere (the CLI: the user names their own files).
# A server sets it (per request or for the process) so that a message cannot read arbitrary files.
_ALLOWED_DIRS: ContextVar[tuple[Path, ...] | None] = ContextVar("allowed_media_dirs", default=None)
AllowedDirs = Union[Iterable[Union[str, os.PathLike]], None]


@contextmanager
def allowed_media_dirs(dirs: AllowedDirs) -> Iterator[None]:
    """Within the block, local media (paths and file:// URLs) must lie inside one of `dirs`, after
    symlinks are resolved; data: URLs and bytes stay allowed. `None` lifts the restriction, `[]` allows
    no local file at all. Per thread / asyncio task (a ContextVar), so concurrent requests don't mix."""
    token = _ALLOWED_DIRS.set(_resolve_dirs(dirs))
    try:
        yield
    finally:
        _ALLOWED_DIRS.reset(token)


def _resolve_dirs(dirs: AllowedDirs) -> tuple[Path, ...] | None:
    if dirs is None:
        return None
    if isinstance(dirs, (str, os.PathLike)):
        raise TypeError("allowed media dirs must be a list of directories, not one path string")
    return tuple(Path(d).resolve() for d in dirs)


def _check_allowed(path: Path, what: str, allowed_dirs: AllowedDirs) -> Path:
    """The path to open: `path` itself, or when restricted its resolved form (checked, and opened as
    checked, so a symlink swapped in between does not lead elsewhere)."""
    dirs = _ALLOWED_DIRS.get() if allowed_dirs is None else _resolve_dirs(allowed_dirs)
    if dirs is None:
        return path
    real = path.resolve()  # follows symlinks and '..': where the bytes actually come from
    if not any(real == d or d in real.parents for d in dirs):
        shown = ", ".join(str(d) for d in dirs) or "none (only data: URLs)"
        raise ValueError(f"{what} file {str(path)!r} is outside the allowed media directories ({shown})")
    return real


def open_source(source: MediaSource, what: str = "media", *,
                allowed_dirs: AllowedDirs = None) -> tuple[str, io.BufferedIOBase]:
    """Return (a name for error messages, a binary file object) for a local media source.

    Network URLs are refused rather than fetched: a prompt must not be able to make the
    process reach out to arbitrary hosts. Local files must lie inside `allowed_dirs` (default: the
    `allowed_media_dirs` in effect, unrestricted unless set).
    """
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes of {what}>", io.BytesIO(bytes(source))
    if isinstance(source, Path):
        return str(source), _open_path(source, what, allowed_dirs)
    if not isinstance(source, str):
        raise TypeError(f"{what} source must be a path, a file:// or data: URL, or bytes; got {type(source).__name__}")
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme in ("http", "https", "ftp", "ftps"):
        raise ValueError(f"{what} {source[:80]!r}: network URLs are not fetched; download the file and pass its "
                         "local path or a data: URL")
    if scheme == "data":
        return "<data: URL>", io.BytesIO(_decode_data_url(source, what))
    if scheme == "file":
        path = unquote(source[len("file://"):] if source.startswith("file://") else source[len("file:"):])
        return path, _open_path(Path(path), what, allowed_dirs)
    return source, _open_path(Path(source), what, allowed_dirs)


def _open_path(path: Path, what: str, allowed_dirs: AllowedDirs = None) -> io.BufferedIOBase:
    real = _check_allowed(path, what, allowed_dirs)  # before anything about the file is revealed
    if not real.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist or is not a regular file")
    return real.open("rb")


def _decode_data_url(url: str, what: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"{what} data: URL has no ',' separating the header from the payload")
    if not header.lower().endswith(";base64"):
        raise ValueError(f"{what} data: URL must be base64-encoded (header {header[:60]!r})")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} data: URL has an invalid base64 payload: {e}") from None


# --------------------------------------------------------------------------------------------
# Loading and colour conversion
# --------------------------------------------------------------------------------------------

def load_image(source: MediaSource, *, max_pixels: int = MAX_IMAGE_PIXELS,
               allowed_dirs: AllowedDirs = None) -> Image.Image:
    """Decode an image from a path, file:// or data: URL, or bytes; EXIF orientation applied.

    Only the first frame of an animated image is kept. Raises FileNotFoundError for a missing
    file and ValueError for anything that is not a decodable image within `max_pixels`.
    (Pillow refuses images over twice its own `Image.MAX_IMAGE_PIXELS` regardless.) Local files
    must lie inside `allowed_dirs` when given (see `allowed_media_dirs`).
    """
    name, fp = open_source(source, "image", allowed_dirs=allowed_dirs)
    with fp:
        try:
            image = Image.open(fp)
            # open() has read only the header: refuse before the pixels are decoded.
            check_pixels(image.size, max_pixels, name)
            image.load()
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {name!r} is too large to decode safely: {e}") from None
        except UnidentifiedImageError:
            raise ValueError(f"image {name!r} is not in a format Pillow can read") from None
        except (OSError, SyntaxError, struct.error, EOFError) as e:
            # Pillow reports truncated and corrupt data through all of these.
            raise ValueError(f"image {name!r} is corrupt or truncated: {e}") from None
    return _exif_upright(image)


def check_pixels(size: tuple[int, int], max_pixels: int, name: str, what: str = "image") -> None:
    """Refuse a picture (an image, or a video's frames) over `max_pixels`, from its header size."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} {name!r} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"{what} {name!r} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} (a possible decompression bomb); raise max_pixels if it is genuine")


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, struct.error, KeyError, TypeError):
        return image


# Pillow converts 16-bit and 32-bit integer images to 8 bits by clipping at 255, which turns a
# typical 16-bit scan white. These modes are rescaled from the 16-bit range instead.
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# Premultiplied alpha: converted to straight alpha so that it, too, is composited onto white
# (transformers drops the alpha of RGBa and cannot convert La at all).
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited onto white, as transformers does."""
    if image.mode == "RGB":
        return image
    if image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode in _WIDE_INT_MODES:
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a mode {image.mode!r} image to RGB: {e}") from None


# --------------------------------------------------------------------------------------------
# Canvas choice (pure integer/float logic, mirrored from transformers)
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def supported_canvases(max_tiles: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) in pixels made of at most `max_tiles` tiles.

    The order (grouped by aspect ratio, most tiles first) matters: it breaks exact ties in
    `best_canvas` the same way the reference does.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(_factors(n)):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return tuple((r * tile_size, c * tile_size) for group in by_ratio.values() for r, c in group)


def _factors(n: int) -> set[int]:
    return {d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)}


def best_canvas(image_hw: tuple[int, int], canvases: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The canvas needing the smallest upscale (or, if none fits, the smallest downscale).

    Scales are compared in float32, as the reference computes them on tensors; in float64 a
    near-tie can go the other way on very large images.
    """
    canvases_K2 = torch.tensor(canvases)
    scale_w_K = canvases_K2[:, 1] / image_hw[1]
    scale_h_K = canvases_K2[:, 0] / image_hw[0]
    scale_K = torch.minimum(scale_h_K, scale_w_K)  # the limiting side: no distortion
    upscales = scale_K[scale_K >= 1]
    chosen = upscales.min() if len(upscales) else scale_K[scale_K < 1].max()
    candidates_K2 = canvases_K2[scale_K == chosen]
    area_K = candidates_K2[:, 0] * candidates_K2[:, 1]  # equal scale: least padding wins
    height, width = candidates_K2[torch.argmin(area_K)].tolist()
    return height, width


def fit_size(image_hw: tuple[int, int], canvas_hw: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """Size to resize to: fills the canvas on its limiting side, keeps the aspect ratio.

    Small images are upscaled only as far as one tile, so a thumbnail-sized picture is not
    blown up to fill a large canvas.
    """
    height, width = image_hw
    limit_h = min(max(height, tile_size), canvas_hw[0])
    limit_w = min(max(width, tile_size), canvas_hw[1])
    # transformers computes this on a mix of tensors and Python numbers: in float32 where the
    # limit is the canvas side (a tensor there) and in float64 where it is not, comparing mixed
    # pairs in float32. Rounding the same way keeps the resized size, and so every pixel, equal
    # to it; float64 throughout would be a pixel off in ~0.4% of sizes.
    h_float = np.float32 if canvas_hw[0] < max(height, tile_size) else np.float64
    w_float = np.float32 if canvas_hw[1] < max(width, tile_size) else np.float64
    cmp_float = np.float32 if np.float32 in (h_float, w_float) else np.float64
    scale_h = h_float(limit_h) / h_float(height)
    scale_w = w_float(limit_w) / w_float(width)
    if cmp_float(scale_w) < cmp_float(scale_h):
        new_h, new_w = min(math.floor(w_float(height) * scale_w), limit_h), limit_w
    else:
        new_h, new_w = limit_h, min(math.floor(h_float(width) * scale_h), limit_w)
    return max(new_h, 1), max(new_w, 1)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------

def _resize_u8(image_CHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 image, staying in uint8 like torchvision does."""
    if tuple(image_CHW.shape[-2:]) == tuple(size):
        return image_CHW
    return F.interpolate(image_CHW[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


@lru_cache(maxsize=1)
def _normalized_levels() -> torch.Tensor:
    """The value each uint8 level maps to in [-1, 1].

    Computed in bfloat16 because the reference normalises in bfloat16, so tiles match it
    exactly; a table lookup then costs half as much as running that arithmetic per pixel.
    Returned as float32, which holds every bf16 value exactly.
    """
    levels = torch.arange(256).to(torch.bfloat16) * (1 / 255)
    return ((levels - IMAGE_MEAN) / IMAGE_STD).float()


def preprocess_image(image: Image.Image | MediaSource, *, tile_size: int = 336,
                     max_tiles: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tile an image for the Llama 4 vision encoder.

    Returns `(tiles_NCSS, (rows, cols))`: the `rows * cols` tiles in row-major order, followed by
    one global thumbnail tile when `rows * cols > 1`. A path, URL or bytes is loaded with
    `load_image` first.
    """
    if tile_size < 1 or max_tiles < 1:
        raise ValueError(f"tile_size and max_tiles must be positive, got tile_size={tile_size}, max_tiles={max_tiles}")
    if not isinstance(image, Image.Image):
        image = load_image(image)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    try:
        rgb = np.asarray(to_rgb(_exif_upright(image)))
    except (OSError, SyntaxError, struct.error, EOFError) as e:  # a lazily opened image decodes here
        raise ValueError(f"image data is corrupt or truncated: {e}") from None
    image_CHW = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    image_hw = (image_CHW.shape[1], image_CHW.shape[2])

    canvas_h, canvas_w = best_canvas(image_hw, supported_canvases(max_tiles, tile_size))
    resized_CHW = _resize_u8(image_CHW, fit_size(image_hw, (canvas_h, canvas_w), tile_size))
    # Padding is black (0 -> -1 after normalising) on the right and bottom, as in the reference.
    canvas_CHW = torch.zeros(3, canvas_h, canvas_w, dtype=torch.uint8)
    canvas_CHW[:, :resized_CHW.shape[1], :resized_CHW.shape[2]] = resized_CHW

    rows, cols = canvas_h // tile_size, canvas_w // tile_size
    levels = _normalized_levels()
    tiles_NCSS = torch.empty(rows * cols + (rows * cols > 1), 3, tile_size, tile_size)
    grid_rcCSS = tiles_NCSS[:rows * cols].view(rows, cols, 3, tile_size, tile_size)
    grid_rcCSS.copy_(_lookup(levels, canvas_CHW).view(3, rows, tile_size, cols, tile_size)
                     .permute(1, 3, 0, 2, 4))  # row-major tiles
    if rows * cols > 1:
        tiles_NCSS[-1] = _lookup(levels, _resize_u8(image_CHW, (tile_size, tile_size)))
    return tiles_NCSS, (rows, cols)


def _lookup(levels: torch.Tensor, image_u8: torch.Tensor) -> torch.Tensor:
    """levels[image] via index_select: ~100x faster than torch.take on the CPU."""
    return levels.index_select(0, image_u8.reshape(-1).long()).view(image_u8.shape)
