"""H.264 chunks, concat without re-encode, ffprobe: real ffmpeg."""

from __future__ import annotations

import numpy as np
import pytest

from workers.video import VideoError, concat, encode_chunk, probe, thumbnail


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 112, 3), dtype=np.uint8)


def test_chunks_concat_to_the_sum_of_their_frames(tmp_path):
    chunks = [encode_chunk(frames(n, n), tmp_path / f"c{i}.mp4", 1280, 720, 16)
              for i, n in enumerate([16, 1, 7])]
    info = probe(concat(chunks, tmp_path / "out.mp4"))
    assert (info.width, info.height, info.frames) == (1280, 720, 24)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.duration_s == pytest.approx(24 / 16, abs=0.1)
    thumb = thumbnail(tmp_path / "out.mp4", tmp_path / "t.jpg")
    assert thumb.stat().st_size > 0


def test_scaled_to_requested_size(tmp_path):
    info = probe(encode_chunk(frames(5), tmp_path / "a.mp4", 832, 480, 24))
    assert (info.width, info.height, info.frames) == (832, 480, 5)


def test_bad_frames_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        encode_chunk(frames(2).astype(np.float32), tmp_path / "x.mp4", 1280, 720, 16)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="ffprobe failed"):
        probe(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="at least one"):
        concat([], tmp_path / "none.mp4")
