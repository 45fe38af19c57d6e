"""Celery tasks: a chord per job, `render_segment` on the tier's queue, `stitch_job` after.

Failures are logged with the job and segment, recorded in the database, and re-raised;
errors whose class says `retryable` (a lost actor) are retried first.
"""

from __future__ import annotations

import logging
import uuid

from celery import chord

from farm import jobs, segment_runner, stitcher
from farm.celery_app import app
from farm.errors import FarmError
from farm.settings import get_settings
from scheduler.routing import STITCH_QUEUE

log = logging.getLogger(__name__)

PROGRESS_STATE = "RENDERING"  # custom task state, shown by Flower


def celery_priority(priority: int) -> int:
    """Job priority 0..100 (100 most urgent) -> Redis priority 0..9 (0 most urgent)."""
    return 9 - (max(0, min(100, priority)) * 9) // 100


@app.task(bind=True, name="farm.render_segment")
def render_segment(self, job_id: str, seg_id: int) -> dict:
    settings = get_settings()

    def progress(step: int, steps: int) -> None:
        if not self.request.is_eager:
            self.update_state(state=PROGRESS_STATE,
                              meta={"job_id": job_id, "segment_id": seg_id, "step": step,
                                    "steps": steps})

    try:
        return segment_runner.run_segment(settings, job_id, seg_id, progress)
    except Exception as exc:
        retryable = isinstance(exc, FarmError) and exc.retryable
        if retryable and self.request.retries < settings.segment_max_retries:
            log.warning("job %s segment %s: %s; retry %d", job_id, seg_id, exc,
                        self.request.retries + 1)
            raise self.retry(exc=exc, countdown=2)
        log.exception("job %s segment %s failed", job_id, seg_id)
        message = f"segment {seg_id}: {type(exc).__name__}: {exc}"
        jobs.fail_segment(settings.database_url, seg_id, message)
        jobs.fail_job(settings.database_url, job_id, message)
        raise


@app.task(bind=True, name="farm.stitch_job")
def stitch_job(self, segment_results: list, job_id: str) -> dict:
    settings = get_settings()
    try:
        return stitcher.stitch(settings, job_id)
    except Exception as exc:
        log.exception("job %s: stitching failed", job_id)
        jobs.fail_job(settings.database_url, job_id, f"stitch: {type(exc).__name__}: {exc}")
        raise


def enqueue_job(job) -> str:
    """Send the job's chord; returns the chord's id (the stitch task's).

    Task ids are chosen and recorded before sending, so a segment's custom progress state
    can be looked up (in the result backend, or in Flower) from the database alone.
    """
    priority = celery_priority(job.priority)
    task_ids = {seg.id: uuid.uuid4().hex for seg in job.segments}
    chord_id = uuid.uuid4().hex
    jobs.set_celery_ids(get_settings().database_url, job.id, chord_id, task_ids)
    header = [render_segment.si(job.id, seg.id).set(queue=job.route["queue"], priority=priority,
                                                    task_id=task_ids[seg.id])
              for seg in job.segments]
    body = stitch_job.s(job.id).set(queue=STITCH_QUEUE, priority=priority, task_id=chord_id)
    chord(header)(body)
    return chord_id
