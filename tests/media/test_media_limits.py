"""Resource limits on media: video frame pixels, sampling rates, and which local files a URL may read."""

from __future__ import annotations

import inspect

import pytest
from PIL import Image

from llama4.media import encode_prompt, load_image, load_video, user_message
from llama4.media.image import allowed_media_dirs, open_source
from llama4.media.video import MAX_FRAME_PIXELS
from test_video import write_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("limits") / "clip.mkv", 1, codec="ffv1")


def test_video_frames_are_capped_like_images(clip):
    assert inspect.signature(load_video).parameters["max_pixels"].default == MAX_FRAME_PIXELS < 8000 * 8000
    with pytest.raises(ValueError, match=r"video .*clip\.mkv' is 96x64 = 6,144 pixels, over the limit of 6,000"):
        load_video(clip, num_frames=2, max_pixels=6000)
    assert len(load_video(clip, num_frames=2, max_pixels=6144)) == 2


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), 0, -1, 1e9, "2"])
def test_bad_fps_refused(clip, fps):
    with pytest.raises(ValueError, match="fps="):  # inf used to raise OverflowError
        load_video(clip, fps=fps)


def test_allowed_media_dirs(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(inside / "ok.png")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    assert load_image(outside / "secret.png").size == (8, 8)  # unrestricted by default (the CLI)
    with allowed_media_dirs([inside]):
        assert load_image(str(inside / "ok.png")).size == (8, 8)
        assert load_image(f"file://{inside / 'ok.png'}").size == (8, 8)
        for bad in (str(outside / "secret.png"), f"file://{outside / 'secret.png'}", str(inside / "link.png"),
                    str(inside / ".." / "private" / "secret.png")):
            with pytest.raises(ValueError, match="outside the allowed media directories"):
                load_image(bad)
        with pytest.raises(ValueError, match="outside the allowed"):  # even a missing file says no more
            open_source(str(outside / "missing.png"), "image")
        with pytest.raises(ValueError, match="outside the allowed"):
            load_video(str(outside / "x.mp4"))
    with pytest.raises(ValueError, match="outside the allowed"):  # the parameter form
        load_image(str(outside / "secret.png"), allowed_dirs=[inside])
    with allowed_media_dirs([]):  # nothing local at all; data: URLs and bytes still work
        with pytest.raises(ValueError, match=r"only data: URLs"):
            load_image(str(inside / "ok.png"))
        assert load_image((inside / "ok.png").read_bytes()).size == (8, 8)


def test_prompt_media_respect_the_allow_list(tmp_path):
    import llama4

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    cfg = llama4.preset("tiny")
    with allowed_media_dirs([tmp_path / "elsewhere"]), pytest.raises(ValueError, match="outside the allowed"):
        encode_prompt(llama4.Tokenizer(), [user_message("hi", [str(tmp_path / "x.png")])], cfg)
