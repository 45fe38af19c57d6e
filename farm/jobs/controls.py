"""Job controls (issue #13): retry, hold and release, priority, batch cancel and
retry-failed, and the sweep that fails jobs past their ``timeout_s`` and expires jobs never
admitted within their ``queue_ttl_s``. Each change is a compare-and-set UPDATE (the job
service's helpers) and leaves an event in the job's log (farm.jobs.events).

Retry (a failed, canceled or expired job runs again, in its batch, keeping its log): every
segment not done goes back to pending with its task id, attempts, chunks and error cleared;
done segments keep their chunks when the job is independent, and for a continuous job when
they precede its first segment not done (a later one continued frames that will be rendered
again). The job goes back to queued (waiting while its window is closed) with its task id,
dispatched_at, started_at, finished_at and error cleared. Its queue_ttl_s is counted from
the retry: the time already passed since creation is added to it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select, update

from farm.db.session import session_scope
from farm.db.tables import Batch, Job, JobEvent, JobState, Segment, SegmentState, utcnow
from farm.errors import BatchNotFound, JobNotFound, JobStateConflict
from farm.jobs import admit, events, webhooks
from farm.jobs.service import LIVE_JOB_STATES, RENDER_SHARE, _cas_job, _cas_segment
from farm.jobs.submit import must_wait
from farm.settings import Settings

log = logging.getLogger(__name__)

RETRYABLE = (JobState.failed.value, JobState.canceled.value, JobState.expired.value)
RETRIED_BY_BATCH = (JobState.failed.value, JobState.expired.value)  # not canceled: a choice
NOT_SENT = (JobState.queued.value, JobState.waiting.value)  # with dispatched_at null
SENT = (JobState.queued.value, JobState.running.value, JobState.stitching.value)


def _job(session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


# ---- retry ---------------------------------------------------------------------------------

def _kept(job: Job) -> set[int]:
    """Indexes of the done segments a retry keeps (see the module's docstring)."""
    done = {s.index for s in job.segments if s.state == SegmentState.done.value}
    if not job.continuous:
        return done
    first_not_done = min((s.index for s in job.segments if s.index not in done),
                         default=len(job.segments))
    return {i for i in done if i < first_not_done}


def _still_stopping(job: Job, now: datetime, lease_s: float) -> list[int]:
    """Segments whose task still heartbeats: it has not yet seen the job end. Resetting
    them now would let that task's stop (which fails its segment) land on the new run."""
    return [s.index for s in job.segments if s.state == SegmentState.running.value
            and s.heartbeat_at is not None and now - s.heartbeat_at < timedelta(seconds=lease_s)]


def _retry_in(session, job: Job, now: datetime, lease_s: float, reason: str) -> None:
    """The retry of ``job`` (read in ``session``), by compare-and-set on its state: raises
    JobStateConflict when it is not failed, canceled or expired, or is still stopping."""
    if job.state not in RETRYABLE:
        raise JobStateConflict(job.id, job.state, f"job {job.id} is {job.state}: only a failed, "
                                                  f"canceled or expired job can be retried")
    stopping = _still_stopping(job, now, lease_s)
    if stopping:
        raise JobStateConflict(job.id, job.state, f"job {job.id} is {job.state} but its "
                               f"segment(s) {stopping} are still stopping; retry in a few seconds")
    kept, was = _kept(job), job.state  # the updates below refresh ``job`` in the session
    state = JobState.waiting.value if must_wait(job.route, now) else JobState.queued.value
    # A new run: its TTL counts from now, its retention and integrity stamps, stage times
    # and peak memory start afresh (retention settles it again once it ends).
    if not _cas_job(session, job.id, [was], state=state, celery_id=None,
                    dispatched_at=None, started_at=None, finished_at=None, error=None,
                    queue_ttl_s=_ttl_from(session, job, now), expires_at=None,
                    verified_at=None, stage_times={}, peak_memory_bytes=None,
                    progress=RENDER_SHARE * len(kept) / len(job.segments)):
        raise JobStateConflict(job.id, was, f"job {job.id} changed while being retried")
    for seg in job.segments:  # a segment changed since the read: all rolled back
        if seg.index not in kept and not _cas_segment(
                session, seg.id, [seg.state], Segment.celery_id.is_not_distinct_from(seg.celery_id),
                state=SegmentState.pending.value, celery_id=None, attempts=0, progress=0.0,
                chunk_keys=[], error=None, worker=None, heartbeat_at=None, started_at=None,
                finished_at=None, cached_from=None, preemptions=0, preempt_requested_at=None,
                resume_key=None, resume_sha256=None, resume_step=None, render_batch=None):
            raise JobStateConflict(job.id, was, f"job {job.id}'s segment {seg.index} "
                                   "changed while being retried; try again")
    if job.batch_id:  # its batch reports again once this job ends
        session.execute(update(Batch).where(Batch.id == job.batch_id, Batch.state == "done")
                        .values(state="open", finished_at=None))
    events.add(session, job.id, events.RETRIED,
               f"{reason}: was {was}; segments kept {sorted(kept)}, rendered again "
               f"{sorted(set(range(len(job.segments))) - kept)}")


def _ttl_from(session, job: Job, now: datetime) -> float | None:
    """``queue_ttl_s`` so that the sweep's ``created_at + queue_ttl_s`` falls the job's own
    TTL after this retry: the TTL asked for is what the last run had, counted from its
    start (the creation, or the last retry)."""
    if job.queue_ttl_s is None:
        return None
    last_run = session.scalar(select(func.max(JobEvent.created_at)).where(
        JobEvent.job_id == job.id, JobEvent.kind == events.RETRIED)) or job.created_at
    asked = job.queue_ttl_s - (last_run - job.created_at).total_seconds()
    return asked + (now - job.created_at).total_seconds()


def retry_job(settings: Settings, job_id: str) -> None:
    """A failed, canceled or expired job runs again (see the module's docstring)."""
    with session_scope(settings.database_url) as session:
        _retry_in(session, _job(session, job_id), utcnow(), settings.lease_s, "retried")
    log.info("job %s retried", job_id)
    admit.release_soon(settings)


# ---- hold, release, priority ---------------------------------------------------------------

def change_queued(settings: Settings, job_id: str, held: bool | None = None,
                  priority: int | None = None) -> None:
    """Hold, release or re-prioritise a job not yet sent to the GPUs (queued or waiting,
    dispatched_at null); JobStateConflict naming its state otherwise. Under admission's
    lock: a release deciding meanwhile sees the job before or after, never half-changed."""
    values = {k: v for k, v in (("held", held), ("priority", priority)) if v is not None}
    with admit.locked_session(settings.database_url) as session:
        job = _job(session, job_id)
        before = (job.held, job.priority)
        if not _cas_job(session, job_id, NOT_SENT, Job.dispatched_at.is_(None), **values):
            sent = (" and already sent to its tier's queue"
                    if job.state in NOT_SENT and job.dispatched_at else "")
            raise JobStateConflict(job_id, job.state, f"job {job_id} is {job.state}{sent}: "
                                   "hold and priority change only while it waits for admission")
        if held is not None and held != before[0]:
            events.add(session, job_id, events.HELD if held else events.RELEASED,
                       "held: admission passes it over" if held else "given back to admission")
        if priority is not None and priority != before[1]:
            events.add(session, job_id, events.PRIORITY_CHANGED, f"{before[1]} -> {priority}")
    if not held:  # released, or moved up: it may be admitted now
        admit.release_soon(settings)


# ---- batches ------------------------------------------------------------------------------

def _batch(session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


def cancel_batch(settings: Settings, batch_id: str) -> list[str]:
    """Every live job of the batch -> canceled (one UPDATE through the batch_id index);
    returns their ids."""
    with session_scope(settings.database_url) as session:
        _batch(session, batch_id)
        canceled = list(session.scalars(
            update(Job).where(Job.batch_id == batch_id, Job.state.in_(LIVE_JOB_STATES))
            .values(state=JobState.canceled.value, finished_at=utcnow(), updated_at=utcnow())
            .returning(Job.id)))
        for job_id in canceled:
            events.add(session, job_id, events.CANCELED, f"batch {batch_id} canceled")
            webhooks.job_ended(session, job_id)  # its outbox row (farm.jobs.webhooks)
    log.info("batch %s: %d job(s) canceled", batch_id, len(canceled))
    if canceled:
        admit.release_soon(settings)  # the GPUs they held
    return canceled


def retry_failed(settings: Settings, batch_id: str) -> tuple[list[str], dict[str, str]]:
    """Retry the batch's failed and expired jobs (not canceled ones: a person chose that);
    -> (retried ids, {id: why not} for those still stopping)."""
    retried, skipped, now = [], {}, utcnow()
    with session_scope(settings.database_url) as session:
        _batch(session, batch_id)
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id,
                                                        Job.state.in_(RETRIED_BY_BATCH))))
    for job_id in ids:
        try:
            with session_scope(settings.database_url) as session:
                _retry_in(session, _job(session, job_id), now, settings.lease_s,
                          f"batch {batch_id} retry-failed")
            retried.append(job_id)
        except JobStateConflict as exc:
            skipped[job_id] = str(exc)
    if retried:
        admit.release_soon(settings)
    return retried, skipped


# ---- the sweep: timeout_s and queue_ttl_s, on every beat tick -------------------------------

def sweep(settings: Settings, now: datetime | None = None) -> dict[str, list[str]]:
    """Fail live jobs sent to the GPUs more than ``timeout_s`` ago (error "timeout: ...";
    their chunks and log are kept; their tasks see the job ended and stop, as on a cancel)
    and expire jobs never sent within ``queue_ttl_s`` of creation. The candidates are read
    through the index on ``jobs.state`` (live jobs only, with the column set, never the
    finished history); each change is a compare-and-set on the state and ``dispatched_at``
    read, so a job that finishes, or is admitted, at the same moment wins."""
    now = now or utcnow()
    with session_scope(settings.database_url) as session:
        timed = session.execute(timeout_candidates()).all()
        ttl = session.execute(ttl_candidates()).all()
    timed_out = [r.id for r in timed
                 if r.dispatched_at + timedelta(seconds=r.timeout_s) <= now
                 and _end(settings, r.id, r.state, Job.dispatched_at == r.dispatched_at,
                          JobState.failed, events.TIMED_OUT,
                          f"timeout: not finished within timeout_s={r.timeout_s:g} s of "
                          f"admission ({r.dispatched_at:%Y-%m-%d %H:%M:%S} UTC)", now)]
    expired = [r.id for r in ttl
               if r.created_at + timedelta(seconds=r.queue_ttl_s) <= now
               and _end(settings, r.id, r.state, NEVER_STARTED, JobState.expired,
                        events.EXPIRED, f"expired: not admitted within queue_ttl_s="
                                        f"{r.queue_ttl_s:g} s", now)]
    if timed_out:
        log.warning("jobs timed out: %s", ", ".join(timed_out))
        admit.release_soon(settings)  # their GPUs go to the next jobs
    if expired:
        log.info("jobs expired in the queue: %s", ", ".join(expired))
    return {"timed_out": timed_out, "expired": expired}


def timeout_candidates():
    """Live jobs sent to the GPUs with a timeout_s (the sweep compares the times)."""
    return (select(Job.id, Job.state, Job.timeout_s, Job.dispatched_at)
            .where(Job.state.in_(SENT), Job.timeout_s.is_not(None),
                   Job.dispatched_at.is_not(None)))


NEVER_STARTED = and_(Job.dispatched_at.is_(None), Job.started_at.is_(None))


def ttl_candidates():
    """Jobs never yet started with a queue_ttl_s (a job a preemption sent back to the queue,
    issue #15, was admitted once: its TTL is spent)."""
    return (select(Job.id, Job.state, Job.queue_ttl_s, Job.created_at)
            .where(Job.state.in_(NOT_SENT), Job.queue_ttl_s.is_not(None),
                   Job.dispatched_at.is_(None), Job.started_at.is_(None)))


def _end(settings: Settings, job_id: str, state: str, condition, to: JobState, kind: str,
         error: str, now: datetime) -> bool:
    with session_scope(settings.database_url) as session:
        if not _cas_job(session, job_id, [state], condition, state=to.value, error=error,
                        finished_at=now):
            return False
        events.add(session, job_id, kind, error)
    return True


# ---- where a job stands: queue_position and eta_s (GET /v1/jobs/{id}) ----------------------

def queue_estimate(db_url: str, job: Job, now: datetime | None = None
                   ) -> tuple[int | None, float | None]:
    """-> (queue_position, eta_s). Only a queued job not yet sent and not held has a
    position: 1 + the queued, unsent, unheld jobs of its tier ahead of it in admission order
    (priority desc, then created_at asc), counted in one query through the index on
    ``jobs.state``. eta_s, in seconds until the job should finish, from the route's
    ``est_seconds`` (E, render time once on the GPUs):
      waiting for admission:  E + W / P, W = sum of E over those jobs ahead, P = the tier's
                              pool members (farm.jobs.admit.pool_size): they share them;
      sent, not yet started:  E;
      running or stitching:   max(0, E - seconds since started);
    None when held, waiting for a window, ended, or the route has no estimate. A lower
    bound: the work already on the GPUs is not counted."""
    now = now or utcnow()
    est = (job.route or {}).get("est_seconds")
    if job.state in (JobState.running.value, JobState.stitching.value):
        if est is None:
            return None, None
        since = (now - (job.started_at or job.dispatched_at or now)).total_seconds()
        return None, max(0.0, est - since)
    if job.state != JobState.queued.value or job.held:
        return None, None
    if job.dispatched_at is not None:
        return None, est
    ahead_count, ahead_s = _ahead(db_url, job)
    if est is None:
        return ahead_count + 1, None
    return ahead_count + 1, est + ahead_s / max(1, admit.pool_size(job.route))


def ahead_query(job: Job):
    """(jobs, est_seconds summed) queued, unsent and unheld before ``job`` on its tier."""
    before = ((Job.priority > job.priority)
              | ((Job.priority == job.priority) & (Job.created_at < job.created_at)))
    return (select(func.count(), func.coalesce(func.sum(Job.route["est_seconds"].as_float()), 0.0))
            .where(Job.state == JobState.queued.value, Job.dispatched_at.is_(None),
                   Job.held.is_(False), Job.tier == job.route["tier"],
                   before))


def _ahead(db_url: str, job: Job) -> tuple[int, float]:
    with session_scope(db_url) as session:
        count, seconds = session.execute(ahead_query(job)).one()
    return count, float(seconds)
