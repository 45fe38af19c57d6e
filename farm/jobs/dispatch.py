"""Sending a job's chord to Celery, by task name: the API never imports the GPU side."""

from __future__ import annotations

import uuid

from celery import chord

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
    """
    celery = celery or app
    priority = celery_priority(job.priority)
    task_ids = {seg.id: uuid.uuid4().hex for seg in job.segments}
    chord_id = uuid.uuid4().hex
    jobs.set_celery_ids(db_url or get_settings().database_url, job.id, chord_id, task_ids)
    header = [
        celery.signature(RENDER_TASK, args=(job.id, seg.id), immutable=True)
        .set(queue=job.route["queue"], priority=priority, task_id=task_ids[seg.id])
        .on_error(celery.signature(SEGMENT_FAILED_TASK))
        for seg in job.segments
    ]
    body = celery.signature(STITCH_TASK, args=(job.id,)).set(
        queue=STITCH_QUEUE, priority=priority, task_id=chord_id)
    chord(header, app=celery)(body)
    return chord_id
