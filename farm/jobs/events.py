"""A job's event log (table ``job_events``): what happened to it and on which worker.

It is the job's log for people (`GET /v1/jobs/{id}/events`, `farm logs`), kept whatever
the job's end, and the record the failure policy counts (farm.tasks.failure_policy): a segment's
failures by worker, and the workers blocklisted for a job.
"""

from __future__ import annotations

import logging
from collections import Counter

from sqlalchemy import func, select

from farm.db.tables import JobEvent
from farm.db.session import session_scope

log = logging.getLogger(__name__)

# Kinds of event. SEGMENT_FAILED and SEGMENT_LOST count as failures of their worker.
RESENT = "resent"  # the reconciler sent the job again (its task was lost)
SEGMENT_STARTED = "segment_started"
SEGMENT_DONE = "segment_done"
SEGMENT_RENDERED = "segment_rendered"  # which group rendered it, from when to when
SEGMENT_FAILED = "segment_failed"  # an attempt raised
SEGMENT_LOST = "segment_lost"  # its worker stopped heartbeating mid-segment
SEGMENT_HANDED_ON = "segment_handed_on"  # a blocklisted worker passed it to another
BLOCKLISTED = "blocklisted"  # a worker will not run this job's segments again
JOB_FAILED = "job_failed"
# Job controls (farm.jobs.controls, issue #13): what a person or the timeout sweep did.
CANCELED = "canceled"
RETRIED = "retried"  # failures before it no longer count (farm.tasks.failure_policy)
HELD = "held"
RELEASED = "released"  # a held job given back to admission
PRIORITY_CHANGED = "priority_changed"
TIMED_OUT = "timed_out"
EXPIRED = "expired"
CACHE_HIT = "cache_hit"  # answered (or some segments) from the result cache, issue #13
# Preemption at a step boundary (issue #15, item 1): admission asked a running segment to
# yield to a more urgent job; it yielded its group with its state saved; it resumed from
# that state (or, the state unusable, started from noise).
PREEMPT_REQUESTED = "preempt_requested"
PREEMPTED = "preempted"
RESUMED = "resumed"
RESUME_DISCARDED = "resume_discarded"
# Deadlines (issue #15, item 3, farm.jobs.deadline_watch): the estimate says the job will
# miss its deadline; the deadline passed with the job not done.
DEADLINE_AT_RISK = "deadline_at_risk"
DEADLINE_MISSED = "deadline_missed"
FAILURE_KINDS = (SEGMENT_FAILED, SEGMENT_LOST)


def add(session, job_id: str, kind: str, message: str = "", segment_index: int | None = None,
        worker: str | None = None) -> None:
    """Add an event inside the caller's transaction."""
    session.add(JobEvent(job_id=job_id, kind=kind, message=message[:4000],
                         segment_index=segment_index, worker=worker))


def record(db_url: str, job_id: str, kind: str, message: str = "",
           segment_index: int | None = None, worker: str | None = None) -> None:
    """Add an event in a transaction of its own."""
    with session_scope(db_url) as session:
        add(session, job_id, kind, message, segment_index, worker)


def list_events(db_url: str, job_id: str) -> list[JobEvent]:
    with session_scope(db_url) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                    .order_by(JobEvent.id)))


def _since_retry(job_id: str):
    """SQL condition: the event came after the job's last retry (issue #13): a retried job
    starts with a clean slate for the failure policy; the log itself keeps everything."""
    last = (select(func.coalesce(func.max(JobEvent.id), 0))
            .where(JobEvent.job_id == job_id, JobEvent.kind == RETRIED).scalar_subquery())
    return JobEvent.id > last


def failures(db_url: str, job_id: str) -> list[JobEvent]:
    """The job's failure events since its last retry, oldest first."""
    with session_scope(db_url) as session:
        return list(session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind.in_(FAILURE_KINDS),
                                   _since_retry(job_id)).order_by(JobEvent.id)))


def failures_by_worker(events: list[JobEvent]) -> Counter:
    return Counter(e.worker for e in events if e.kind in FAILURE_KINDS)


def count(db_url: str, job_id: str, kind: str, segment_index: int) -> int:
    with session_scope(db_url) as session:
        return session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == kind,
            JobEvent.segment_index == segment_index, _since_retry(job_id)))
