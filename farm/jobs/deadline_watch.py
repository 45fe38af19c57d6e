"""Deadlines that hold (issue #15, item 3): the beat tick's sweep over jobs with a deadline.

Each tick, for every live job with a deadline not yet missed (partial index
ix_jobs_deadline_live: never the finished history), the estimate of scheduler.deadlines
says whether it still finishes in time: its own segments left (steps left after a
preemption or a partial render, at the measured seconds per step of its variant, tier and
degree, the catalog's when nothing was measured yet) after the work ahead of it on its
tier (what the jobs on the GPUs have left, and the waiting jobs before it in admission
order, scheduler.deadlines.admission_key), spread over the tier's GPUs. ``deadline_risk``
follows the estimate (a compare-and-set on the value read); turning true leaves a
``deadline_at_risk`` line in the job's log.

A deadline passing while the job is live (seen live after it, or ended after it: read from
the jobs finished in the last RECENT_S through the index on finished_at, for a job ending
between two ticks) sets ``deadline_missed_at`` once, logs ``deadline_missed`` and writes the
``deadline_missed`` webhook outbox row, in one transaction. A job that failed or was
canceled before its deadline did not miss it: its ``completed`` event says how it ended.

Measured step times come from the last FARM_STEP_TIME_WINDOW rendered jobs of each
(variant, tier, degree): their ``stage_times["denoise"]`` (the sampler's steps only, not the
model load, the VAE or the encode) over the steps of their segments not answered from the
cache; read at most once every STEP_TIMES_MAX_AGE_S per process.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import select, update

from farm.db.session import session_scope
from farm.db.tables import Job, JobState, Segment, SegmentState, utcnow
from farm.jobs import admit, events, webhooks
from farm.jobs.admit_queries import ADMISSION_ORDER, NOT_SENT, ON_GPUS, state_in
from farm.policy import get_policy
from farm.settings import Settings
from scheduler import deadlines as dl
from scheduler.routing import TP_EFFICIENCY, segments_rendered_frames

LIVE = (JobState.queued.value, JobState.waiting.value, JobState.running.value,
        JobState.stitching.value)
RECENT_S = 3600.0  # jobs finished this long ago are checked for a late delivery
AHEAD_LIMIT = 500  # waiting jobs of a tier read, in admission order (admission's 5 pages)
STEP_TIMES_MAX_AGE_S = 30.0
SAMPLES_PER_WINDOW = 20  # recent jobs read: window x this, all variants together

_times_cache: dict[str, tuple[float, dl.StepTimes]] = {}
_times_lock = threading.Lock()


# ---- measured step times --------------------------------------------------------------------

def step_times(settings: Settings, fresh: bool = False) -> dl.StepTimes:
    """The farm's measured seconds per full-segment step, at most STEP_TIMES_MAX_AGE_S old."""
    db, window = settings.database_url, settings.step_time_window
    with _times_lock:
        cached = _times_cache.get(db)
        if cached and not fresh and time.monotonic() - cached[0] < STEP_TIMES_MAX_AGE_S:
            return cached[1]
    times = dl.StepTimes(_samples(db, window), window)
    with _times_lock:
        _times_cache[db] = (time.monotonic(), times)
    return times


def _samples(db_url: str, window: int) -> list[dl.StepSample]:
    """Newest first: the last rendered jobs (index on finished_at), their rendered segments."""
    catalog = get_policy().catalog
    with session_scope(db_url) as session:
        jobs = session.execute(
            select(Job.id, Job.route, Job.steps, Job.stage_times)
            .where(Job.finished_at.is_not(None), Job.state == JobState.succeeded.value,
                   Job.cached_from.is_(None))
            .order_by(Job.finished_at.desc()).limit(window * SAMPLES_PER_WINDOW)).all()
        frames: dict[str, list[int]] = {}
        for job_id, render_frames in session.execute(
                select(Segment.job_id, Segment.render_frames)
                .where(Segment.job_id.in_([j.id for j in jobs]), Segment.cached_from.is_(None))):
            frames.setdefault(job_id, []).append(render_frames)
    out = []
    for job in jobs:
        variant = catalog.models.get(job.route.get("variant"))
        denoise = (job.stage_times or {}).get("denoise")
        if variant is None or not denoise or job.id not in frames:
            continue
        sample = dl.sample_of(variant.name, job.route["tier"], admit.gpus_per_group(job.route),
                              float(denoise), job.steps, frames[job.id], variant.max_frames,
                              variant.latent.stride[0])
        if sample is not None:
            out.append(sample)
    return out


def full_step_s(times: dl.StepTimes, route: dict) -> tuple[float, str] | None:
    """(seconds per full-segment step, source) of the route's variant on its tier."""
    variant = get_policy().catalog.models.get(route.get("variant"))
    if variant is None:
        return None
    degree = admit.gpus_per_group(route)
    return dl.step_seconds(times, variant.name, route["tier"], degree,
                           dl.catalog_step_s(variant.seconds_per_step, route["tier"],
                                             route["degree"], TP_EFFICIENCY))


def job_left_s(times: dl.StepTimes, route: dict, steps: int, frames: int,
               progress: float) -> float:
    """Seconds a job ahead still renders (its job-level progress: no segment read)."""
    per_step = full_step_s(times, route)
    variant = get_policy().catalog.models.get(route.get("variant"))
    if per_step is None or variant is None:
        return float(route.get("est_seconds") or 0.0) * (1.0 - progress)
    share = segments_rendered_frames(frames, variant.max_frames) / variant.max_frames
    return per_step[0] * steps * share * max(0.0, 1.0 - progress)


# ---- the sweep ------------------------------------------------------------------------------

def live_query():
    """Live jobs with a deadline not yet missed (partial index ix_jobs_deadline_live)."""
    return (select(Job.id, Job.state, Job.tier, Job.route, Job.project, Job.priority,
                   Job.created_at, Job.deadline_at, Job.deadline_risk, Job.steps,
                   Job.continuous, Job.dispatched_at)
            .where(Job.deadline_at.is_not(None), Job.deadline_missed_at.is_(None),
                   state_in(LIVE)))


def ended_query(now: datetime):
    """Jobs ended in the last RECENT_S (index on finished_at) with a deadline not marked
    missed that either ended after it or still show a risk."""
    return (select(Job.id, Job.state, Job.deadline_at, Job.finished_at, Job.deadline_risk)
            .where(Job.finished_at >= now - timedelta(seconds=RECENT_S),
                   Job.deadline_at.is_not(None), Job.deadline_missed_at.is_(None),
                   (Job.finished_at > Job.deadline_at) | Job.deadline_risk.is_(True)))


def sweep(settings: Settings, now: datetime | None = None) -> dict[str, list[str]]:
    """One tick's pass: mark missed deadlines, then re-estimate the risk of the rest.
    -> {"missed": ids, "at_risk": ids turned at risk, "on_track": ids turned back}."""
    now, db = now or utcnow(), settings.database_url
    with session_scope(db) as session:
        live = session.execute(live_query()).all()
        ended = session.execute(ended_query(now)).all()
    missed = [r.id for r in live if dl.missed(r.deadline_at, now, None)
              and mark_missed(db, r.id, now, f"still {r.state} at its deadline "
                                             f"{r.deadline_at:%H:%M:%S} UTC")]
    for r in ended:  # ended between two ticks: it was live when its deadline passed
        if dl.missed(r.deadline_at, now, r.finished_at):
            late = (r.finished_at - r.deadline_at).total_seconds()
            end = "delivered" if r.state == JobState.succeeded.value else r.state
            if mark_missed(db, r.id, now, f"{end} {late:.1f} s after its deadline"):
                missed.append(r.id)
        elif r.deadline_risk:
            set_risk(db, r.id, True, False, "")
    turned = {"at_risk": [], "on_track": []}
    missed_ids = set(missed)
    rest = [r for r in live if r.id not in missed_ids]
    if rest:
        times = step_times(settings)
        for tier in sorted({r.tier for r in rest}):
            for row, view in _outlooks(db, tier, [r for r in rest if r.tier == tier], times,
                                       now):
                if view.at_risk != row.deadline_risk and set_risk(
                        db, row.id, row.deadline_risk, view.at_risk, _why(view, row, now)):
                    turned["at_risk" if view.at_risk else "on_track"].append(row.id)
    return {"missed": missed, **turned}


def _why(view: dl.Outlook, row, now: datetime) -> str:
    return (f"estimated to finish at {view.finish_at:%H:%M:%S} UTC, after its deadline "
            f"{row.deadline_at:%H:%M:%S} UTC: {view.wait_s:.1f} s of work ahead on tier "
            f"{row.tier} + {view.render_s:.1f} s of render left")


def set_risk(db_url: str, job_id: str, was: bool, now_risk: bool, why: str) -> bool:
    """Compare-and-set deadline_risk from ``was``; turning true logs why."""
    with session_scope(db_url) as session:
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.deadline_risk.is_(was),
                              Job.deadline_missed_at.is_(None))
            .values(deadline_risk=now_risk)).rowcount
        if done and now_risk:
            events.add(session, job_id, events.DEADLINE_AT_RISK, why)
    return bool(done)


def mark_missed(db_url: str, job_id: str, now: datetime, why: str) -> bool:
    """Once per job: deadline_missed_at, its log line and its webhook row, one transaction."""
    with session_scope(db_url) as session:
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.deadline_missed_at.is_(None))
            .values(deadline_missed_at=now, deadline_risk=True)).rowcount
        if done:
            events.add(session, job_id, events.DEADLINE_MISSED, f"deadline missed: {why}")
            webhooks.job_deadline_missed(session, job_id)
    return bool(done)


def _outlooks(db_url: str, tier: str, rows: list, times: dl.StepTimes, now: datetime):
    """(row, Outlook) for the tier's live deadline jobs: the tier's jobs on the GPUs (index
    ix_jobs_in_flight) and its first AHEAD_LIMIT waiting in admission order
    (ix_jobs_admission_edf) give the GPU-seconds ahead; each deadline job's own segments
    give its render left. A waiting job beyond the first AHEAD_LIMIT counts those only (an
    underestimate of the wait: its risk shows late, never falsely)."""
    policy = get_policy()
    spec = policy.catalog.tiers.get(tier)
    with session_scope(db_url) as session:
        flying = session.execute(flying_query(tier)).all()
        line = session.execute(line_query(tier)).all()
        left = _segments_left(session, [r.id for r in rows])
    on_gpus = sum(job_left_s(times, r.route, r.steps, r.frames, r.progress)
                  * admit.gpus_per_group(r.route) for r in flying)
    keys, ahead_of = _line_work(line, times)
    gpus = spec.gpus if spec is not None else 0
    for row in rows:
        per_step = full_step_s(times, row.route)
        variant = policy.catalog.models.get(row.route.get("variant"))
        if per_step is None or variant is None or (gpus < 1 and row.dispatched_at is None):
            continue  # no estimate: the risk is left as it is
        segs = left.get(row.id, [])
        groups = admit.job_groups(row.route, row.project, 1 if row.continuous else len(segs),
                                  policy)
        render = dl.render_seconds(per_step[0], segs, variant.max_frames, groups,
                                   row.continuous, variant.latent.stride[0])
        key = dl.admission_key(row.priority, row.deadline_at, row.created_at, row.id)
        ahead = on_gpus + ahead_of[bisect.bisect_left(keys, key)]  # the line's keys < key
        yield row, dl.outlook(now, row.deadline_at, render, ahead, gpus,
                              running=row.dispatched_at is not None)


def flying_query(tier: str):
    """The tier's jobs on the GPUs (sent, queued or running: partial index ix_jobs_in_flight)."""
    return (select(Job.route, Job.steps, Job.frames, Job.progress)
            .where(Job.dispatched_at.is_not(None), state_in(ON_GPUS), Job.tier == tier))


def line_query(tier: str):
    """The tier's first AHEAD_LIMIT waiting jobs in admission order (ix_jobs_admission_edf)."""
    return (select(Job.id, Job.route, Job.priority, Job.created_at, Job.deadline_at,
                   Job.steps, Job.frames, Job.progress)
            .where(Job.tier == tier, Job.state == JobState.queued.value, *NOT_SENT)
            .order_by(*ADMISSION_ORDER).limit(AHEAD_LIMIT))


def _line_work(line: list, times: dl.StepTimes) -> tuple[list[tuple], list[float]]:
    """(the line's admission keys, sorted; GPU-seconds before each): ``ahead_of[i]`` is the
    work of the first ``i`` keys, so a job's wait is one bisect, not a scan of the line per
    live job (O(live log line), not O(live x line): issue #15 review)."""
    work = sorted((dl.admission_key(r.priority, r.deadline_at, r.created_at, r.id),
                   job_left_s(times, r.route, r.steps, r.frames, r.progress)
                   * admit.gpus_per_group(r.route)) for r in line)
    keys = [key for key, _ in work]
    ahead_of = [0.0, *itertools.accumulate(seconds for _, seconds in work)]
    return keys, ahead_of


def _segments_left(session, job_ids: list[str]) -> dict[str, list[dl.Left]]:
    """job id -> its segments still to denoise, with the steps each has left (after its
    progress, or its saved state's step after a preemption), read by segments.job_id."""
    out: dict[str, list[dl.Left]] = {job_id: [] for job_id in job_ids}
    rows = session.execute(
        select(Segment.job_id, Segment.render_frames, Segment.progress, Segment.resume_step,
               Job.steps)
        .join(Job, Job.id == Segment.job_id)
        .where(Segment.job_id.in_(job_ids),
               Segment.state.in_((SegmentState.pending.value, SegmentState.running.value)),
               Segment.cached_from.is_(None))).all()
    for job_id, frames, progress, resume_step, steps in rows:
        done = max(resume_step or 0, int((progress or 0.0) * steps + 1e-9))
        if done < steps:
            out[job_id].append(dl.Left(frames, steps - done))
    return out
