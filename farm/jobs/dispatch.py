"""Sending a job's chord to Celery, by task name: the API never imports the GPU side."""

from __future__ import annotations

import uuid

from celery import chain, chord
from sqlalchemy import update

from farm.db.session import session_scope
from farm.db.tables import Job, Segment, SegmentState
from farm.jobs import service as jobs
from farm.celery_app import app
from farm.settings import get_settings
from scheduler.routing import STITCH_QUEUE

RENDER_TASK = "farm.render_segment"
STITCH_TASK = "farm.stitch_job"
SEGMENT_FAILED_TASK = "farm.segment_failed"
BATCH_TASK = "farm.render_batch"  # like segments of several jobs in one render (issue #15)
BATCH_FAILED_TASK = "farm.render_batch_failed"
# What a batch's jobs must share besides their route (scheduler/batching.py's key; the
# render size is the variant's): one transformer pass serves every member.
BATCH_JOB_FIELDS = ("model", "steps", "guidance_high", "guidance_low")
BATCH_ROUTE_FIELDS = ("tier", "queue", "variant", "parallel", "placement", "cache")


def celery_priority(priority: int) -> int:
    """Job priority 0..100 (100 most urgent) -> Redis priority 0..9 (0 most urgent)."""
    return 9 - (max(0, min(100, priority)) * 9) // 100


def enqueue_job(job, celery=None, db_url: str | None = None) -> str:
    """Send the job's chord; returns the chord's id (the stitch task's).

    Task ids are chosen and recorded before sending, so a segment's custom progress state
    can be looked up (in the result backend, or in Flower) from the database alone. Each
    render task carries an errback that fails its segment and job however the task died
    (an exception, or a hard time limit where the task body never got to say so).

    A continuous job's segments form one chain inside the chord (issue #11, item 7):
    segment k+1 is sent only when segment k has finished, since it starts from k's last
    frame. A re-sent job's chain starts at its first segment not yet done. Other jobs'
    segments are a group: independent clips, all sent at once.
    """
    celery = celery or app
    priority = celery_priority(job.priority)
    segments = segments_to_send(job)
    task_ids = {seg.id: uuid.uuid4().hex for seg in segments}
    chord_id = uuid.uuid4().hex
    jobs.set_celery_ids(db_url or get_settings().database_url, job.id, chord_id, task_ids)
    renders = [
        celery.signature(RENDER_TASK, args=(job.id, seg.id), immutable=True)
        .set(queue=job.route["queue"], priority=priority, task_id=task_ids[seg.id])
        .on_error(celery.signature(SEGMENT_FAILED_TASK))
        for seg in segments
    ]
    header = [chain(*renders, app=celery)] if is_continuous(job) else renders
    body = celery.signature(STITCH_TASK, args=(job.id,)).set(
        queue=STITCH_QUEUE, priority=priority, task_id=chord_id)
    chord(header, app=celery)(body)
    return chord_id


def is_continuous(job) -> bool:
    """Whether the job's segments continue one another (a job without the field: no)."""
    return bool(getattr(job, "continuous", False)) and len(job.segments) > 1


def segments_to_send(job) -> list:
    """A continuous job: its segments from the first not yet done, in order (when all are
    done, the last one, which skips at once, so the chord still runs its stitch). Others:
    every segment (a done one skips at once)."""
    ordered = sorted(job.segments, key=lambda seg: seg.index)
    if not is_continuous(job):
        return ordered
    open_ = [i for i, seg in enumerate(ordered) if seg.state != SegmentState.done.value]
    return ordered[open_[0]:] if open_ else ordered[-1:]


def enqueue_batch(jobs: list, celery=None, db_url: str | None = None) -> str:
    """Send one ``farm.render_batch`` task rendering the single pending segment of each job
    in one batched group call (issue #15, item 2); returns its task id.

    The task id is recorded before sending as each member segment's ``celery_id`` (its
    fencing token, as a render task's) and ``render_batch`` (batch members are never
    preempted); each job's stitch task id is chosen now and recorded as the job's
    ``celery_id``, and the batch task sends that stitch once the job's member is done. No
    chord: a chord's header belongs to one body, and a batch's render feeds several jobs'
    stitches. A failed batch re-sends each member's job alone with its own chord
    (farm/tasks/batch_runner.py), so a batch failure never loses a job.
    """
    members = [(job, _batch_segment(job)) for job in jobs]  # ``jobs``: the rows, here
    if not members:
        raise ValueError("enqueue_batch: jobs must hold at least one job, got none")
    ids = [job.id for job, _ in members]
    if len(set(ids)) != len(ids):
        raise ValueError(f"enqueue_batch: a job appears twice in {ids!r}")
    _check_alike(members)
    celery, db_url = celery or app, db_url or get_settings().database_url
    batch_id = uuid.uuid4().hex
    recorded = [(job.id, seg.id, uuid.uuid4().hex) for job, seg in members]
    _record_batch(db_url, batch_id, recorded)
    priority = celery_priority(max(job.priority for job, _ in members))
    try:
        celery.signature(BATCH_TASK, args=([list(m) for m in recorded],), immutable=True) \
            .set(queue=members[0][0].route["queue"], priority=priority, task_id=batch_id) \
            .on_error(celery.signature(BATCH_FAILED_TASK)).apply_async()
    except Exception:  # not sent: no segment may stay marked as a member (admission unclaims)
        _record_batch(db_url, None, [(job_id, seg_id, None) for job_id, seg_id, _ in recorded])
        raise
    return batch_id


def _batch_segment(job):
    """The one segment a batch renders for ``job``: a job of one pending segment only (a
    continued segment's first frame is its own conditioning: it renders alone)."""
    open_ = [s for s in job.segments if s.state != SegmentState.done.value]
    if len(job.segments) != 1 or len(open_) != 1:
        raise ValueError(f"job {job.id}: a batch renders jobs of one segment not yet done; it "
                         f"has {len(job.segments)} segment(s), {len(open_)} not done")
    if open_[0].resume_key is not None:  # a preempted segment resumes from its saved state
        raise ValueError(f"job {job.id}: segment {open_[0].index} resumes from "
                         f"{open_[0].resume_key!r}: it renders alone")
    return open_[0]


def _check_alike(members: list) -> None:
    """Every member renders the same shape on the same pool: a ValueError names the field
    and the values otherwise. Single-rank, unsplit, uncached routes only (workers/
    batch_render.py says why)."""
    fields = [(f, lambda job, seg, f=f: getattr(job, f)) for f in BATCH_JOB_FIELDS]
    fields += [(f"route.{f}", lambda job, seg, f=f: job.route.get(f))
               for f in BATCH_ROUTE_FIELDS]
    fields.append(("render_frames", lambda job, seg: seg.render_frames))
    for name, read in fields:
        values = [read(job, seg) for job, seg in members]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"enqueue_batch: jobs disagree on {name}: {values!r}")
    route = members[0][0].route
    for name, alone in (("parallel", route.get("parallel", "single") != "single"),
                        ("placement", route.get("placement", "resident") == "split"),
                        ("cache", route.get("cache") is not None)):
        if alone:
            raise ValueError(f"enqueue_batch: route.{name} {route.get(name)!r} renders alone "
                             "(batches run on single-rank, unsplit, uncached groups)")


def _record_batch(db_url: str, batch_id: str | None,
                  members: list[tuple[str, int, str | None]]) -> None:
    """In one transaction: each job's stitch task id, each member segment's task (the
    batch's) and batch id (None: all cleared again)."""
    with session_scope(db_url) as session:
        for job_id, seg_id, stitch_id in members:
            session.execute(update(Job).where(Job.id == job_id).values(celery_id=stitch_id))
            session.execute(update(Segment).where(Segment.id == seg_id)
                            .values(celery_id=batch_id, render_batch=batch_id))
