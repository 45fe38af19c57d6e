"""Where a continued segment's first frame comes from (issue #11, item 7): storage.

Segment k of a continuous job saves its last rendered frame; segment k+1 starts from it
(`RenderRequest.first_frame`, workers/wan_pipeline.py), which the planner's "render 4j+1,
keep the last 4j" (scheduler/planner.py) then drops, so the two join frame-exactly. The
frame is stored raw (``.npy``, uint8 (H, W, 3) at the model's native size): a lossy codec
here would put its error into every later segment.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from farm.errors import FarmError
from farm.storage import Storage


class SeamMissing(FarmError):
    """The previous segment's last frame is not in storage (or not a frame). Never retried:
    segments of a continuous job run as one chain (farm/jobs/dispatch.py), so the previous
    one is done and its frame was lost; another worker would find it missing too."""


def last_frame_key(job_id: str, index: int, attempt: int) -> str:
    """One key per attempt: an attempt that was replaced but still runs never overwrites the
    frame of the attempt that finished the segment, which is the one read."""
    return f"jobs/{job_id}/seams/s{index:04d}_a{attempt:02d}_last.npy"


def first_frame(storage: Storage, job, segment) -> np.ndarray | None:
    """The frame segment ``segment.index`` continues from: uint8 (H, W, 3), or None for
    segment 0 and for a job whose segments are independent clips (``continuous`` false)."""
    if segment.index == 0 or not getattr(job, "continuous", False):
        return None
    previous = next(s for s in job.segments if s.index == segment.index - 1)
    key = last_frame_key(job.id, previous.index, previous.attempts)  # the attempt that finished
    if not storage.exists(key):
        raise SeamMissing(f"job {job.id} segment {segment.index}: the last frame of segment "
                          f"{segment.index - 1} is missing from storage ({key!r}); segment "
                          f"{segment.index - 1} must finish before segment {segment.index}")
    with storage.open(key) as fh:
        frame = np.load(io.BytesIO(fh.read()), allow_pickle=False)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise SeamMissing(f"job {job.id}: {key!r} holds a {frame.dtype} array of shape "
                          f"{frame.shape}, not a uint8 (H, W, 3) frame")
    return frame


def save_last_frame(storage: Storage, job, segment, frame: np.ndarray) -> str:
    """Store segment ``segment.index``'s last rendered frame (uint8 (H, W, 3), native size,
    before any scaling); returns its storage key. Atomic (Storage.put_file)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
            or frame.shape[-1] != 3:
        got = (f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray)
               else type(frame).__name__)
        raise ValueError(f"frame must be a uint8 array of shape (H, W, 3), got {got}")
    key = last_frame_key(job.id, segment.index, segment.attempts)
    with tempfile.TemporaryDirectory(prefix="farm-seam-") as work:
        local = Path(work) / "last.npy"
        np.save(local, np.ascontiguousarray(frame), allow_pickle=False)
        storage.put_file(local, key)
    return key
