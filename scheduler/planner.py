"""Split a job's frames into segments, each one diffusion run of at most the model's length.

Wan renders 4k+1 frames per run. A job of F = 4k+1 frames longer than the model's
maximum M becomes: a first segment of M frames, then segments that render 4j+1 frames and
keep the last 4j (their first frame is where a continuation would be conditioned), so the
kept frames add up to exactly F. The dropped first frame is the previous segment's last
one, held as the continuation's first latent frame (issue #11, item 7), so consecutive
segments join without a cut.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


SEED_SPACE = 2**31  # seeds are 0 .. 2^31-1


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    frame_start: int  # index of the first kept frame in the job's video
    render_frames: int  # frames the model renders (4k+1)
    skip_frames: int  # leading rendered frames dropped (0 or 1)
    seed: int

    @property
    def kept_frames(self) -> int:
        return self.render_frames - self.skip_frames


def is_4k_plus_1(n: int) -> bool:
    return n >= 1 and (n - 1) % 4 == 0


def plan_segments(frames: int, max_frames: int, seed: int) -> list[SegmentPlan]:
    if not is_4k_plus_1(frames):
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if not is_4k_plus_1(max_frames) or max_frames < 5:
        raise ValueError(f"max_frames must be 4k+1 and >= 5, got {max_frames}")
    first = min(frames, max_frames)
    plans = [SegmentPlan(0, 0, first, 0, segment_seed(seed, 0))]
    done = first
    while done < frames:
        keep = min(frames - done, max_frames - 1)  # a multiple of 4
        plans.append(SegmentPlan(len(plans), done, keep + 1, 1, segment_seed(seed, len(plans))))
        done += keep
    return plans


def segment_seed(job_seed: int, index: int) -> int:
    """Each segment its own noise, still within the 31-bit seed range.

    Segment 0 renders from the job's seed itself (a one-segment job is the clip that seed
    gives in `WanT2V` and diffusers' WanPipeline alike); a later one from a hash of (job
    seed, index). Never ``seed + index`` (issue #11): in a batch fanned out over seeds s,
    s+1, ... job s's segment 1 would be job s+1's segment 0, the same noise.
    """
    if index == 0:
        return job_seed % SEED_SPACE
    digest = hashlib.blake2b(f"wan-segment:{job_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_SPACE
