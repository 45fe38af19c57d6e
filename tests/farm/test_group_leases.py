"""Leases on a pool's actor groups, on the real PostgreSQL: one holder per group, the warm
groups first, a lease that runs out is taken over, a job never holds more groups than
admission counted for it, and failed or blocklisted groups are avoided (issue #11)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from farm.tasks import group_leases, segment_lease
from farm.tasks.group_leases import NoGroupLeft, candidates, try_acquire

POOL = "wan-tiny:cpu:single:resident"


@pytest.fixture()
def pool(db_url, request):
    """A pool name of this test's own, so tests never share leases."""
    return f"{POOL}:{request.node.name}"


def test_each_group_has_one_holder_and_the_lowest_free_one_is_leased(db_url, pool):
    first = try_acquire(db_url, pool, 2, {0, 1}, "job-a", 0, ttl_s=30)
    second = try_acquire(db_url, pool, 2, {0, 1}, "job-b", 0, ttl_s=30)
    assert (first.replica, second.replica) == (0, 1)
    assert try_acquire(db_url, pool, 2, {0, 1}, "job-c", 0, ttl_s=30) is None
    first.release()
    third = try_acquire(db_url, pool, 2, {0, 1}, "job-c", 0, ttl_s=30)
    assert third.replica == 0 and third.holder != first.holder
    assert not first.renew()  # released: the group is no longer its to drive


def test_many_callers_at_once_get_distinct_groups(db_url, pool):
    won: list[int] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        lease = try_acquire(db_url, pool, 5, set(range(5)), f"job-{i}", 0, ttl_s=30)
        if lease is not None:
            with lock:
                won.append(lease.replica)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Some callers may find every group busy only because others were mid-lease; none
    # may share a group, and no group beyond the pool's five exists.
    assert len(won) == len(set(won)) and set(won) <= set(range(5)) and len(won) >= 1
    rest = [try_acquire(db_url, pool, 5, set(range(5)), f"late-{i}", 0, 30) for i in range(6)]
    assert sorted(won + [r.replica for r in rest if r]) == list(range(5))


def test_a_lease_that_ran_out_is_taken_over_and_its_old_holder_learns_it(db_url, pool):
    old = try_acquire(db_url, pool, 1, {0}, "job-a", 0, ttl_s=0.2)
    assert old.renew()  # renewed in time
    time.sleep(0.5)
    new = try_acquire(db_url, pool, 1, {0}, "job-b", 0, ttl_s=30)
    assert new is not None and new.replica == 0
    assert not old.renew()
    held = segment_lease.Held()
    held.lease, held.name = old, "render:wan-tiny:cpu:g0"
    held.renew()
    assert held.lost
    held.release()  # a lost lease is not given back: that would free the new holder's group
    assert new.renew()


def test_a_job_holds_no_more_groups_than_its_allowance(db_url, pool):
    wide, narrow = uuid.uuid4().hex, uuid.uuid4().hex  # job ids: leases count per job
    a = try_acquire(db_url, pool, 3, {0, 1, 2}, wide, 0, 30, allowance=2)
    b = try_acquire(db_url, pool, 3, {0, 1, 2}, wide, 1, 30, allowance=2)
    assert a and b
    assert try_acquire(db_url, pool, 3, {0, 1, 2}, wide, 2, 30, allowance=2) is None
    other = try_acquire(db_url, pool, 3, {0, 1, 2}, narrow, 0, 30, allowance=1)
    assert other.replica == 2
    a.release()
    assert try_acquire(db_url, pool, 3, {0, 1, 2}, wide, 2, 30, allowance=2).replica == 0


def test_waiting_for_a_group_ends_when_the_segment_is_stopped(db_url, pool):
    busy = try_acquire(db_url, pool, 1, {0}, "job-a", 0, ttl_s=30)
    assert busy is not None
    stop_at = time.monotonic() + 0.3
    got = group_leases.acquire(db_url, pool, 1, {0}, "job-b", 0, 30, wait_s=10,
                               stop=lambda: time.monotonic() > stop_at)
    assert got is None


def test_blocklisted_groups_are_never_used_failed_ones_only_when_nothing_else_is_left():
    assert candidates(3, blocklisted=set(), failed_here={0}) == {1, 2}
    assert candidates(3, blocklisted={1}, failed_here={0}) == {2}
    assert candidates(2, blocklisted={1}, failed_here={0}) == {0}  # the only one left
    with pytest.raises(NoGroupLeft, match=r"every group of the pool \(2\) is blocklisted"):
        candidates(2, blocklisted={0, 1}, failed_here=set())
