"""Leases on a pool's actor groups: a segment renders on a group it holds, alone (issue #11).

A route's pool has ``size`` groups (nodes x GPUs per node / degree, scheduler/admission.py).
A render task leases one idle group, renews the lease with its heartbeat, and gives it back
when the segment ends; only the holder calls the group, so two callers never drive one group
and a segment never waits in an actor's mailbox. Groups a segment failed on are avoided while
another group of the pool can take it; groups blocklisted for the job are never leased for it.

Each step is a compare-and-set UPDATE on one row, on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from farm.db.leases import GroupLease
from farm.db.session import session_scope
from farm.db.tables import utcnow
from farm.errors import FarmError
from farm.jobs import admit, events
from farm.policy import get_policy
from farm.tasks import failure_policy
from scheduler.admission import TierSize
from workers.group import group_name

log = logging.getLogger(__name__)

# How long a segment waits for a group of its pool. Admission releases only what the pools
# can run, so a wait is a group being given back; longer means a group is stuck.
LEASE_WAIT_S = 900.0


class NoGroupLeft(FarmError):
    """Every group of the pool is blocklisted for the job: the segment cannot run."""


class NoGroupFree(FarmError):
    """No group was given back in time; the segment is tried again."""
    retryable = True


def pool_key(route: dict, variant: str) -> str:
    """``wan-toy:cpu:single:resident``: the groups of one variant, tier, plan and placement."""
    return ":".join([variant, route["tier"], route.get("parallel", "single"),
                     route.get("placement", "resident")])


@dataclass
class Lease:
    db: str
    pool: str
    replica: int
    ttl_s: float
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)

    def renew(self) -> bool:
        """False when the lease was lost (it ran out and another caller took the group)."""
        with session_scope(self.db) as session:
            done = session.execute(
                update(GroupLease).where(*self._mine())
                .values(expires_at=utcnow() + timedelta(seconds=self.ttl_s))).rowcount
        return done == 1

    def release(self) -> None:
        with session_scope(self.db) as session:
            session.execute(update(GroupLease).where(*self._mine()).values(
                holder=None, job_id=None, segment_index=None, leased_at=None, expires_at=None))

    def _mine(self) -> tuple:
        return (GroupLease.pool == self.pool, GroupLease.replica == self.replica,
                GroupLease.holder == self.holder)


def _ensure_rows(session, pool: str, size: int) -> None:
    have = set(session.execute(select(GroupLease.replica).where(
        GroupLease.pool == pool, GroupLease.replica < size)).scalars())
    missing = [r for r in range(size) if r not in have]
    if missing:
        session.add_all(GroupLease(pool=pool, replica=r) for r in missing)


def _free(session, pool: str, size: int, now) -> list[int]:
    return list(session.execute(
        select(GroupLease.replica)
        .where(GroupLease.pool == pool, GroupLease.replica < size,
               or_(GroupLease.holder.is_(None), GroupLease.expires_at < now))
        .order_by(GroupLease.replica)).scalars())


def _job_holds(session, db: str, job_id: str, now) -> int:
    """Groups the job holds now; on PostgreSQL under a lock of this job alone, so two of its
    segments leasing at once cannot both take its last allowed group."""
    if db.startswith("postgresql"):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:job))"), {"job": job_id})
    return session.scalar(select(func.count()).select_from(GroupLease).where(
        GroupLease.job_id == job_id, GroupLease.holder.is_not(None),
        GroupLease.expires_at >= now))


def try_acquire(db: str, pool: str, size: int, allowed: set[int], job_id: str,
                segment_index: int, ttl_s: float, allowance: int | None = None
                ) -> Lease | None:
    """Lease the lowest free group among ``allowed`` (the lowest groups are the ones made
    first, so they are warm), or None when all of them are busy, or when the job already
    holds the ``allowance`` of groups admission counted for it (farm/jobs/admit.py)."""
    lease = Lease(db, pool, -1, ttl_s)
    try:
        with session_scope(db) as session:
            _ensure_rows(session, pool, size)
    except IntegrityError:  # another caller made the same rows at the same moment
        pass
    with session_scope(db) as session:
        now = utcnow()
        if allowance is not None and _job_holds(session, db, job_id, now) >= allowance:
            return None
        for replica in (r for r in _free(session, pool, size, now) if r in allowed):
            taken = session.execute(
                update(GroupLease)
                .where(GroupLease.pool == pool, GroupLease.replica == replica,
                       or_(GroupLease.holder.is_(None), GroupLease.expires_at < now))
                .values(holder=lease.holder, job_id=job_id, segment_index=segment_index,
                        leased_at=now, expires_at=now + timedelta(seconds=ttl_s))).rowcount
            if taken == 1:
                lease.replica = replica
                return lease
    return None


def candidates(size: int, blocklisted: set[int], failed_here: set[int]) -> set[int]:
    """Groups the segment may run on: never a blocklisted one; one it failed on only when
    no other group of the pool is left for it."""
    allowed = set(range(size)) - blocklisted
    if not allowed:
        raise NoGroupLeft(f"every group of the pool ({size}) is blocklisted for this job")
    return (allowed - failed_here) or allowed


def acquire(db: str, pool: str, size: int, allowed: set[int], job_id: str, segment_index: int,
            ttl_s: float, wait_s: float, stop=None, allowance: int | None = None
            ) -> Lease | None:
    """Wait for a group among ``allowed``; None when ``stop()`` turns true first. Admission
    releases only what the pools can run, so a wait here is short (a group being given
    back); after ``wait_s`` it is NoGroupFree (retried)."""
    deadline, pause = time.monotonic() + wait_s, 0.02
    while True:
        lease = try_acquire(db, pool, size, allowed, job_id, segment_index, ttl_s, allowance)
        if lease is not None:
            return lease
        if stop is not None and stop():
            return None
        if time.monotonic() > deadline:
            raise NoGroupFree(f"no group of pool {pool} became free in {wait_s:.0f}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


class Held:
    """The lease a render task holds, if any: renewed by its heartbeat, given back once."""

    def __init__(self):
        self.lease: Lease | None = None
        self.name = ""  # the group's name, as the job's log shows it
        self.lost = False  # the lease ran out and another caller took the group

    def renew(self) -> None:
        lease = self.lease
        if lease is not None and not lease.renew():
            log.warning("lease on %s lost: stopping the render", self.name)
            self.lost = True

    def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None and not self.lost:
            lease.release()


def blame(exc: BaseException, held: Held) -> BaseException:
    """Mark ``exc`` as the group's failure: the job's log and the failure policy count it
    against the group (another GPU next time), not against the Celery worker."""
    exc.where = held.name
    return exc


def pool_size(tier, degree: int) -> int:
    return TierSize(tier.count, tier.gpus_per_node).groups(degree)


@contextmanager
def lease_for_segment(settings, job, segment, held: Held, stop):
    """Lease a group of the job's pool for ``segment`` into ``held`` (left None when ``stop()``
    turns true while waiting), and give it back at the end, whatever happens."""
    variant = get_policy().catalog.model(job.model).name
    route = job.route
    plan, placement = route.get("parallel", "single"), route.get("placement", "resident")
    size = pool_size(get_policy().catalog.tier(route["tier"]), admit.gpus_per_group(route))
    names = {group_name(variant, route["tier"], plan, placement, None, r): r
             for r in range(size)}
    failures = events.failures(settings.database_url, job.id)
    blocked = {names[w] for w in failure_policy.blocklisted(failures, settings.blocklist_after)
               if w in names}
    failed_here = {names[w] for w in failure_policy.failed_on(failures, segment.index)
                   if w in names}
    allowed = candidates(size, blocked, failed_here)
    with session_scope(settings.database_url) as session:
        runnable = admit.runnable_segments(session, [job.id]).get(job.id, 1)
    allowance = admit.job_groups(route, job.project, runnable)
    held.lease = acquire(settings.database_url, pool_key(route, variant), size, allowed, job.id,
                         segment.index, settings.lease_s, LEASE_WAIT_S, stop, allowance)
    if held.lease is not None:
        held.name = group_name(variant, route["tier"], plan, placement, None,
                               held.lease.replica)
    try:
        yield held
    finally:
        held.release()
