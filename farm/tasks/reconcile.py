"""The reconciler: a job that was sent to Celery but has no live task is sent again (#6).

A job can lose its task in several ways: the process that claimed it died before sending,
Redis restarted and dropped its queues (and the chord's counter), the Celery worker running
a segment was killed (its message waits in Redis' unacked set until the visibility
timeout, hours away), or a stitch task died. Every beat tick, under admission's lock, a job
is stranded when it was sent more than ``lease_s`` ago and
- none of its segments' tasks has heartbeaten (farm.tasks.segment_runner) within ``lease_s``,
- it is not stitching with a stitch heartbeat within ``lease_s``,
- and none of its current task ids is still waiting in the broker's queues.
A stranded job is sent again with new task ids: tasks of the earlier send are fenced off
(farm.jobs.service: only a segment's current task may start, report or finish it), so a late
redelivery does nothing. Marking it is a compare-and-set on what was read (issue #11): a
finish, a heartbeat, a stitch success or a cancel that lands in between wins. A segment whose worker vanished counts as a failure of that
worker (farm.tasks.failure_policy), and fails for good after as many different workers as any failure.

At fleet scale (issue #14, item 5) a tick reads only candidates: jobs sent before the lease
with no heartbeat since, filtered in SQL through indexes; the broker's queues (which hold
admitted work only, bounded by the GPUs) are read only on a tick that found a candidate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, text, union_all
from sqlalchemy.orm import selectinload

from farm.jobs import events, service as jobs
from farm.jobs.admit import locked_session
from farm.jobs.admit_queries import state_in
from farm.db.tables import Job, JobState, Segment, SegmentState, utcnow
from farm.db.session import DATABASE_OUTAGE, get_engine, session_scope
from farm.tasks.failure_policy import exhausted, segment_errors
from farm.settings import Settings, is_redis_url

log = logging.getLogger(__name__)

SENT_STATES = (JobState.queued.value, JobState.running.value, JobState.stitching.value)


class _OutageWatch:
    """After a database outage this process saw, heartbeats written by live tasks (which
    could not be written during it) get one lease to catch up before any job is judged
    stranded. A restart seen by another process is caught by PostgreSQL's own start time."""

    def __init__(self):
        self.down, self.back_at = False, None

    def saw_outage(self) -> None:
        self.down = True

    def catching_up(self, session, now: datetime, lease: timedelta) -> bool:
        if self.down:
            self.down, self.back_at = False, now
        if self.back_at is not None and now - self.back_at < lease:
            return True
        if session.get_bind().dialect.name != "postgresql":
            return False
        started = session.scalar(text("SELECT pg_postmaster_start_time()"))
        return now - started < lease


_OUTAGE = _OutageWatch()


@dataclass
class Resend:
    job_id: str
    lost: list[tuple[int, str | None]]  # (segment index, worker) of segments whose worker vanished


def _alive(job: Job, since: datetime) -> bool:
    if job.state == JobState.stitching.value:
        return job.updated_at >= since
    return any(s.state == SegmentState.running.value and s.heartbeat_at is not None
               and s.heartbeat_at >= since for s in job.segments)


def _task_ids(job: Job) -> set[str]:
    ids = {s.celery_id for s in job.segments
           if s.state in (SegmentState.pending.value, SegmentState.running.value)}
    return {i for i in ids | {job.celery_id} if i}


def candidate_ids(since: datetime):
    """Ids of jobs sent before ``since`` with no heartbeat since: a stitching job's own, else a
    running segment's. Filtered in SQL (issue #14) through two partial indexes, over jobs
    in flight (ix_jobs_in_flight) and running segments (ix_segments_beating): never the
    finished history nor the waiting queue."""
    beating = (select(Segment.id)
               .where(Segment.job_id == Job.id, Segment.heartbeat_at >= since,
                      state_in([SegmentState.running.value], Segment.state)).exists())
    sent_before = (Job.dispatched_at.is_not(None), Job.dispatched_at < since)
    rendering = select(Job.id).where(state_in(SENT_STATES[:2]), *sent_before, ~beating)
    stitching = select(Job.id).where(state_in(SENT_STATES[2:]), *sent_before,
                                     Job.updated_at < since)
    return union_all(rendering, stitching)


def candidates_query(since: datetime):
    return select(Job).where(Job.id.in_(candidate_ids(since)))


def has_candidates(session, now: datetime, lease_s: float) -> bool:
    since = now - timedelta(seconds=lease_s)
    ids = candidate_ids(since).subquery()
    return session.scalar(select(ids.c.id).limit(1)) is not None


def stranded_jobs(session, now: datetime, lease_s: float, in_broker: set[str] | None) -> list[Job]:
    """Jobs sent over ``lease_s`` ago with no sign of life. ``in_broker``: the task ids
    waiting in the broker's queues (None: unknown; then only heartbeats count)."""
    since = now - timedelta(seconds=lease_s)
    rows = session.scalars(candidates_query(since).options(selectinload(Job.segments))).all()
    return [job for job in rows
            if not _alive(job, since) and not (in_broker and _task_ids(job) & in_broker)]


def _mark_for_resend(session, job: Job, now: datetime) -> Resend | None:
    """The job made ready to send again by compare-and-set on what ``stranded_jobs`` read
    (farm.jobs.service.mark_resent); None when a finish, stitch success, cancel or
    heartbeat landed meanwhile (issue #11: it must not be overwritten)."""
    running = jobs.mark_resent(session, job, now)
    if running is None:
        log.info("job %s changed since it was read; not re-sent", job.id)
        return None
    lost = []
    for seg in running:
        lost.append((seg.index, seg.worker))
        events.add(session, job.id, events.SEGMENT_LOST,
                   f"worker {seg.worker} stopped heartbeating (last at {seg.heartbeat_at:%H:%M:%S})"
                   if seg.heartbeat_at else f"worker {seg.worker} never heartbeat",
                   seg.index, seg.worker)
    events.add(session, job.id, events.RESENT,
               f"no live task for {len(lost)} running segment(s)" if lost else "its task was lost")
    return Resend(job.id, lost)


def reconcile(settings: Settings, enqueue=None, now: datetime | None = None) -> list[str]:
    """Send every stranded job again; returns their ids. A job whose lost segment has now
    failed on ``segment_failure_workers`` workers fails instead, with the errors."""
    if enqueue is None:
        from farm.jobs.dispatch import enqueue_job as enqueue
    db, now = settings.database_url, now or utcnow()
    try:  # the broker is read only when some job lacks a heartbeat (issue #14)
        with session_scope(db) as session:
            if not has_candidates(session, now, settings.lease_s):
                return []
    except DATABASE_OUTAGE as exc:
        _OUTAGE.saw_outage()
        log.warning("reconciler skipped: database unavailable (%s)", type(exc).__name__)
        return []
    try:  # before the jobs are read again: a task a worker takes meanwhile beats by then
        in_broker = broker_task_ids(settings.broker_url)
    except Exception as exc:  # nothing can be sent either; the next tick looks again
        log.warning("reconciler skipped: the broker's queues cannot be read: %s", exc)
        return []
    try:
        with locked_session(db) as session:
            if _OUTAGE.catching_up(session, now, timedelta(seconds=settings.lease_s)):
                return []
            marked = [resend for job in stranded_jobs(session, now, settings.lease_s, in_broker)
                      if (resend := _mark_for_resend(session, job, now)) is not None]
    except DATABASE_OUTAGE as exc:
        _OUTAGE.saw_outage()
        log.warning("reconciler skipped: database unavailable (%s)", type(exc).__name__)
        return []
    sent = []
    for resend in marked:
        if _fail_if_exhausted(settings, resend):
            continue
        try:
            enqueue(jobs.get_job(db, resend.job_id))
        except Exception:  # its dispatched_at is now: the tick after the lease tries again
            log.exception("job %s: re-sending failed", resend.job_id)
            continue
        log.warning("job %s had no live task; sent again (lost segments: %s)", resend.job_id,
                    resend.lost or "none")
        sent.append(resend.job_id)
    return sent


def _fail_if_exhausted(settings: Settings, resend: Resend) -> bool:
    db = settings.database_url
    evs = events.failures(db, resend.job_id)
    for index, _worker in resend.lost:
        why = exhausted(evs, index, settings.segment_failure_workers)
        if why:
            message = f"{why}:\n{segment_errors(evs, index)}"
            if jobs.fail_job(db, resend.job_id, message):
                events.record(db, resend.job_id, events.JOB_FAILED, message, index)
            return True
    return False


# ---- what the broker still holds ------------------------------------------------------------

def broker_task_ids(broker_url: str) -> set[str] | None:
    """Ids of the tasks waiting in the broker's queues (not those a worker has taken);
    None for a broker this cannot read. Raises when the broker is unreachable."""
    if is_redis_url(broker_url):
        return _redis_task_ids(broker_url)
    if broker_url.startswith("sqla+"):
        return _sqla_task_ids(broker_url.removeprefix("sqla+"))
    return None


def _task_id(payload: bytes | str) -> str | None:
    try:
        return json.loads(payload)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None


def _redis_task_ids(url: str) -> set[str]:
    import redis

    client = redis.Redis.from_url(url)
    ids: set[str] = set()
    for key in client.scan_iter(match="*", count=500, _type="list"):
        # A worker's own queue (worker_direct) keeps a message while the worker is gone, and
        # kombu's dead letters keep one for ever: neither is a task on its way.
        if key.startswith((b"_kombu", b"unacked", b"ae.undeliver")) or b".dq2" in key:
            continue
        ids.update(filter(None, map(_task_id, client.lrange(key, 0, -1))))
    return ids


def _sqla_task_ids(url: str) -> set[str]:
    from sqlalchemy import inspect

    if "kombu_message" not in inspect(get_engine(url)).get_table_names():
        return set()  # nothing was ever sent
    with get_engine(url).connect() as conn:
        rows = conn.execute(text("SELECT payload FROM kombu_message WHERE visible")).all()
    return set(filter(None, (_task_id(r[0]) for r in rows)))
