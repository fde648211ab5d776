"""Video input for Llama 4: a few frames sampled from a clip, each with its timestamp.

In a prompt each frame becomes an image (one tile by default) preceded by `Frame at 1.5s:`; the
chat layer writes that text, this module supplies the frames. Decoding streams: only the frame
about to be returned is kept, and long gaps between samples are crossed by seeking to the
nearest keyframe instead of decoding every frame, so memory stays flat and a ten-minute clip
costs about as much as a short one.

PyAV (`pip install av`, the `video` extra) is imported only when a video is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from .image import AllowedDirs, MediaSource, check_pixels, open_source

# Seek rather than decode forward when the next sample is this far ahead. Encoders put a keyframe
# every few seconds, so a shorter hop is cheaper to decode straight through.
SEEK_AHEAD_S = 4.0
# Frames are capped like images, checked from the stream header before anything is decoded. Lower than
# the image cap (89M): a clip decodes many frames, and an 8000x8000 clip of 2 MB took 12 s and 3.2 GB.
# 8K UHD, the largest common video format, still passes; every frame becomes 336x336 tiles anyway.
MAX_FRAME_PIXELS = 7680 * 4320
# fps above this samples more often than any real clip has frames; it also keeps 1 / fps finite.
MAX_SAMPLE_FPS = 1000.0


@dataclass(frozen=True)
class VideoFrame:
    image: Image.Image  # RGB
    timestamp: float  # seconds from the start of the video stream


def load_video(source: MediaSource, *, num_frames: int = 8, fps: float | None = None,
               max_pixels: int = MAX_FRAME_PIXELS, allowed_dirs: AllowedDirs = None) -> list[VideoFrame]:
    """Sample frames from a video file, file:// or data: URL, or bytes.

    By default `num_frames` frames are taken at the centres of equal slices of the clip. With
    `fps`, frames are taken every `1 / fps` seconds from the start instead; `num_frames` stays the
    cap, so a clip long enough to need more is sampled uniformly with `num_frames`. Each returned
    frame is the one on screen at its sample time. Raises FileNotFoundError or ValueError naming
    the source when it is missing, unreadable, has no video stream, or has frames over `max_pixels`.
    Local files must lie inside `allowed_dirs` when given (see `media.image.allowed_media_dirs`).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or
                            not 0 < fps <= MAX_SAMPLE_FPS):
        raise ValueError(f"fps={fps!r} is invalid: expected a number in (0, {MAX_SAMPLE_FPS:g}] frames per second, "
                         f"or None to sample num_frames frames evenly")
    av = import_av()
    name, fp = open_source(source, "video", allowed_dirs=allowed_dirs)
    with fp:
        with _open_container(av, fp, name) as container:
            stream = _video_stream(container, name)
            size = (stream.codec_context.width, stream.codec_context.height)
            if size != (0, 0):  # 0x0: not in the header; each frame is checked as it is decoded
                check_pixels(size, max_pixels, name, "video")
            start, duration = _stream_span(container, stream, name)
        # Decode with a fresh demuxer: raw streams cannot seek back after a duration scan.
        fp.seek(0)
        with _open_container(av, fp, name) as container:
            stream = _video_stream(container, name)
            times = _sample_times(duration, num_frames, fps)
            try:
                return list(_frames_at(container, stream, start, duration, times, max_pixels, name))
            except (av.error.FFmpegError, ValueError) as e:
                raise ValueError(f"video {name!r} is corrupt or truncated: {e}") from None


def import_av():
    try:
        import av
    except ImportError:
        raise ImportError("loading video needs PyAV: pip install av (or the llama4[video] extra)") from None
    return av


def _open_container(av, fp, name: str):
    try:
        return av.open(fp, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:  # FFmpeg reports an empty file as EINVAL
        raise ValueError(f"video {name!r} is not a readable video file: {e}") from None


def _video_stream(container, name: str):
    if not container.streams.video:
        raise ValueError(f"video {name!r} has no video stream")
    return container.streams.video[0]


def _stream_span(container, stream, name: str) -> tuple[float, float]:
    """(start, duration) of the stream in seconds, from the header or, failing that, the packets."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if stream.duration:
        return start, float(stream.duration * stream.time_base)
    if container.duration:
        return start, container.duration / 1_000_000  # in AV_TIME_BASE units
    # Raw streams carry no duration: read the packet timestamps, cheap next to decoding.
    end = start
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    if end <= start:
        raise ValueError(f"video {name!r} has no timestamps (a raw elementary stream?); remux it into MP4 or MKV")
    return start, end - start


def _sample_times(duration: float, num_frames: int, fps: float | None) -> list[float]:
    """Sample times in seconds from the stream start, ascending."""
    if fps is not None and math.ceil(duration * fps) <= num_frames:
        return [i / fps for i in range(max(math.ceil(duration * fps), 1))]
    return [(i + 0.5) * duration / num_frames for i in range(num_frames)]


def _frames_at(container, stream, start: float, duration: float, times: list[float], max_pixels: int,
               name: str) -> Iterator[VideoFrame]:
    """For each time, the last frame shown at or before it (the first frame for earlier times).

    Holds at most two decoded frames: the one on screen at the current sample time, and the
    first one after it, which may be the answer for the next sample.
    """
    av = import_av()
    rate = float(stream.average_rate) if stream.average_rate else None
    # The last frame of a whole file lies within a frame of any sample time; frames that stop
    # well short of one mean the file was cut off.
    slack = max(3 / rate, 1.0) if rate else 1.0
    decoded = iter(container.decode(stream))
    shown = ahead = None
    last_seen = None  # time of the latest frame decoded, kept across seeks
    for t in times:
        latest = ahead if ahead is not None else shown
        if latest is not None and t - _seconds(latest, start) > SEEK_AHEAD_S:
            try:  # to the keyframe at or before t; frames carry on from there
                container.seek(int((start + t) / stream.time_base), stream=stream, backward=True)
                decoded = iter(container.decode(stream))
                shown = ahead = None
            except av.error.FFmpegError:
                pass  # an unseekable input is still decodable straight through
        while ahead is None or _seconds(ahead, start) <= t:
            if ahead is not None:
                shown = ahead
            ahead = next(decoded, None)
            if ahead is None:  # end of stream: the last frame stays on screen
                break
            # The header's size may be missing or change mid-stream: each frame is checked too.
            check_pixels((ahead.width, ahead.height), max_pixels, name, "video")
            last_seen = _seconds(ahead, start)
        frame = shown if shown is not None else ahead
        if frame is None or t - last_seen > slack:
            ends = "has no decodable frames" if last_seen is None else f"frames end at {last_seen:.2f}s"
            raise ValueError(f"{ends}, but the header says the stream lasts {duration:.2f}s")
        yield VideoFrame(frame.to_image(), max(_seconds(frame, start), 0.0))


def _seconds(frame, start: float) -> float:
    if frame.time is None:
        raise ValueError("its frames carry no timestamps")
    return frame.time - start
