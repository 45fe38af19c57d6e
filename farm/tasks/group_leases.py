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
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from farm.db.leases import GroupLease
from farm.db.session import session_scope
from farm.db.tables import utcnow
from farm.errors import FarmError

log = logging.getLogger(__name__)



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
        _, expiry = _clock(self.db, self.ttl_s)
        with session_scope(self.db) as session:
            done = session.execute(
                update(GroupLease).where(*self._mine()).values(expires_at=expiry)).rowcount
        return done == 1

    def release(self) -> None:
        with session_scope(self.db) as session:
            session.execute(update(GroupLease).where(*self._mine()).values(
                holder=None, job_id=None, segment_index=None, leased_at=None, expires_at=None))

    def _mine(self) -> tuple:
        return (GroupLease.pool == self.pool, GroupLease.replica == self.replica,
                GroupLease.holder == self.holder)


def _clock(db: str, ttl_s: float):
    """(now, expiry) as SQL: the database's clock on PostgreSQL, so every host's leases run
    out on one clock whatever the skew between Celery hosts; this process's on SQLite (one
    machine)."""
    if db.startswith("postgresql"):
        return func.now(), func.now() + timedelta(seconds=ttl_s)
    now = utcnow()
    return now, now + timedelta(seconds=ttl_s)


# Pools whose rows this process has made sure of: a wait for a group polls try_acquire, and
# the rows of a pool, once there, stay (nothing deletes them; a downgrade drops the table).
_ROWS_MADE: set[tuple[str, str, int]] = set()


def _ensure_rows(db: str, pool: str, size: int) -> None:
    if (db, pool, size) in _ROWS_MADE:
        return
    try:
        with session_scope(db) as session:
            _add_missing_rows(session, pool, size)
    except IntegrityError:  # another caller made the same rows at the same moment
        pass
    _ROWS_MADE.add((db, pool, size))


def _add_missing_rows(session, pool: str, size: int) -> None:
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
    """Groups the job holds now, under a lock, so two of its segments leasing at once cannot
    both take its last allowed group: on PostgreSQL a lock of this job alone; on SQLite the
    database's write lock, taken by an empty UPDATE before the count."""
    if db.startswith("postgresql"):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:job))"), {"job": job_id})
    else:
        session.execute(update(GroupLease).where(text("1 = 0")).values(holder=None))
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
    _ensure_rows(db, pool, size)
    now, expiry = _clock(db, ttl_s)
    with session_scope(db) as session:
        if allowance is not None and _job_holds(session, db, job_id, now) >= allowance:
            return None
        for replica in (r for r in _free(session, pool, size, now) if r in allowed):
            taken = session.execute(
                update(GroupLease)
                .where(GroupLease.pool == pool, GroupLease.replica == replica,
                       or_(GroupLease.holder.is_(None), GroupLease.expires_at < now))
                .values(holder=lease.holder, job_id=job_id, segment_index=segment_index,
                        leased_at=now, expires_at=expiry)).rowcount
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


def idle_members(db: str, tier: str, other_than: str) -> list[tuple[str, int]]:
    """(pool, replica) of every member of the tier's other pools that nobody holds now: the
    groups that may be taken down to make room on the tier."""
    with session_scope(db) as session:
        now = utcnow()
        rows = session.execute(
            select(GroupLease.pool, GroupLease.replica)
            .where(GroupLease.pool.like(f"%:{tier}:%"), GroupLease.pool != other_than,
                   or_(GroupLease.holder.is_(None), GroupLease.expires_at < now))
            .order_by(GroupLease.replica.desc())).all()
    return [(pool, replica) for pool, replica in rows if pool.split(":")[1] == tier]


def lease_member(db: str, pool: str, replica: int, ttl_s: float) -> Lease | None:
    """Lease one given member if nobody holds it (to take its group down undisturbed)."""
    lease = Lease(db, pool, replica, ttl_s)
    now, expiry = _clock(db, ttl_s)
    with session_scope(db) as session:
        taken = session.execute(
            update(GroupLease)
            .where(GroupLease.pool == pool, GroupLease.replica == replica,
                   or_(GroupLease.holder.is_(None), GroupLease.expires_at < now))
            .values(holder=lease.holder, leased_at=now, expires_at=expiry)).rowcount
    return lease if taken == 1 else None
