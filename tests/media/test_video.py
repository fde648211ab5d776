"""Video frame sampling: synthetic clips written with PyAV, flat memory on long clips, bad input."""

import base64
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

av = pytest.importorskip("av")

from llama4 import load_video  # noqa: E402
from llama4.media import video as video_module  # noqa: E402

FPS = 10
SQUARE_STEP = 3  # pixels the square moves right per frame


def write_clip(path, seconds, *, fps=FPS, width=96, height=64, codec="mpeg4", container_format=None):
    """A white 8x8 square moving SQUARE_STEP pixels right per frame on black."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.zeros((height, width, 3), np.uint8)
            x = (i * SQUARE_STEP) % (width - 8)
            frame[20:28, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def square_x(image):
    """Left edge of the square in a decoded frame."""
    row = np.asarray(image)[24, :, 0]
    return int(np.nonzero(row > 128)[0].min())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("video") / "square.mkv", 3, codec="ffv1")


# ----------------------------------------------------------------------------- sampling

def test_uniform_sampling_picks_the_frame_on_screen(clip):
    frames = load_video(clip, num_frames=6)
    # Samples at the centres of six 0.5 s slices: 0.25 s, 0.75 s, ...; the frame on screen at
    # 0.25 s is frame 2, shown from 0.2 s.
    expected_index = [2, 7, 12, 17, 22, 27]
    assert [f.timestamp for f in frames] == pytest.approx([i / FPS for i in expected_index])
    assert [square_x(f.image) for f in frames] == [i * SQUARE_STEP for i in expected_index]
    assert all(f.image.mode == "RGB" and f.image.size == (96, 64) for f in frames)


def test_fps_sampling(clip):
    frames = load_video(clip, fps=4, num_frames=100)
    assert len(frames) == 12  # 3 s at 4 per second
    times = [k / 4 for k in range(12)]
    assert [f.timestamp for f in frames] == pytest.approx([int(t * FPS + 1e-9) / FPS for t in times])


def test_fps_beyond_num_frames_falls_back_to_uniform(clip):
    assert [f.timestamp for f in load_video(clip, fps=30, num_frames=6)] == \
        [f.timestamp for f in load_video(clip, num_frames=6)]


def test_more_samples_than_frames_repeat_frames(tmp_path):
    short = write_clip(tmp_path / "short.mkv", 0.3, codec="ffv1")  # three frames
    frames = load_video(short, num_frames=6)
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])


def test_clip_without_duration_in_its_header(tmp_path):
    raw = write_clip(tmp_path / "square.m4v", 3, container_format="m4v")  # MPEG-4 elementary stream
    assert [f.timestamp for f in load_video(raw, num_frames=6)] == pytest.approx([0.2, 0.7, 1.2, 1.7, 2.2, 2.7])


def test_seeking_gives_the_same_frames_as_decoding_through(tmp_path, monkeypatch):
    long_clip = write_clip(tmp_path / "long.mp4", 60)
    seeking = load_video(long_clip, num_frames=5)
    monkeypatch.setattr(video_module, "SEEK_AHEAD_S", float("inf"))
    straight = load_video(long_clip, num_frames=5)
    expected = pytest.approx([6.0, 18.0, 30.0, 42.0, 54.0])
    assert [f.timestamp for f in seeking] == [f.timestamp for f in straight] == expected
    for a, b in zip(seeking, straight):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# ----------------------------------------------------------------------------- sources

def test_sources(clip):
    data = clip.read_bytes()
    data_url = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    expected = [f.timestamp for f in load_video(clip, num_frames=3)]
    for source in (str(clip), f"file://{clip}", data, data_url):
        assert [f.timestamp for f in load_video(source, num_frames=3)] == expected


@pytest.mark.parametrize("url", ["http://example.com/a.mp4", "https://example.com/a.mp4"])
def test_network_urls_are_refused(url):
    with pytest.raises(ValueError, match="network URLs are not fetched"):
        load_video(url)


# ----------------------------------------------------------------------------- bad input

def test_bad_videos_raise_clear_errors_and_the_process_carries_on(tmp_path, clip):
    audio_only = tmp_path / "tone.wav"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        for packet in [*stream.encode(samples), *stream.encode()]:
            out.mux(packet)
    whole = clip.read_bytes()
    truncated = tmp_path / "cut.mkv"
    truncated.write_bytes(whole[: len(whole) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = [
        (audio_only, ValueError, "tone.wav' has no video stream"),
        (truncated, ValueError, "cut.mkv' is corrupt or truncated: frames end at"),
        (empty, ValueError, "empty.mp4' is not a readable video file"),
        (b"\x00garbage" * 100, ValueError, "not a readable video file"),
        (tmp_path / "missing.mp4", FileNotFoundError, "missing.mp4"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            load_video(source)
    with pytest.raises(ValueError, match="num_frames"):
        load_video(clip, num_frames=0)
    with pytest.raises(ValueError, match="fps"):
        load_video(clip, fps=0)
    assert len(load_video(clip, num_frames=2)) == 2


# ----------------------------------------------------------------------------- memory

# Peak RSS after a short clip, then after a long one, in a fresh process: the second peak is
# above the first only by what the long clip itself kept alive.
_PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    from llama4 import load_video
    from llama4.media import video
    video.SEEK_AHEAD_S = float(sys.argv[3])
    peaks = []
    for path in sys.argv[1:3]:
        assert len(load_video(path, num_frames=8)) == 8
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(peaks))
""")


def _assert_flat_memory(tmp_path, long_seconds):
    # 320x240: keeping every decoded frame of the long clip would cost 115 kB each (yuv420p).
    short = write_clip(tmp_path / "short.mp4", 5, width=320, height=240)
    long = write_clip(tmp_path / "long.mp4", long_seconds, width=320, height=240)
    for seek_ahead_s in (video_module.SEEK_AHEAD_S, 1e9):  # seeking, and decoding every frame
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(short), str(long), str(seek_ahead_s)],
                             capture_output=True, text=True, check=True, timeout=300)
        after_short, after_long = json.loads(out.stdout.strip().splitlines()[-1])
        growth = after_long - after_short
        print(f"seek_ahead_s={seek_ahead_s}: peak grew {growth / 2**20:.1f} MiB")
        assert growth < 25 * 2**20, f"peak memory grew {growth / 2**20:.1f} MiB from a 5 s to a {long_seconds} s clip"


def test_memory_is_flat_on_a_long_clip(tmp_path):
    _assert_flat_memory(tmp_path, 60)


@pytest.mark.slow
def test_memory_is_flat_on_a_ten_minute_clip(tmp_path):
    _assert_flat_memory(tmp_path, 600)
