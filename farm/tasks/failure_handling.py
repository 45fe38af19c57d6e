"""What a render task does when its segment fails (issue #6): retry it elsewhere, wait out
a database outage, leave it to the reconciler, or fail it for good.

`handle` is called with any exception of `render_segment` and always raises: Celery's
Retry (the task runs again), Ignore (abandoned: no result, no errback, not counted by the
chord; the reconciler re-sends the job once its heartbeat is stale) or the final error,
after the segment and job are failed. The policy itself is in farm.tasks.failure_policy.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore, Reject, Retry
from celery.utils import worker_direct

from farm.jobs import admit, events, service as jobs
from farm.tasks import failure_policy
from farm.celery_app import BROKER_OUTAGE, app
from farm.db.session import DATABASE_OUTAGE, session_scope
from farm.errors import FarmError, SegmentFailed
from farm.tasks.group_leases import NoGroupFree
from farm.settings import get_settings

log = logging.getLogger(__name__)

DB_RETRY_COUNTDOWN_S = 3
# A retry that cannot be published (the broker is down) raises Reject.
OUTAGE = BROKER_OUTAGE + DATABASE_OUTAGE + (Reject,)


def segment_index(job, seg_id: int) -> int:
    return next(s.index for s in job.segments if s.id == seg_id)


def route_to(worker: str | None, queue: str) -> dict:
    """apply_async options: one worker's own queue (Celery's worker_direct), else the tier's."""
    if worker is None:
        return {"queue": queue, "exchange": queue, "routing_key": queue}
    direct = worker_direct(worker)
    return {"queue": direct.name, "exchange": direct.exchange.name, "routing_key": worker}


def handle(task, job_id: str, seg_id: int, worker: str, exc: Exception) -> None:
    subject = f"job {job_id} segment id {seg_id}"
    # A group's failure (its actor died, a rank failed) counts against the group, so the
    # retry leases another one; other failures against this Celery worker (issue #11).
    worker = getattr(exc, "where", None) or worker
    if isinstance(exc, NoGroupFree):  # it waited its turn and failed at nothing: no record
        _wait_again(task, job_id, exc)
    if task.request.is_eager:  # one process (`farm render`): no other worker, no reconciler
        _fail_for_good(task, job_id, seg_id, exc)
    try:
        if isinstance(exc, DATABASE_OUTAGE):
            _wait_for_database(task, subject, exc)
        if isinstance(exc, OUTAGE) or (isinstance(exc, FarmError) and not exc.retryable):
            raise exc
        if not jobs.owns_segment(get_settings().database_url, seg_id, task.request.id):
            raise exc  # a replaced task's failure: record_final leaves the job alone
        _retry_elsewhere(task, job_id, seg_id, worker, exc)
    except (Retry, Ignore):
        raise
    except OUTAGE as outage:
        abandon(subject, outage)
    except Exception as final:
        _fail_for_good(task, job_id, seg_id, final)


def _wait_again(task, job_id: str, exc: Exception) -> None:
    settings = get_settings()
    queue = jobs.get_job(settings.database_url, job_id).route["queue"]
    log.warning("job %s: %s; back to queue %s", job_id, exc, queue)
    raise task.retry(exc=exc, countdown=settings.retry_countdown_s, **route_to(None, queue))


def _fail_for_good(task, job_id: str, seg_id: int, exc: Exception) -> None:
    log.error("job %s segment id %s failed for good: %s: %s", job_id, seg_id,
              type(exc).__name__, exc, exc_info=exc)
    record_final(job_id, seg_id, exc, task.request.id)
    raise exc


def _wait_for_database(task, subject: str, exc: Exception) -> None:
    """Nothing can be recorded: try again in a few seconds, for a while, then abandon."""
    if task.request.retries >= get_settings().db_outage_retries:
        abandon(subject, exc)
    log.warning("%s: database unavailable (%s); retrying", subject, type(exc).__name__)
    raise task.retry(exc=exc, countdown=DB_RETRY_COUNTDOWN_S)


def abandon(subject: str, outage: BaseException) -> None:
    what = "database" if isinstance(outage, DATABASE_OUTAGE) else "broker"
    log.warning("%s abandoned, %s unavailable: %s; the reconciler re-sends it", subject,
                what, outage)
    raise Ignore() from outage


def _retry_elsewhere(task, job_id: str, seg_id: int, worker: str, exc: Exception) -> None:
    """Record the failure; retry the segment on another worker, or raise SegmentFailed."""
    settings = get_settings()
    db = settings.database_url
    job = jobs.get_job(db, job_id)
    index = segment_index(job, seg_id)
    events.record(db, job_id, events.SEGMENT_FAILED, f"{type(exc).__name__}: {exc}", index, worker)
    evs = events.failures(db, job_id)
    queue = job.route["queue"]
    # A group's failure: back to the tier's queue, any worker will do (the lease avoids the
    # group); a worker's failure: to another worker's own queue.
    serving = (None if getattr(exc, "where", None) else
               failure_policy.serving_workers(app, queue, worker, settings.control_timeout_s))
    decision = failure_policy.decide(evs, index, worker, queue, serving, settings.blocklist_after,
                               settings.segment_failure_workers)
    if decision.newly_blocklisted:
        events.record(db, job_id, events.BLOCKLISTED,
                      f"{worker} failed this job {settings.blocklist_after} times", index, worker)
        log.warning("job %s: worker %s blocklisted", job_id, worker)
    if decision.final:
        raise SegmentFailed(f"{decision.final}:\n{failure_policy.segment_errors(evs, index)}")
    jobs.beat_segment(db, seg_id, task.request.id)  # alive while the retry is on its way
    log.warning("job %s segment %d failed on %s (%s); retry on %s", job_id, index, worker, exc,
                decision.target or queue)
    raise task.retry(exc=exc, countdown=settings.retry_countdown_s,
                     **route_to(decision.target, queue))


def hand_on_if_blocklisted(task, job_id: str, seg_id: int, worker: str) -> None:
    """A worker blocklisted for this job passes the segment to one that is not (or back to
    the queue when it cannot tell who serves it), or fails it for good when no such worker
    serves the queue, or when it has been handed on MAX_HAND_ONS times."""
    settings = get_settings()
    db = settings.database_url
    evs = events.failures(db, job_id)
    if worker not in failure_policy.blocklisted(evs, settings.blocklist_after):
        return
    job = jobs.get_job(db, job_id)
    index, queue = segment_index(job, seg_id), job.route["queue"]
    serving = failure_policy.serving_workers(app, queue, worker, settings.control_timeout_s)
    target, why = failure_policy.pick_worker(evs, index, worker, queue, serving,
                                       settings.blocklist_after)
    handed_on = events.count(db, job_id, events.SEGMENT_HANDED_ON, index)
    if why is None and handed_on >= failure_policy.MAX_HAND_ONS:
        why = f"handed on {handed_on} times by workers blocklisted for it; no other took it"
    if why is not None:
        raise SegmentFailed(f"segment {index} cannot run: {why}:\n"
                            f"{failure_policy.segment_errors(evs, index)}")
    events.record(db, job_id, events.SEGMENT_HANDED_ON, f"{worker} is blocklisted for this "
                  f"job; sent to {target or queue}", index, worker)
    raise task.retry(countdown=0 if target else settings.retry_countdown_s,
                     **route_to(target, queue))


def record_final(job_id: str, seg_id: int, exc: BaseException, task_id: str | None) -> None:
    """The segment and its job fail, with the error naming the segment; but only by the
    segment's current task, while the segment is pending or running and the job live, in
    one compare-and-set transaction (farm.jobs.service.fail_for_task, issue #11): a task the
    reconciler replaced must not fail a healthy re-run, nor a late errback a job that
    finished, stitched or was canceled meanwhile."""
    settings = get_settings()
    db = settings.database_url
    if isinstance(exc, SegmentFailed):
        message = str(exc)  # "segment N failed on ...", with every failure
    else:
        index = segment_index(jobs.get_job(db, job_id), seg_id)
        message = f"segment {index}: {type(exc).__name__}: {exc}"
    with session_scope(db) as session:
        failed = jobs.fail_for_task(session, job_id, seg_id, message, task_id)
        if failed:
            events.add(session, job_id, events.JOB_FAILED, message)
    if not failed:  # the errback after the task's own handler lands here too
        log.info("job %s segment %s: %s (%s) changes nothing: the task was replaced, or "
                 "the segment or job ended first", job_id, seg_id, type(exc).__name__, exc)
        return
    log.error("job %s failed: %s", job_id, message)
    admit.release_soon(settings)  # its GPUs are free for the next job
