"""Deadlines that hold (issue #15, item 3): the admission order, the render estimate from
measured step times, and whether a job can still meet its deadline.

Pure: the farm (farm/jobs/admit.py, farm/jobs/deadline_watch.py) and the fleet simulator feed
these functions; nothing here reads a clock or a database.

Admission order: priorities are grouped in bands of ``PRIORITY_BAND`` (90-99 share one, 100 is
alone). A higher band always goes first, so a deadline never lets a batch job jump a final;
within a band the earliest deadline goes first (EDF, which meets every deadline a single line
can meet), jobs without a deadline after those with one, then priority, age and id as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

PRIORITY_BAND = 10  # priorities 90-99 share a band (100 alone), 80-89, ...


def band(priority: int) -> int:
    """The priority band: 0..10 for priorities 0..100 (100 is a band of its own)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority {priority!r} is not an integer")
    if not 0 <= priority <= 100:
        raise ValueError(f"priority {priority!r} is outside 0..100")
    return priority // PRIORITY_BAND


def admission_key(priority: int, deadline_at: datetime | None, created_at: datetime,
                  job_id: str) -> tuple:
    """Sort key, ascending = admission order: higher band first; within a band earliest
    deadline first, jobs without a deadline after those with one; then priority desc,
    created_at, id. Deadlines and creation times must all be aware or all naive (the farm's
    are aware UTC); a job without a deadline gets a constant in the deadline place so two of
    them are never compared on it."""
    has_no_deadline = deadline_at is None
    deadline_place = 0.0 if deadline_at is None else deadline_at.timestamp()
    return (-band(priority), has_no_deadline, deadline_place, -priority, created_at, job_id)


# ---- the render estimate from measured step times ----------------------------------------
#
# A variant renders at its native size (encoding scales to the requested one), so a step's
# time depends on the variant, the tier, the group's degree and the segment's frames. The
# farm measures each rendered job's denoising seconds (stage_times["denoise"], summed over
# its segments: the honest source, without the model load, the VAE and the encoding) and
# the steps it ran; a sample is normalised to "full-segment steps" (a step of a segment of
# max_frames), so one number per (variant, tier, degree) covers every segment length.

@dataclass(frozen=True, slots=True)
class StepSample:
    """One rendered job's denoising: ``denoise_s`` seconds over ``full_steps`` steps counted
    in full segments (a step of a 9-frame segment of a 17-frame model counts 3/5)."""
    variant: str
    tier: str
    degree: int
    denoise_s: float
    full_steps: float


def volume_share(render_frames: int, max_frames: int, temporal_stride: int = 4) -> float:
    """A segment's latent volume over a full segment's (the same native height and width):
    Wan's causal VAE gives (frames - 1) / stride + 1 latent frames."""
    if render_frames < 1 or render_frames > max_frames:
        raise ValueError(f"render_frames {render_frames!r} is outside 1..{max_frames}")
    latent = (render_frames - 1) // temporal_stride + 1
    return latent / ((max_frames - 1) // temporal_stride + 1)


def sample_of(variant: str, tier: str, degree: int, denoise_s: float, steps: int,
              segment_frames: list[int], max_frames: int,
              temporal_stride: int = 4) -> StepSample | None:
    """The sample of a job that rendered segments of ``segment_frames`` (those it rendered,
    not those answered from the cache) with ``steps`` steps each; None when it measured no
    denoising."""
    full = steps * sum(volume_share(f, max_frames, temporal_stride) for f in segment_frames)
    if denoise_s <= 0 or full <= 0:
        return None
    return StepSample(variant, tier, degree, float(denoise_s), full)


class StepTimes:
    """Seconds per full-segment step per (variant, tier, degree), from the last ``window``
    samples of each (newest first in ``samples``): total seconds over total steps, so a
    long job weighs as much as its steps."""

    def __init__(self, samples: list[StepSample], window: int):
        if window < 1:
            raise ValueError(f"step_time_window must be >= 1, got {window!r}")
        kept: dict[tuple, list[StepSample]] = {}
        for s in samples:
            bucket = kept.setdefault((s.variant, s.tier, s.degree), [])
            if len(bucket) < window:
                bucket.append(s)
        self.per_step = {key: sum(s.denoise_s for s in b) / sum(s.full_steps for s in b)
                         for key, b in kept.items()}
        self.counts = {key: len(b) for key, b in kept.items()}

    def measured(self, variant: str, tier: str, degree: int) -> float | None:
        return self.per_step.get((variant, tier, degree))


def catalog_step_s(seconds_per_step: dict[str, float], tier: str, degree: int,
                   tp_efficiency: float) -> float | None:
    """The catalog's full-segment step on ``degree`` GPUs (as scheduler.routing.est_seconds
    scales it); None when the catalog has no time for the tier."""
    per_step = seconds_per_step.get(tier)
    if per_step is None:
        return None
    return per_step / (degree * (tp_efficiency if degree > 1 else 1.0))


def step_seconds(measured: StepTimes | None, variant: str, tier: str, degree: int,
                 catalog_s: float | None) -> tuple[float, str] | None:
    """(seconds per full-segment step, "measured" | "catalog"): what was measured wins."""
    found = measured.measured(variant, tier, degree) if measured is not None else None
    if found is not None:
        return found, "measured"
    return (catalog_s, "catalog") if catalog_s is not None else None


@dataclass(frozen=True, slots=True)
class Left:
    """A segment still to render: its frames and the steps it has left (a preempted one
    resumes with steps - resume_step left)."""
    render_frames: int
    steps_left: int


def render_seconds(full_step_s: float, left: list[Left], max_frames: int, groups: int = 1,
                   continuous: bool = True, temporal_stride: int = 4) -> float:
    """Seconds to render what is left: one after another for a continuous job, ``groups``
    segments at a time (rounds of the longest) for independent clips."""
    times = sorted((full_step_s * seg.steps_left *
                    volume_share(seg.render_frames, max_frames, temporal_stride)
                    for seg in left), reverse=True)
    if continuous or groups <= 1:
        return sum(times)
    return sum(times[i] for i in range(0, len(times), groups))  # each round's longest


# ---- will it make its deadline? ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outlook:
    finish_at: datetime  # when it should finish, queue and render together
    wait_s: float  # before its first group frees, from the GPU-seconds ahead of it
    render_s: float
    at_risk: bool  # finish_at is past the deadline


def outlook(now: datetime, deadline_at: datetime, render_s: float, gpu_s_ahead: float,
            tier_gpus: int, running: bool = False, slack_s: float = 0.0) -> Outlook:
    """Whether a job finishes by ``deadline_at``. ``gpu_s_ahead``: GPU-seconds of work the
    tier must do before it (what its running jobs have left and the waiting jobs ahead of
    it in admission order); they spread over the tier's ``tier_gpus``, so the wait is their
    quotient (the line a fluid model of the tier gives). A ``running`` job waits for
    nothing. ``slack_s``: a margin kept for the stitch and the encode after the last step."""
    if tier_gpus < 1 and not running:
        raise ValueError(f"tier_gpus must be >= 1 for a waiting job, got {tier_gpus!r}")
    if render_s < 0 or gpu_s_ahead < 0:
        raise ValueError(f"render_s {render_s!r} and gpu_s_ahead {gpu_s_ahead!r} must be >= 0")
    wait = 0.0 if running else gpu_s_ahead / tier_gpus
    finish = now + timedelta(seconds=wait + render_s + slack_s)
    return Outlook(finish, wait, render_s, finish > deadline_at)


def missed(deadline_at: datetime | None, now: datetime, finished_at: datetime | None) -> bool:
    """A deadline is missed when it passes while the job is live: the job is still live
    after it, or ended (delivered or not) after it. A job that failed or was canceled
    before its deadline did not miss it (its own end is reported)."""
    if deadline_at is None:
        return False
    return (finished_at if finished_at is not None else now) > deadline_at
