"""The locks admission decides under (farm.jobs.admit), issue #14 item 5.

Two levels of PostgreSQL advisory locks, each held until the transaction ends:

- the farm-wide key, exclusive (``locked_session``): what must see no admission pass half
  done: hold/priority changes (farm.jobs.controls) and the reconciler's tick;
- per tier, a pass (``tier_session``): the farm-wide key shared (passes of different tiers
  run at once) plus the tier's own key, exclusive (one pass per tier at a time).

A submission asks for a pass of its own tier without queueing behind every other one
(``wait=False``): when a pass of the tier is running, that pass may have read the queue
before the new job was saved, so one submission (the holder of the tier's "pending" key, a
session lock taken with try) waits and passes after it; any other submission returns at
once, because the pending one's pass reads the queue after their jobs were saved. So
every saved job is seen by a pass that starts after it was saved, and at most two
submissions per tier wait for a pass. On SQLite (one machine) a process lock and the
database's write lock serialise every pass.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager

from sqlalchemy import text, update

from farm.db.session import session_scope
from farm.db.tables import Job

FARM_KEY = 0x6661726D  # "farm"
_sqlite_lock = threading.Lock()


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name`` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def tier_key(tier: str) -> int:
    return advisory_key(f"farm-admission:{tier}")


def pending_key(tier: str) -> int:
    return advisory_key(f"farm-admission-pending:{tier}")


def _scalar(session, sql: str, key: int):
    return session.execute(text(sql), {"key": key}).scalar()


@contextmanager
def _sqlite_session(db_url: str):
    """The process lock, then an empty UPDATE, which takes SQLite's write lock until commit."""
    with _sqlite_lock, session_scope(db_url) as session:
        session.execute(update(Job).where(text("1 = 0")).values(dispatched_at=None))
        yield session


@contextmanager
def locked_session(db_url: str):
    """No admission pass of any tier runs while this session is open."""
    if not db_url.startswith("postgresql"):
        with _sqlite_session(db_url) as session:
            yield session
        return
    with session_scope(db_url) as session:
        _scalar(session, "SELECT pg_advisory_xact_lock(:key)", FARM_KEY)
        yield session


@contextmanager
def tier_session(db_url: str, tier: str, wait: bool = True):
    """A session in which to run ``tier``'s pass, or None when ``wait`` is False and a
    submission already waits to pass after the running one (see the module's docstring)."""
    if not db_url.startswith("postgresql"):
        with _sqlite_session(db_url) as session:
            yield session
        return
    with session_scope(db_url) as session:
        _scalar(session, "SELECT pg_advisory_xact_lock_shared(:key)", FARM_KEY)
        if wait or _scalar(session, "SELECT pg_try_advisory_xact_lock(:key)", tier_key(tier)):
            if wait:
                _scalar(session, "SELECT pg_advisory_xact_lock(:key)", tier_key(tier))
            yield session
            return
        if not _scalar(session, "SELECT pg_try_advisory_lock(:key)", pending_key(tier)):
            yield None  # the pending submission's pass will read this job
            return
        try:  # the running pass may have read the queue before this job was saved
            _scalar(session, "SELECT pg_advisory_xact_lock(:key)", tier_key(tier))
        except BaseException:  # closing the connection ends its session lock too
            session.connection().invalidate()
            raise
        _scalar(session, "SELECT pg_advisory_unlock(:key)", pending_key(tier))
        yield session
