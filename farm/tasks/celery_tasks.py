"""Celery tasks: a chord per job, `render_segment` on the tier's queue, `stitch_job` after.

Failures are logged with the job and segment, recorded in the job's event log, and
re-raised (farm.tasks.failure_handling): a failed segment is retried on another worker until the
failure policy (farm.tasks.failure_policy) says it has failed for good; FarmErrors that are not
``retryable`` fail it at once. While the database is unreachable a task waits and tries
again, recording nothing; the reconciler (farm.tasks.reconcile) is the backstop.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore, Retry

from farm.jobs import admit, batches, cache_upkeep, service as jobs
from farm.jobs import controls, webhook_delivery
from farm.jobs import deadline_watch, retention
from farm.tasks import batch_runner, reconcile, failure_handling, segment_runner, stitcher
from farm.celery_app import (
    BROKER_OUTAGE, HOUSEKEEPING_TASK, TICK_TASK, WEBHOOKS_TASK, app,
)
from farm.db.session import DATABASE_OUTAGE
from farm.jobs.dispatch import (
    BATCH_FAILED_TASK, BATCH_TASK, RENDER_TASK, SEGMENT_FAILED_TASK, STITCH_TASK,
)
from farm.settings import get_settings

log = logging.getLogger(__name__)

PROGRESS_STATE = "RENDERING"  # custom task state, shown by Flower


# max_retries=None: retries are bounded by the failure policy and the segment's attempts.
@app.task(bind=True, name=RENDER_TASK, max_retries=None)
def render_segment(self, job_id: str, seg_id: int) -> dict:
    settings = get_settings()
    worker = self.request.hostname or "local"

    def progress(step: int, steps: int) -> None:
        if self.request.is_eager:
            return
        try:  # advisory, like the database's progress: a Redis restart must not stop a render
            self.update_state(state=PROGRESS_STATE,
                              meta={"job_id": job_id, "segment_id": seg_id, "step": step,
                                    "steps": steps})
        except BROKER_OUTAGE as exc:
            log.warning("job %s segment %s: progress not sent: %s", job_id, seg_id, exc)

    try:
        if not jobs.owns_segment(settings.database_url, seg_id, self.request.id):
            return {"segment_id": seg_id, "superseded": True}  # a late redelivery
        failure_handling.hand_on_if_blocklisted(self, job_id, seg_id, worker)
        return segment_runner.run_segment(settings, job_id, seg_id, progress, worker=worker,
                                          task_id=self.request.id)
    except (Retry, Ignore):
        raise
    except Exception as exc:
        failure_handling.handle(self, job_id, seg_id, worker, exc)
        raise  # handle always raises


@app.task(name=SEGMENT_FAILED_TASK)
def segment_failed(request, exc, traceback) -> None:
    """Errback of every render task: also runs when the task was killed by its hard time
    limit, where the task body's own handler never ran."""
    job_id, seg_id = request.args
    failure_handling.record_final(job_id, seg_id, exc, request.id)


@app.task(bind=True, name=BATCH_TASK)
def render_batch(self, members: list) -> dict:
    """Like segments of several jobs in one batched render (issue #15, item 2; the code is
    farm/tasks/batch_runner.py). ``members``: [job id, segment id, stitch task id] each. A
    failure re-sends each member's job alone (its own chord and retries), never losing one."""
    settings = get_settings()
    worker = self.request.hostname or "local"
    job_ids = [job_id for job_id, _, _ in members]

    def progress(step: int, steps: int) -> None:
        if self.request.is_eager:
            return
        try:  # advisory, as a solo render's
            self.update_state(state=PROGRESS_STATE,
                              meta={"job_ids": job_ids, "step": step, "steps": steps})
        except BROKER_OUTAGE as exc:
            log.warning("batch %s: progress not sent: %s", self.request.id, exc)

    try:
        return batch_runner.run_batch(settings, members, worker, self.request.id, progress)
    except (Retry, Ignore):
        raise
    except Exception as exc:
        log.exception("batch %s of jobs %s failed; each goes on alone", self.request.id, job_ids)
        try:
            batch_runner.fail_batch(settings, members, self.request.id, exc, worker)
        except failure_handling.OUTAGE as outage:  # the reconciler re-sends each job
            failure_handling.abandon(f"batch {self.request.id}", outage)
        raise


@app.task(name=BATCH_FAILED_TASK)
def render_batch_failed(request, exc, traceback) -> None:
    """Errback of a batch task: also runs when it was killed by its hard time limit. Fenced:
    after the task's own handling it finds nothing left to do."""
    (members,) = request.args
    batch_runner.fail_batch(get_settings(), members, request.id, exc, None)


@app.task(bind=True, name=STITCH_TASK, max_retries=None)
def stitch_job(self, segment_results: list, job_id: str) -> dict:
    settings = get_settings()
    try:
        return stitcher.stitch(settings, job_id, chord_id=self.request.id)
    except DATABASE_OUTAGE as exc:
        if self.request.retries >= settings.db_outage_retries:
            failure_handling.abandon(f"job {job_id} stitch", exc)  # the reconciler re-sends it
        log.warning("job %s: database unavailable while stitching; retrying", job_id)
        raise self.retry(exc=exc, countdown=failure_handling.DB_RETRY_COUNTDOWN_S)
    except Exception as exc:
        log.exception("job %s: stitching failed", job_id)
        # Only the job's current stitch fails it (issue #11): a replaced one leaves the job
        # to its successor, and a job that succeeded or was canceled meanwhile stays so.
        stitcher.fail(settings, job_id, exc, self.request.id)
        raise
    finally:
        admit.release_soon(settings)  # the job has left the GPUs


@app.task(name=TICK_TASK)
def tick() -> dict:
    """Celery beat, every FARM_TICK_SECONDS: re-send jobs whose tasks were lost, time out and
    expire jobs (issue #13), open and close batch windows, release what admission allows,
    write finished batches' reports. Each step runs whatever the one before did: a failing
    step is logged and the next tick tries it again."""
    settings = get_settings()
    resent = _step("reconcile", reconcile.reconcile, settings) or []
    swept = _step("timeouts", controls.sweep, settings) or {}
    admitted = _step("batches and admission", batches.tick, settings) or {}
    deadlines = _step("deadlines", deadline_watch.sweep, settings) or {}  # issue #15
    return {"resent": len(resent), **{k: len(v) for k, v in swept.items()}, **admitted,
            **{f"deadline_{k}": len(v) for k, v in deadlines.items()}}


@app.task(name=WEBHOOKS_TASK)
def deliver_webhooks() -> int:
    """Celery beat, every FARM_TICK_SECONDS: send due webhook deliveries (issue #13)."""
    return webhook_delivery.deliver_due(get_settings())


@app.task(name=HOUSEKEEPING_TASK)
def housekeeping() -> dict:
    """Celery beat, every FARM_HOUSEKEEPING_SECONDS: result-cache eviction, then retention
    (expired files, chunks, scratch, idempotency keys, integrity re-hashes), issue #13."""
    settings = get_settings()
    return {"evicted": _step("cache eviction", cache_upkeep.evict, settings),
            "retention": _step("retention", retention.sweep, settings)}


def _step(name: str, run, settings):
    """One step of a beat task; an error is logged with its step and the task goes on."""
    try:
        return run(settings)
    except Exception:
        log.exception("beat step %r failed; the next run tries again", name)
        return None
