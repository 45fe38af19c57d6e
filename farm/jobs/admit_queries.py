"""What an admission pass reads (farm.jobs.admit), each through an index, never the whole
queue (issue #14, item 5; migration 0010):

- ``look_ahead``: a page of a tier's waiting jobs, priority 100 first, oldest first, from
  the partial index ix_jobs_admission_order (jobs not yet sent and not held);
- ``holding_rows``: the jobs on a tier's GPUs (queued or running, sent), through the
  partial index ix_jobs_in_flight (a few hundred rows at most), with their segments still
  to denoise counted in SQL;
- ``orphan_rows``: waiting jobs of tiers the policy no longer declares;
- ``queue_loads_lazy``: per queue, jobs waiting and GPU-seconds ahead, one aggregate, run
  only when routing asks for a queue's load (a rule's fallback with a condition), and at
  most once a second per process (LOADS_MAX_AGE_S): a spill is a heuristic, a second-old
  count serves it, and the aggregate grows with the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from sqlalchemy import and_, case, func, literal_column, not_, or_, select

from farm.db.session import session_scope
from farm.db.tables import Job, JobState, Segment, SegmentState
from scheduler.routing import QueueLoad

ON_GPUS = (JobState.queued.value, JobState.running.value)  # with dispatched_at set
# The partial indexes' predicates as the indexes write them (farm.db.tables), constants
# in the SQL text, so the planner proves them whatever the bound values are.
NOT_SENT = (Job.dispatched_at.is_(None), not_(Job.held))


def state_in(states, column=Job.state):
    """``column IN ('a', 'b')`` with the states written into the SQL (they are constants)."""
    return column.in_([literal_column(f"'{s}'") for s in states])


def look_ahead_query(tier: str, limit: int, after=None):
    """Up to ``limit`` waiting jobs of ``tier`` in admission order; ``after``: the last row
    of the previous page (keyset: priority, created_at, id)."""
    query = (select(Job.id, Job.project, Job.route, Job.priority, Job.created_at,
                    Job.continuous)
             .where(Job.tier == tier, Job.state == JobState.queued.value, *NOT_SENT)
             .order_by(Job.priority.desc(), Job.created_at, Job.id).limit(limit))
    if after is not None:
        query = query.where(Job.priority <= after.priority, _past(after))
    return query


def look_ahead(session, tier: str, limit: int, after=None) -> list:
    return session.execute(look_ahead_query(tier, limit, after)).all()


def _past(row):
    """Rows after ``row`` in (priority desc, created_at, id) order."""
    same = Job.priority == row.priority
    return or_(Job.priority < row.priority,
               and_(same, Job.created_at > row.created_at),
               and_(same, Job.created_at == row.created_at, Job.id > row.id))


@lru_cache(maxsize=64)  # a statement is immutable: built once per tier, not per submission
def holding_query(tier: str):
    """(id, project, route, continuous, runnable): the tier's jobs on the GPUs (sent,
    queued or running) and, counted in SQL per job through the segments' job_id index, how
    many of their segments still need a group (pending or running, not yet denoised)."""
    runnable = (select(func.count(Segment.id))
                .where(Segment.job_id == Job.id, Segment.progress < 1.0,
                       Segment.state.in_((SegmentState.pending.value,
                                          SegmentState.running.value)))
                .scalar_subquery())
    return (select(Job.id, Job.project, Job.route, Job.continuous, runnable.label("runnable"))
            .where(Job.dispatched_at.is_not(None), state_in(ON_GPUS), Job.tier == tier))


def holding_rows(session, tier: str) -> list:
    return session.execute(holding_query(tier)).all()


def orphan_query(tiers: list[str], limit: int):
    """Waiting jobs whose tier is none of ``tiers`` (e.g. removed from the policy since)."""
    return (select(Job.id, Job.tier)
            .where(Job.state == JobState.queued.value, *NOT_SENT, Job.tier.not_in(tiers))
            .limit(limit))


def orphan_rows(session, tiers: list[str], limit: int) -> list:
    return session.execute(orphan_query(tiers, limit)).all()


def queue_loads_now(db_url: str) -> dict[str, QueueLoad]:
    """Per queue: (jobs waiting, GPU-seconds queued or running), aggregated in SQL over the
    jobs queued or running (the state index), never read row by row."""
    queue = Job.route["queue"].as_string()
    gpu_s = (func.coalesce(Job.route["est_seconds"].as_float(), 0.0)
             * func.coalesce(Job.route["degree"].as_integer(), 1))
    waiting = func.sum(case((Job.dispatched_at.is_(None), 1), else_=0))
    with session_scope(db_url) as session:
        rows = session.execute(select(queue, waiting, func.sum(gpu_s))
                               .where(Job.state.in_(ON_GPUS)).group_by(queue)).all()
    return {q: QueueLoad(int(n or 0), float(s or 0.0)) for q, n, s in rows if q}


LOADS_MAX_AGE_S = 1.0
_loads_cache: dict[str, tuple[float, dict[str, QueueLoad]]] = {}  # db url -> (when, loads)
_loads_lock = threading.Lock()


def queue_loads_recent(db_url: str) -> dict[str, QueueLoad]:
    """queue_loads_now, read again when the last read is over LOADS_MAX_AGE_S old; a copy."""
    with _loads_lock:
        when, loads = _loads_cache.get(db_url, (float("-inf"), {}))
        if time.monotonic() - when > LOADS_MAX_AGE_S:
            loads = queue_loads_now(db_url)
            _loads_cache[db_url] = (time.monotonic(), loads)
        return dict(loads)


class _LazyLoads(MutableMapping):
    """queue_loads_recent, read on first use: truthy before it is read, so ``loads or {}``
    (scheduler.routing) does not read it."""

    def __init__(self, db_url: str):
        self._db_url, self._loads = db_url, None

    def _read(self) -> dict[str, QueueLoad]:
        if self._loads is None:
            self._loads = queue_loads_recent(self._db_url)
        return self._loads

    def __getitem__(self, queue: str) -> QueueLoad:
        return self._read()[queue]

    def __setitem__(self, queue: str, load: QueueLoad) -> None:  # a batch counts its own
        self._read()[queue] = load

    def __delitem__(self, queue: str) -> None:
        del self._read()[queue]

    def __iter__(self):
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __bool__(self) -> bool:
        return True


def queue_loads_lazy(db_url: str) -> Mapping[str, QueueLoad]:
    return _LazyLoads(db_url)
