"""H.264 chunks, stitching and probing with ffmpeg (through ffmpeg-python).

Every chunk is encoded with the same settings (libx264, yuv420p, closed GOP starting on an
IDR frame), so the concat demuxer can join chunks with ``-c copy``, without re-encoding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np


class VideoError(RuntimeError):
    """ffmpeg or ffprobe failed; the message carries the tail of its stderr."""


def _run(stream, input_bytes: bytes | None = None) -> None:
    try:
        stream.run(input=input_bytes, capture_stdout=True, capture_stderr=True, quiet=True)
    except ffmpeg.Error as exc:
        tail = (exc.stderr or b"").decode(errors="replace")[-1500:]
        raise VideoError(f"ffmpeg failed: {tail}") from None


def encode_chunk(frames: np.ndarray, path: str | Path, width: int, height: int, fps: int,
                 preset: str = "veryfast", crf: int = 18) -> Path:
    """Encode uint8 frames (T, H, W, 3) to an H.264 MP4 of width x height: scaled to fit,
    keeping the frames' aspect ratio, and padded with black (a 32x32 model's square clip
    becomes a pillarboxed 1280x720 video, not a stretched one)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    count, src_h, src_w, _ = frames.shape
    path = Path(path)
    stream = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{src_w}x{src_h}", r=fps)
        .filter("scale", width, height, flags="bicubic", force_original_aspect_ratio="decrease",
                force_divisible_by=2)
        .filter("pad", width, height, "(ow-iw)/2", "(oh-ih)/2")
        .filter("setsar", 1)
        .output(str(path), vcodec="libx264", pix_fmt="yuv420p", preset=preset, crf=crf,
                r=fps, g=max(count, 1), keyint_min=max(count, 1), sc_threshold=0,
                flags="+cgop", movflags="+faststart", video_track_timescale=fps * 1000)
        .overwrite_output()
    )
    _run(stream, np.ascontiguousarray(frames).tobytes())
    return path


def concat(chunks: list[str | Path], path: str | Path) -> Path:
    """Join chunks with the concat demuxer, stream copy (no re-encode)."""
    if not chunks:
        raise ValueError("concat needs at least one chunk")
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, dir=path.parent) as listing:
        for chunk in chunks:
            escaped = str(Path(chunk).resolve()).replace("'", r"'\''")
            listing.write(f"file '{escaped}'\n")
    try:
        stream = (ffmpeg.input(listing.name, format="concat", safe=0)
                  .output(str(path), c="copy", movflags="+faststart").overwrite_output())
        _run(stream)
    finally:
        Path(listing.name).unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int  # counted by decoding, not read from the header
    codec: str
    pix_fmt: str
    duration_s: float


def probe(path: str | Path) -> VideoInfo:
    try:
        info = ffmpeg.probe(str(path), select_streams="v:0", count_frames=None)
    except ffmpeg.Error as exc:
        raise VideoError(f"ffprobe failed on {path}: "
                         f"{(exc.stderr or b'').decode(errors='replace')[-800:]}") from None
    if not info.get("streams"):
        raise VideoError(f"{path} has no video stream")
    stream = info["streams"][0]
    return VideoInfo(width=int(stream["width"]), height=int(stream["height"]),
                     frames=int(stream.get("nb_read_frames", 0)), codec=stream["codec_name"],
                     pix_fmt=stream.get("pix_fmt", ""),
                     duration_s=float(info.get("format", {}).get("duration", 0.0)))


def thumbnail(video: str | Path, path: str | Path, width: int = 320,
              duration_s: float | None = None) -> Path:
    """A JPEG of the middle frame. ``duration_s``: the video's, when the caller has probed it
    already (each ffprobe costs a process start and a decode)."""
    if duration_s is None:
        duration_s = probe(video).duration_s
    stream = (ffmpeg.input(str(video), ss=duration_s / 2).filter("scale", width, -2)
              .output(str(path), vframes=1).overwrite_output())
    _run(stream)
    return Path(path)


def contact_sheet(video: str | Path, path: str | Path, frames: int, columns: int = 4,
                  rows: int = 3, width: int = 160) -> Path:
    """A JPEG grid of up to ``columns`` x ``rows`` frames spread evenly over the clip
    (``frames`` long, first and last included), each ``width`` pixels wide, left to right
    then down (ffmpeg's tile filter); a clip shorter than the grid fills fewer rows."""
    count = max(1, min(columns * rows, frames))
    picked = sorted({round(i * (frames - 1) / max(1, count - 1)) for i in range(count)})
    rows = -(-len(picked) // columns)
    stream = (ffmpeg.input(str(video))
              # ffmpeg-python escapes the commas of the expression for the filter graph.
              .filter("select", "+".join(f"eq(n,{i})" for i in picked))
              .filter("scale", width, -2)
              .filter("tile", f"{columns}x{rows}")
              .output(str(path), vframes=1, fps_mode="vfr").overwrite_output())
    _run(stream)
    return Path(path)


def animated_preview(video: str | Path, path: str | Path, width: int = 320,
                     fps: int = 8) -> Path:
    """An animated WebP of the whole clip at ``fps`` frames a second, ``width`` wide, looping."""
    stream = (ffmpeg.input(str(video)).filter("fps", fps).filter("scale", width, -2)
              .output(str(path), vcodec="libwebp_anim", loop=0, quality=70, an=None)
              .overwrite_output())
    _run(stream)
    return Path(path)

