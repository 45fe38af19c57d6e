"""Sending a job's chord to Celery, by task name: the API never imports the GPU side."""

from __future__ import annotations

import uuid

from celery import chain, chord

from farm.db.tables import SegmentState
from farm.jobs import service as jobs
from farm.celery_app import app
from farm.settings import get_settings
from scheduler.routing import STITCH_QUEUE

RENDER_TASK = "farm.render_segment"
STITCH_TASK = "farm.stitch_job"
SEGMENT_FAILED_TASK = "farm.segment_failed"


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
