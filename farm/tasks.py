"""Celery tasks: a chord per job, `render_segment` on the tier's queue, `stitch_job` after.

Failures are logged with the job and segment, recorded in the database, and re-raised;
errors whose class says `retryable` (a lost actor) are retried first.
"""

from __future__ import annotations

import logging

from farm import admission, batches, jobs, segment_runner, stitcher
from farm.celery_app import TICK_TASK, app
from farm.dispatch import RENDER_TASK, SEGMENT_FAILED_TASK, STITCH_TASK
from farm.errors import FarmError
from farm.settings import get_settings

log = logging.getLogger(__name__)

PROGRESS_STATE = "RENDERING"  # custom task state, shown by Flower


def _record_failure(job_id: str, seg_id: int, exc: BaseException) -> None:
    db = get_settings().database_url
    message = f"segment {seg_id}: {type(exc).__name__}: {exc}"
    jobs.fail_segment(db, seg_id, message)
    if jobs.fail_job(db, job_id, message):
        admission.release_soon(get_settings())  # its GPUs are free for the next job


@app.task(bind=True, name=RENDER_TASK)
def render_segment(self, job_id: str, seg_id: int) -> dict:
    settings = get_settings()

    def progress(step: int, steps: int) -> None:
        if not self.request.is_eager:
            self.update_state(state=PROGRESS_STATE,
                              meta={"job_id": job_id, "segment_id": seg_id, "step": step,
                                    "steps": steps})

    try:
        return segment_runner.run_segment(settings, job_id, seg_id, progress,
                                          worker=self.request.hostname)
    except Exception as exc:
        retryable = isinstance(exc, FarmError) and exc.retryable
        if retryable and self.request.retries < settings.segment_max_retries:
            log.warning("job %s segment %s: %s; retry %d", job_id, seg_id, exc,
                        self.request.retries + 1)
            raise self.retry(exc=exc, countdown=2, max_retries=settings.segment_max_retries)
        log.exception("job %s segment %s failed", job_id, seg_id)
        _record_failure(job_id, seg_id, exc)
        raise


@app.task(name=SEGMENT_FAILED_TASK)
def segment_failed(request, exc, traceback) -> None:
    """Errback of every render task: also runs when the task was killed by its hard time
    limit, where the task body's own handler never ran."""
    job_id, seg_id = request.args
    _record_failure(job_id, seg_id, exc)


@app.task(bind=True, name=STITCH_TASK)
def stitch_job(self, segment_results: list, job_id: str) -> dict:
    settings = get_settings()
    try:
        return stitcher.stitch(settings, job_id)
    except Exception as exc:
        log.exception("job %s: stitching failed", job_id)
        jobs.fail_job(settings.database_url, job_id, f"stitch: {type(exc).__name__}: {exc}")
        raise
    finally:
        admission.release_soon(settings)  # the job has left the GPUs


@app.task(name=TICK_TASK)
def tick() -> dict:
    """Celery beat, every FARM_TICK_SECONDS: open and close batch windows, release what
    admission allows, write the reports of finished batches."""
    return batches.tick(get_settings())
