"""A render task's lease on one group of its route's pool (issue #11).

Which group: never one blocklisted for the job, one the segment failed on only when no
other is left, no more groups than admission counted for the job. Held while the segment
renders, renewed with the task's heartbeat, given back once. Before a group is first made,
room is made for it on the tier: other pools' idle groups there are taken down when the
tier's slots are all held, since a group lives as long as the cluster otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import ray

from farm.db.session import session_scope
from farm.errors import WorkerLost
from farm.jobs import admit, events
from farm.policy import get_policy
from farm.tasks import failure_policy, group_leases
from farm.tasks.group_leases import Lease
from scheduler.parallel_cost import parse_plan
from workers.group import group_name, member_exists, take_down_member

log = logging.getLogger(__name__)

# How long a segment waits for a group of its pool. Admission releases only what the pools
# can run, so a wait is a group being given back; longer means a group is stuck.
LEASE_WAIT_S = 900.0
ROOM_WAIT_S = 10.0  # for Ray to give back the slots of a group taken down


class LeaseLost(WorkerLost):
    """The lease ran out (the heartbeat stopped for a lease's time) and another caller took
    the group: the render stopped. Nobody's fault but the clock's: retried elsewhere."""


class Held:
    """The lease a render task holds, if any: renewed by its heartbeat thread, given back
    once by the task. A lock keeps a renewal that races the give-back from reading as lost."""

    def __init__(self):
        self.lease: Lease | None = None
        self.name = ""  # the group's name, as the job's log shows it
        self.lost = False  # the lease ran out and another caller took the group
        self._lock = threading.Lock()

    def renew(self) -> None:
        with self._lock:
            if self.lease is not None and not self.lease.renew():
                log.warning("lease on %s lost: stopping the render", self.name)
                self.lost = True

    def release(self) -> None:
        with self._lock:
            lease, self.lease = self.lease, None
            if lease is not None and not self.lost:
                lease.release()


def blame(exc: BaseException, held: Held) -> BaseException:
    """Mark ``exc`` as the group's failure: the job's log and the failure policy count it
    against the group (another GPU next time), not against the Celery worker."""
    exc.where = held.name
    return exc


def _route(job) -> tuple[str, str, str, str]:
    route = job.route
    variant = get_policy().catalog.model(job.model).name
    return variant, route["tier"], route.get("parallel", "single"), route.get(
        "placement", "resident")


@contextmanager
def lease_for_segment(settings, job, segment, held: Held, stop):
    """Lease a group of the job's pool for ``segment`` into ``held`` (left None when ``stop()``
    turns true while waiting), and give it back at the end, whatever happens."""
    variant, tier, plan, placement = _route(job)
    size = admit.pool_size(job.route)
    names = {group_name(variant, tier, plan, placement, None, r): r for r in range(size)}
    failures = events.failures(settings.database_url, job.id)
    blocked = {names[w] for w in failure_policy.blocklisted(failures, settings.blocklist_after)
               if w in names}
    failed_here = {names[w] for w in failure_policy.failed_on(failures, segment.index)
                   if w in names}
    allowed = group_leases.candidates(size, blocked, failed_here)
    with session_scope(settings.database_url) as session:
        runnable = admit.runnable_segments(session, [job.id]).get(job.id, 1)
    allowance = admit.job_groups(job.route, job.project, runnable)
    pool = group_leases.pool_key(job.route, variant)
    held.lease = group_leases.acquire(settings.database_url, pool, size, allowed, job.id,
                                      segment.index, settings.lease_s, LEASE_WAIT_S, stop,
                                      allowance)
    if held.lease is not None:
        held.name = group_name(variant, tier, plan, placement, None, held.lease.replica)
    try:
        yield held
    finally:
        held.release()


def make_room(settings, job, replica: int) -> None:
    """Before group ``replica`` of the job's pool is first made: while the tier's Ray slots
    are too few for it, take down idle groups of the tier's other pools (leased first, so
    nobody starts on one meanwhile). Ray must be connected."""
    variant, tier, plan, placement = _route(job)
    if member_exists(variant, tier, plan, placement, replica):
        return
    resource = get_policy().catalog.tier(tier).ray_resource
    need = admit.gpus_per_group(job.route)
    pool = group_leases.pool_key(job.route, variant)
    db = settings.database_url
    for other, other_replica in group_leases.idle_members(db, tier, other_than=pool):
        if _free_slots(resource) >= need:
            return
        other_variant, _, other_plan, other_placement = other.split(":")
        if not member_exists(other_variant, tier, other_plan, other_placement, other_replica):
            continue
        lease = group_leases.lease_member(db, other, other_replica, settings.lease_s)
        if lease is None:  # taken meanwhile: it is busy, not idle
            continue
        try:
            before = _free_slots(resource)
            take_down_member(other_variant, tier, other_plan, other_placement, other_replica)
            log.info("took down idle group %s:g%d to make room on tier %s for %s", other,
                     other_replica, tier, pool)
            freed = parse_plan(other_plan).world * (2 if other_placement == "split" else 1)
            _wait_for_slots(resource, min(need, before + freed))
        finally:
            lease.release()


def _free_slots(resource: str) -> float:
    return ray.available_resources().get(resource, 0.0)


def _wait_for_slots(resource: str, need: int) -> None:
    deadline = time.monotonic() + ROOM_WAIT_S
    while _free_slots(resource) < need and time.monotonic() < deadline:
        time.sleep(0.1)
