"""Image loading and tiling: parity with transformers' Llama4ImageProcessor, and bad input.

The reference outputs come from scripts/make_image_reference.py, run in a separate environment
with torchvision; that script also builds the inputs, so it is imported here to rebuild them.
"""

import base64
import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llama4 import load_image, preprocess_image
from llama4.media.image import best_canvas, fit_size, supported_canvases

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "image_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("make_image_reference", ROOT / "scripts" / "make_image_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

# One grey level is 2/255 after normalising; bf16 rounding is at most 2^-8 in [-1, 1].
PIXEL_ATOL = 2 / 255 + 2**-8


def _case_input(case):
    image = ref.case_image(case["height"], case["width"], case["mode"])
    return load_image(image) if isinstance(image, bytes) else image


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[c["name"] for c in REFERENCE["cases"]])
def test_matches_transformers(case):
    tiles, grid = preprocess_image(_case_input(case), tile_size=case["tile_size"], max_tiles=case["max_tiles"])
    assert list(grid) == case["grid"]
    assert tiles.shape == (case["num_tiles"], 3, case["tile_size"], case["tile_size"])
    assert tiles.dtype == torch.float32
    sampled = tiles.flatten()[case["sample_positions"]]
    torch.testing.assert_close(sampled, torch.tensor(case["sample_values"]), atol=PIXEL_ATOL, rtol=0)
    torch.testing.assert_close(tiles.mean(dim=(1, 2, 3)).double(), torch.tensor(case["tile_mean"], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # Today the match is bit-exact; if a torch upgrade changes the resize kernel this fails first.
    assert ref.tiles_digest(tiles) == case["sha256"]
    # Meta's llama-models transform resizes with Pillow, so its pixels differ by a grey level or two
    # (recorded by the script: at most ~0.02, mean under 0.002), but it must choose the same grid.
    if "meta_grid" in case:
        assert list(grid) == case["meta_grid"]


def test_canvas_and_resize_choices_match_transformers():
    for height, width, max_tiles, canvas_h, canvas_w, new_h, new_w in REFERENCE["size_sweep"]:
        canvas = best_canvas((height, width), supported_canvases(max_tiles, 336))
        assert canvas == (canvas_h, canvas_w), (height, width, max_tiles)
        assert fit_size((height, width), canvas, 336) == (new_h, new_w), (height, width, max_tiles)


def test_supported_canvases_respect_max_tiles():
    canvases = supported_canvases(4, 336)
    assert set(canvases) == {(336 * r, 336 * c) for r in range(1, 5) for c in range(1, 5) if r * c <= 4}


def test_single_tile_has_no_thumbnail():
    tiles, grid = preprocess_image(Image.new("RGB", (3000, 1000), (255, 0, 0)), max_tiles=1)
    assert grid == (1, 1) and tiles.shape == (1, 3, 336, 336)


def test_tiles_are_row_major_then_thumbnail():
    # Left half black, right half white: a 1x2 grid puts the black tile first.
    array = np.zeros((336, 672, 3), np.uint8)
    array[:, 336:] = 255
    tiles, grid = preprocess_image(Image.fromarray(array))
    assert grid == (1, 2) and tiles.shape[0] == 3
    assert tiles[0].max() == -1 and tiles[1].min() == 1
    assert -0.1 < tiles[2].mean() < 0.1  # the thumbnail shows both halves


# ----------------------------------------------------------------------------- modes and orientation

@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_transparency_is_composited_on_white(mode):
    tiles, _ = preprocess_image(Image.new(mode, (50, 40)))  # all zeros: black, fully transparent
    assert tiles[0, :, :40 * 336 // 50, :].min() == 1.0  # the image area; the rest is black padding


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                  "LAB", "HSV", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"])
def test_every_pillow_mode_is_accepted(mode):
    tiles, grid = preprocess_image(Image.new(mode, (40, 30)))
    assert grid == (1, 1) and tiles.shape == (1, 3, 336, 336) and tiles.abs().max() <= 1


def test_sixteen_bit_images_are_rescaled_not_clipped():
    level_128 = np.full((20, 20), 128 * 257, np.uint16)
    tiles, _ = preprocess_image(Image.frombytes("I;16", (20, 20), level_128.astype("<u2").tobytes()))
    expected = (128 / 255 - 0.5) / 0.5
    assert abs(tiles[0, 0, 0, 0].item() - expected) < 2**-7


def test_exif_orientation_is_honoured_on_an_opened_image():
    png = ref.case_image(300, 500, "EXIF6")
    opened = Image.open(io.BytesIO(png))
    assert opened.size == (500, 300)  # stored landscape, displayed portrait
    tiles, grid = preprocess_image(opened, max_tiles=4)
    loaded_tiles, loaded_grid = preprocess_image(load_image(png), max_tiles=4)
    assert grid == loaded_grid == (2, 1)
    assert torch.equal(tiles, loaded_tiles)


# ----------------------------------------------------------------------------- sources

def test_load_image_from_path_bytes_and_urls(tmp_path):
    image = Image.fromarray(ref._rgb_array(30, 40))
    png = _png_bytes(image)
    path = tmp_path / "a picture.png"
    path.write_bytes(png)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    file_url = "file://" + str(path).replace(" ", "%20")
    for source in (path, str(path), file_url, png, data_url):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(image)), source
    tiles_from_path, _ = preprocess_image(str(path))
    tiles_from_image, _ = preprocess_image(image)
    assert torch.equal(tiles_from_path, tiles_from_image)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png"])
def test_network_urls_are_refused(url):
    with pytest.raises(ValueError, match="network URLs are not fetched"):
        load_image(url)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)


# ----------------------------------------------------------------------------- bad input

def _png_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims any size; the pixel data is whatever is given."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_images_raise_clear_errors_and_the_process_carries_on(tmp_path):
    good = _png_bytes(Image.fromarray(ref._rgb_array(64, 64)))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        (b"\x00garbage" * 50, "not in a format"),
        (good[: len(good) // 2], "corrupt or truncated"),
        (good[:40], "corrupt or truncated|not in a format"),
        (text_file, "notes.txt.*not in a format"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        # A decompression bomb: a tiny file whose header claims 100,000 x 100,000 pixels. The
        # garbage pixel data proves the refusal comes from the header, before any decoding.
        (_png_with_header(100_000, 100_000, b"junk"), "limit|too large"),
        (_png_with_header(0, 10, b"junk"), "zero size|corrupt|not in a format"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            load_image(source)
    lazily_opened = Image.open(io.BytesIO(good[: len(good) // 2]))  # header fine, pixels cut off
    with pytest.raises(ValueError, match="corrupt or truncated"):
        preprocess_image(lazily_opened)
    assert load_image(good).size == (64, 64)


def test_pixel_limit_is_configurable():
    png = _png_bytes(Image.new("RGB", (200, 100)))
    with pytest.raises(ValueError, match="20,000 pixels, over the limit of 10,000"):
        load_image(png, max_pixels=10_000)
    assert load_image(png, max_pixels=20_000).size == (200, 100)


def test_zero_size_and_bad_arguments():
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="max_tiles"):
        preprocess_image(Image.new("RGB", (5, 5)), max_tiles=0)
    with pytest.raises(TypeError, match="image source"):
        load_image(12345)
