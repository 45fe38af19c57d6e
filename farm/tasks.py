"""Celery tasks: a chord per job, `render_segment` on the tier's queue, `stitch_job` after.

Failures are logged with the job and segment, recorded in the job's event log, and
re-raised. A failed segment is retried on another worker until the failure policy
(farm.failures) says it has failed for good; FarmErrors that are not ``retryable`` fail it
at once. While the database is unreachable a task waits and tries again, recording nothing.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore, Retry
from celery.utils import worker_direct

from farm import admission, batches, events, failures, jobs, reconcile, segment_runner, stitcher
from farm.celery_app import BROKER_OUTAGE, TICK_TASK, app
from farm.db.session import DATABASE_OUTAGE
from farm.dispatch import RENDER_TASK, SEGMENT_FAILED_TASK, STITCH_TASK
from farm.errors import FarmError, SegmentFailed
from farm.settings import get_settings

log = logging.getLogger(__name__)

PROGRESS_STATE = "RENDERING"  # custom task state, shown by Flower
DB_RETRY_COUNTDOWN_S = 3


def _record_failure(job_id: str, seg_id: int, exc: BaseException) -> None:
    """The segment and its job fail; the job's error names the segment."""
    db = get_settings().database_url
    if isinstance(exc, SegmentFailed):
        message = str(exc)  # "segment N failed on ...", with every failure
    else:
        index = next(s.index for s in jobs.get_job(db, job_id).segments if s.id == seg_id)
        message = f"segment {index}: {type(exc).__name__}: {exc}"
    jobs.fail_segment(db, seg_id, message)
    if jobs.fail_job(db, job_id, message):
        events.record(db, job_id, events.JOB_FAILED, message)
        admission.release_soon(get_settings())  # its GPUs are free for the next job


def _route_to(worker: str | None, queue: str) -> dict:
    """apply_async options: one worker's own queue (Celery's worker_direct), else the tier's."""
    if worker is None:
        return {"queue": queue, "exchange": queue, "routing_key": queue}
    direct = worker_direct(worker)
    return {"queue": direct.name, "exchange": direct.exchange.name, "routing_key": worker}


def _hand_on_if_blocklisted(task, job_id: str, seg_id: int, worker: str) -> None:
    """A worker blocklisted for this job passes the segment to one that is not (or back to
    the queue when it cannot tell who serves it), or fails it for good when no such worker
    serves the queue, or when it has been handed on MAX_HAND_ONS times."""
    settings = get_settings()
    db = settings.database_url
    evs = events.failures(db, job_id)
    if worker not in failures.blocklisted(evs, settings.blocklist_after):
        return
    job = jobs.get_job(db, job_id)
    index = next(s.index for s in job.segments if s.id == seg_id)
    queue = job.route["queue"]
    serving = failures.serving_workers(app, queue, worker, settings.control_timeout_s)
    target, why = failures.pick_worker(evs, index, worker, queue, serving,
                                       settings.blocklist_after)
    handed_on = events.count(db, job_id, events.SEGMENT_HANDED_ON, index)
    if why is None and handed_on >= failures.MAX_HAND_ONS:
        why = f"handed on {handed_on} times by workers blocklisted for it; no other took it"
    if why is not None:
        raise SegmentFailed(f"segment {index} cannot run: {why}:\n"
                            f"{failures.segment_errors(evs, index)}")
    events.record(db, job_id, events.SEGMENT_HANDED_ON, f"{worker} is blocklisted for this "
                  f"job; sent to {target or queue}", index, worker)
    raise task.retry(countdown=0 if target else settings.retry_countdown_s, max_retries=None,
                     **_route_to(target, queue))


def _after_failure(task, job_id: str, seg_id: int, worker: str, exc: Exception) -> None:
    """Record the failure; retry the segment elsewhere, or raise SegmentFailed."""
    settings = get_settings()
    db = settings.database_url
    job = jobs.get_job(db, job_id)
    index = next(s.index for s in job.segments if s.id == seg_id)
    events.record(db, job_id, events.SEGMENT_FAILED, f"{type(exc).__name__}: {exc}", index, worker)
    evs = events.failures(db, job_id)
    queue = job.route["queue"]
    serving = failures.serving_workers(app, queue, worker, settings.control_timeout_s)
    decision = failures.decide(evs, index, worker, queue, serving, settings.blocklist_after,
                               settings.segment_failure_workers)
    if decision.newly_blocklisted:
        events.record(db, job_id, events.BLOCKLISTED,
                      f"{worker} failed this job {settings.blocklist_after} times", index, worker)
        log.warning("job %s: worker %s blocklisted", job_id, worker)
    if decision.final:
        raise SegmentFailed(f"{decision.final}:\n{failures.segment_errors(evs, index)}")
    jobs.beat_segment(db, seg_id, task.request.id)  # alive while the retry is on its way
    log.warning("job %s segment %d failed on %s (%s); retry on %s", job_id, index, worker, exc,
                decision.target or queue)
    raise task.retry(exc=exc, countdown=settings.retry_countdown_s, max_retries=None,
                     **_route_to(decision.target, queue))


@app.task(bind=True, name=RENDER_TASK)
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
        _hand_on_if_blocklisted(self, job_id, seg_id, worker)
        return segment_runner.run_segment(settings, job_id, seg_id, progress, worker=worker,
                                          task_id=self.request.id)
    except Retry:
        raise
    except DATABASE_OUTAGE as exc:  # nothing can be recorded; the reconciler is the backstop
        log.warning("job %s segment %s: database unavailable (%s); retrying", job_id, seg_id,
                    type(exc).__name__)
        raise self.retry(exc=exc, countdown=DB_RETRY_COUNTDOWN_S,
                         max_retries=settings.db_outage_retries)
    except Exception as exc:
        try:
            if isinstance(exc, BROKER_OUTAGE) or (isinstance(exc, FarmError)
                                                  and not exc.retryable):
                raise
            _after_failure(self, job_id, seg_id, worker, exc)
        except Retry:
            raise
        except BROKER_OUTAGE + DATABASE_OUTAGE as outage:
            _abandon(job_id, seg_id, outage)
        except Exception as final:
            log.exception("job %s segment %s failed for good", job_id, seg_id)
            _record_failure(job_id, seg_id, final)
            raise final from exc


def _abandon(job_id: str, seg_id: int, outage: Exception) -> None:
    """The broker or database went away while a failure was being handled: nothing can be
    recorded or sent. The task ends as ignored (no result, no errback, not counted by the
    chord); its segment's heartbeat stops, and the reconciler sends the job again."""
    log.warning("job %s segment %s abandoned, %s unavailable: %s; the reconciler re-sends "
                "it", job_id, seg_id, "broker" if isinstance(outage, BROKER_OUTAGE)
                else "database", outage)
    raise Ignore() from outage


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
        return stitcher.stitch(settings, job_id, chord_id=self.request.id)
    except DATABASE_OUTAGE as exc:
        log.warning("job %s: database unavailable while stitching; retrying", job_id)
        raise self.retry(exc=exc, countdown=DB_RETRY_COUNTDOWN_S,
                         max_retries=settings.db_outage_retries)
    except Exception as exc:
        log.exception("job %s: stitching failed", job_id)
        jobs.fail_job(settings.database_url, job_id, f"stitch: {type(exc).__name__}: {exc}")
        raise
    finally:
        admission.release_soon(settings)  # the job has left the GPUs


@app.task(name=TICK_TASK)
def tick() -> dict:
    """Celery beat, every FARM_TICK_SECONDS: re-send jobs whose tasks were lost, open and
    close batch windows, release what admission allows, write finished batches' reports."""
    settings = get_settings()
    resent = reconcile.reconcile(settings)
    return {"resent": len(resent), **batches.tick(settings)}
