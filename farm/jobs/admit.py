"""Admission: queued jobs wait in the database and go to their tier's Celery queue when the
scheduler's policy lets them (scheduler.admission: priority, tier capacity, project quotas).

One scheduler, not two: a tier's Celery queue only ever holds work its GPUs can
take now, so priorities are never lost in a broker queue. `release` runs after a submission,
whenever a job leaves the GPUs, and on every Celery beat tick. Decisions are taken under a
lock (a PostgreSQL advisory lock; a process lock on SQLite) and recorded by compare-and-set
on ``dispatched_at`` before anything is sent; a send that fails is undone, and the next
release sends the job again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager

from sqlalchemy import func, select, text, update

from farm.db.tables import Job, JobState, Segment, SegmentState, utcnow
from farm.db.session import session_scope
from farm.errors import QueueUnavailable
from farm.policy import get_policy
from farm.settings import Settings
from scheduler.admission import Holding, TierSize, Waiting, groups_for, select_for_release
from scheduler.routing import QueueLoad

log = logging.getLogger(__name__)

ON_GPUS = (JobState.queued.value, JobState.running.value)  # with dispatched_at set
_ADVISORY_KEY = 0x6661726D  # "farm"
_sqlite_lock = threading.Lock()


@contextmanager
def locked_session(db_url: str):
    """One release at a time, across processes: PostgreSQL's advisory lock; on SQLite an
    empty UPDATE first, which takes the database's write lock until commit (other writers
    wait), plus a lock for the threads of this process."""
    if db_url.startswith("postgresql"):
        with session_scope(db_url) as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})
            yield session
    else:
        with _sqlite_lock, session_scope(db_url) as session:
            session.execute(update(Job).where(text("1 = 0")).values(dispatched_at=None))
            yield session


def runnable_segments(session, job_ids: list[str]) -> dict[str, int]:
    """Per job: segments that need a group now. A continuous job's segments continue one
    another (one at a time); an independent job's all can. A segment whose denoising has
    ended (progress 1.0: decoding, encoding, storing) needs none: its group is given back
    when its last frame leaves, and the next segment may go to it meanwhile."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.continuous, func.count(Segment.id))
        .join(Segment, Segment.job_id == Job.id)
        .where(Job.id.in_(job_ids),
               Segment.state.in_((SegmentState.pending.value, SegmentState.running.value)),
               Segment.progress < 1.0)
        .group_by(Job.id, Job.continuous)).all()
    return {job_id: (min(1, n) if continuous else n) for job_id, continuous, n in rows}


def gpus_per_group(route: dict) -> int:
    """GPUs one of the route's pool members takes: its degree, twice over for the split
    placement, whose member is a pair of groups (one per expert)."""
    return route["degree"] * (2 if route.get("placement") == "split" else 1)


def pool_size(route: dict, policy=None) -> int:
    """Members of the route's pool: as many as its tier's nodes pack; 0 for an unknown tier."""
    tier = (policy or get_policy()).catalog.tiers.get(route["tier"])
    if tier is None:
        return 0
    return TierSize(tier.count, tier.gpus_per_node).groups(gpus_per_group(route))


def job_groups(route: dict, project: str, runnable: int, policy=None) -> int:
    """The groups a job holds while on the GPUs (scheduler.admission.groups_for)."""
    policy = policy or get_policy()
    if route["tier"] not in policy.catalog.tiers:
        return 1
    return groups_for(runnable, pool_size(route, policy), gpus_per_group(route),
                      policy.rules.quotas.limit(project, route["tier"]))


def _choose(session) -> tuple[list[str], dict[str, str]]:
    """-> (jobs marked as sent, jobs that can never run as routed: id -> why)."""
    from farm.jobs.submit import must_wait

    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.project, Job.route, Job.priority, Job.created_at, Job.dispatched_at)
        .where(Job.state.in_(ON_GPUS), Job.held.is_(False))  # a held job waits unseen (#13)
    ).all()
    policy = get_policy()
    runnable = runnable_segments(session, [r.id for r in rows])

    def groups(r) -> int:  # a job on the GPUs whose segments all denoised holds none
        n = runnable.get(r.id, 0)
        return job_groups(r.route, r.project, n, policy) if n or r.dispatched_at is None else 0

    # A queued job whose window has closed since the last tick is not sent (the tick parks it).
    waiting = [Waiting(r.id, r.project, r.route["tier"], gpus_per_group(r.route), r.priority,
                       r.created_at, groups(r))
               for r in rows if r.dispatched_at is None and not must_wait(r.route, now)]
    holding = [Holding(r.project, r.route["tier"], gpus_per_group(r.route), groups(r))
               for r in rows if r.dispatched_at is not None]
    if not waiting:
        return [], {}
    tiers = {name: TierSize(t.count, t.gpus_per_node) for name, t in policy.catalog.tiers.items()}
    decision = select_for_release(waiting, holding, tiers, policy.rules.quotas)
    for job_id, why in decision.held.items():
        log.debug("job %s waits: %s", job_id, why)
    from farm.jobs import service as jobs

    chosen = [job_id for job_id in decision.released if jobs.claim_for_dispatch(session, job_id)]
    return chosen, decision.impossible


def release(settings: Settings, enqueue: Callable | None = None) -> list[str]:
    """Send every job the policy admits now; returns their ids. Raises QueueUnavailable
    (after undoing the marks) when the broker refuses a send."""
    from farm.jobs import service as jobs

    if enqueue is None:
        from farm.jobs.dispatch import enqueue_job as enqueue
    db = settings.database_url
    with locked_session(db) as session:
        chosen, impossible = _choose(session)
    for job_id, why in impossible.items():  # e.g. a tier removed from the policy since
        jobs.fail_job(db, job_id, f"cannot run as routed: {why}")
    sent = []
    for i, job_id in enumerate(chosen):
        try:
            enqueue(jobs.get_job(db, job_id))
        except Exception as exc:
            jobs.unclaim(db, chosen[i:])
            log.error("jobs %s stay queued: could not be sent: %s", chosen[i:], exc)
            raise QueueUnavailable(f"the queue is unavailable: {exc}") from exc
        sent.append(job_id)
    if sent:
        log.info("released %d job(s): %s", len(sent), ", ".join(sent))
    return sent


def release_soon(settings: Settings) -> None:
    """After a job leaves the GPUs: let the next ones in. A failure here is logged and left
    to the next beat tick, which releases again; the task that called must not fail for it.
    Not in the one-process `farm render` (eager tasks): it renders its own job, nothing else."""
    from farm.celery_app import app

    if app.conf.task_always_eager:
        return
    try:
        release(settings)
    except Exception:
        log.exception("release after a job left the GPUs failed; the next tick retries")


def queue_loads(db_url: str) -> dict[str, QueueLoad]:
    """Per queue: jobs waiting for GPUs, and GPU-seconds of work queued or running on it."""
    waiting: dict[str, int] = {}
    backlog: dict[str, float] = {}
    with session_scope(db_url) as session:
        rows = session.execute(select(Job.route, Job.dispatched_at)
                               .where(Job.state.in_(ON_GPUS))).all()
    for route, dispatched_at in rows:
        queue = route["queue"]
        if dispatched_at is None:
            waiting[queue] = waiting.get(queue, 0) + 1
        gpu_s = (route.get("est_seconds") or 0.0) * route.get("degree", 1)
        backlog[queue] = backlog.get(queue, 0.0) + gpu_s
    return {q: QueueLoad(waiting.get(q, 0), backlog.get(q, 0.0))
            for q in set(waiting) | set(backlog)}
