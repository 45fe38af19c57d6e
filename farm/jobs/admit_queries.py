"""What an admission pass reads (farm.jobs.admit), each through an index, never the whole
queue (issue #14, item 5; migration 0010):

- ``look_ahead``: a page of a tier's waiting jobs in admission order (priority band 100
  first, earliest deadline first within a band, then priority, oldest first: issue #15),
  from the partial index ix_jobs_admission_edf (jobs not yet sent and not held; 0012);
- ``holding_rows``: the jobs on a tier's GPUs (queued or running, sent), through the
  partial index ix_jobs_in_flight (a few hundred rows at most), with their segments still
  to denoise counted in SQL;
- ``running_rows``: the tier's segments that could yield to an urgent job (issue #15):
  those holding a group's live lease, through ix_jobs_in_flight and ix_group_leases_job_id;
- ``batch_candidates``: which waiting jobs a batched render can take (issue #15);
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
from sqlalchemy import (
    Integer, and_, bindparam, case, false, func, literal_column, not_, or_, select,
)

from farm.db.session import session_scope
from farm.db.leases import GroupLease
from farm.db.tables import Job, JobState, Segment, SegmentState, utcnow
from scheduler.deadlines import PRIORITY_BAND, band
from scheduler.routing import QueueLoad

ON_GPUS = (JobState.queued.value, JobState.running.value)  # with dispatched_at set
# The partial indexes' predicates as the indexes write them (farm.db.tables), constants
# in the SQL text, so the planner proves them whatever the bound values are.
NOT_SENT = (Job.dispatched_at.is_(None), not_(Job.held))


def state_in(states, column=Job.state):
    """``column IN ('a', 'b')`` with the states written into the SQL (they are constants)."""
    return column.in_([literal_column(f"'{s}'") for s in states])


# Issue #15 (migration 0012, ix_jobs_admission_edf): the look-ahead's order, expressions
# written as the index writes them (the 10 in the SQL text, not bound, so PostgreSQL matches
# the index expression; the band negated, ascending, since Alembic cannot compare an
# expression sorted DESC). scheduler.deadlines.admission_key is the same order in Python;
# tests/farm/test_admission_release.py checks the two agree.
BAND = Job.priority // literal_column(str(PRIORITY_BAND), Integer)
UP_BAND = -BAND  # ascending: the highest band first
NO_DEADLINE = Job.deadline_at.is_(None)
ADMISSION_ORDER = (UP_BAND, NO_DEADLINE, Job.deadline_at, Job.priority.desc(), Job.created_at,
                   Job.id)


def look_ahead_query(tier: str, limit: int, after=None):
    """Up to ``limit`` waiting jobs of ``tier`` in admission order (band, earliest deadline,
    priority, age, id); ``after``: the last row of the previous page (keyset paging).
    ``started_at`` set: a job preempted back into the line (issue #15), its window no
    longer holds it (farm.jobs.admit._waiting)."""
    query = (select(Job.id, Job.project, Job.route, Job.priority, Job.created_at,
                    Job.continuous, Job.deadline_at, Job.width, Job.height, Job.frames,
                    Job.steps, Job.guidance_high, Job.guidance_low, Job.started_at)
             .where(Job.tier == tier, Job.state == JobState.queued.value, *NOT_SENT)
             .order_by(*ADMISSION_ORDER).limit(limit))
    if after is not None:
        query = query.where(UP_BAND >= -band(after.priority), _past(after))
    return query


def look_ahead(session, tier: str, limit: int, after=None) -> list:
    return session.execute(look_ahead_query(tier, limit, after)).all()


def _past(row):
    """Rows after ``row`` in admission order: for each key in turn, equal on every earlier
    key and past it on this one."""
    of_row, deadline = band(row.priority), row.deadline_at
    if deadline is None:  # past it: later in the no-deadline part of its band, or a lower band
        deadline_keys = [(NO_DEADLINE, false())]
    else:  # past it: the no-deadline part of its band, or a later deadline
        deadline_keys = [(Job.deadline_at.is_not(None), NO_DEADLINE),
                         (Job.deadline_at == deadline, Job.deadline_at > deadline)]
    keys = [(UP_BAND == -of_row, UP_BAND > -of_row), *deadline_keys,
            (Job.priority == row.priority, Job.priority < row.priority),
            (Job.created_at == row.created_at, Job.created_at > row.created_at),
            (Job.id == row.id, Job.id > row.id)]
    options, same = [], []
    for equal, beyond in keys:
        options.append(and_(*same, beyond))
        same.append(equal)
    return or_(*options)


@lru_cache(maxsize=64)  # a statement is immutable: built once per tier, not per submission
def holding_query(tier: str):
    """(id, project, route, continuous, runnable, batch): the tier's jobs on the GPUs (sent,
    queued or running) and, counted in SQL per job through the segments' job_id index, how
    many of their segments still need a group (pending or running, not yet denoised), and
    the batched render those run in (issue #15: a batch's jobs hold ONE group together)."""
    still = (Segment.job_id == Job.id, Segment.progress < 1.0,
             Segment.state.in_((SegmentState.pending.value, SegmentState.running.value)))
    runnable = select(func.count(Segment.id)).where(*still).scalar_subquery()
    batch = select(func.max(Segment.render_batch)).where(*still).scalar_subquery()
    return (select(Job.id, Job.project, Job.route, Job.continuous, runnable.label("runnable"),
                   batch.label("batch"))
            .where(Job.dispatched_at.is_not(None), state_in(ON_GPUS), Job.tier == tier))


def holding_rows(session, tier: str) -> list:
    return session.execute(holding_query(tier)).all()


IN_FLIGHT = (*ON_GPUS, JobState.stitching.value)  # ix_jobs_in_flight's states


def holds_a_group(now):
    """The segment holds a live lease of a group (farm.tasks.group_leases): a segment is
    `running` from start_segment on, before it waits for a group; asking one that holds
    none to yield frees nothing, and it would count as asked (issue #15 review). A scalar
    subquery, not EXISTS: PostgreSQL runs it per running segment through
    ix_group_leases_job_id (a few rows per job), where it would turn an EXISTS into a join
    that reads the whole lease table when few of its rows are leased."""
    return (select(GroupLease.replica)
            .where(GroupLease.job_id == Segment.job_id,
                   GroupLease.segment_index == Segment.index,
                   GroupLease.holder.is_not(None), GroupLease.expires_at >= now)
            .limit(1).scalar_subquery().is_not(None))


@lru_cache(maxsize=64)
def running_query(tier: str, db_clock: bool = True):
    """The segments denoising on the tier's groups that could yield (issue #15): running
    on a group they hold a live lease of, not yet denoised, not in a batched render, of
    the tier's jobs in flight (through ix_jobs_in_flight, a few hundred rows, then the
    segments' and the leases' job_id indexes). ``db_clock``: leases run out on the
    database's clock, as farm.tasks.group_leases writes them on PostgreSQL; else bind
    ``now`` (SQLite)."""
    now = func.now() if db_clock else bindparam("now")
    return (select(Segment.id, Segment.job_id, Job.priority, Job.route, Segment.preemptions,
                   Segment.started_at, Segment.preempt_requested_at)
            .join(Job, Segment.job_id == Job.id)
            .where(Job.dispatched_at.is_not(None), state_in(IN_FLIGHT), Job.tier == tier,
                   Segment.state == SegmentState.running.value, Segment.progress < 1.0,
                   Segment.render_batch.is_(None), holds_a_group(now)))


def running_rows(session, tier: str) -> list:
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(running_query(tier)).all()
    return session.execute(running_query(tier, db_clock=False), {"now": utcnow()}).all()


def batched_jobs(session, tier: str) -> list[str]:
    """The tier's jobs in flight whose segment renders in a batched render (never
    preempted: `farm rules explain` says so)."""
    return sorted(set(session.scalars(
        select(Segment.job_id).join(Job, Segment.job_id == Job.id)
        .where(Job.dispatched_at.is_not(None), state_in(IN_FLIGHT), Job.tier == tier,
               Segment.state == SegmentState.running.value,
               Segment.render_batch.is_not(None)))))


def batch_candidates(session, job_ids: list[str]) -> set[str]:
    """Of ``job_ids``, the jobs a batched render can take (issue #15): one segment, pending,
    not resuming a saved state (a resumed segment continues its own latents)."""
    if not job_ids:
        return set()
    rows = session.execute(
        select(Segment.job_id).where(Segment.job_id.in_(job_ids))
        .group_by(Segment.job_id)
        .having(func.count(Segment.id) == 1,
                func.max(case((Segment.state == SegmentState.pending.value, 0), else_=1)) == 0,
                func.max(case((Segment.resume_key.is_not(None), 1), else_=0)) == 0)).all()
    return {r.job_id for r in rows}


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
