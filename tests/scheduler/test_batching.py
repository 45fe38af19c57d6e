"""Batches of like requests (issue #15, item 2): which jobs go together, made-up priorities."""

from __future__ import annotations

import random

import pytest

from scheduler.batching import (
    Batchable, batch_cap, batch_key, batch_seconds, form_batches, may_hold,
)
from scheduler.catalog import PolicyError, parse_catalog
from tests.scheduler.policy_fixtures import CONFIG, shipped_catalog

A = batch_key("wan-toy", "cpu", 32, 32, 17, 4, 4.0, 4.0, None)
B = batch_key("wan-toy", "cpu", 32, 32, 17, 8, 4.0, 4.0, None)


def b(job_id, priority=50, key=A):
    return Batchable(job_id, priority, key)


def test_the_key_holds_everything_a_shared_forward_pass_needs():
    assert A == batch_key("wan-toy", "cpu", 32, 32, 17, 4, 4, 4, None)  # 4 == 4.0
    assert A != B
    assert A != batch_key("wan-toy", "cpu-b", 32, 32, 17, 4, 4.0, 4.0, None)
    assert A != batch_key("wan-toy", "cpu", 32, 32, 17, 4, 4.0, 3.0, None)
    assert A != batch_key("wan-tiny", "cpu", 32, 32, 17, 4, 4.0, 4.0, None)
    assert A != batch_key("wan-toy", "cpu", 32, 32, 13, 4, 4.0, 4.0, None)
    one = batch_key("m", "t", 1, 1, 1, 1, 1, 1, {"kind": "mag", "threshold": 0.1})
    assert one == batch_key("m", "t", 1, 1, 1, 1, 1, 1, {"threshold": 0.1, "kind": "mag"})
    assert one != batch_key("m", "t", 1, 1, 1, 1, 1, 1, None)
    hash(one)


def test_like_jobs_batch_in_order_up_to_max_batch():
    jobs = [b("a"), b("b"), b("x", key=B), b("c"), b("d"), b("e")]
    assert form_batches(jobs, 4) == [["a", "b", "c", "d"], ["x"], ["e"]]
    assert form_batches(jobs, 2) == [["a", "b"], ["x"], ["c", "d"], ["e"]]
    assert form_batches(jobs, 1) == [["a"], ["b"], ["x"], ["c"], ["d"], ["e"]]


def test_a_job_without_a_key_renders_alone():
    jobs = [b("a", key=None), b("b", key=None), b("c"), b("d")]
    assert form_batches(jobs, 4) == [["a"], ["b"], ["c", "d"]]


def test_batching_never_pulls_a_member_past_a_job_of_higher_priority_than_all():
    # EDF within a band can put a 55 without a deadline before a 50 without one; a
    # 50 with a deadline heads the line. Pulling the second 50 past the 55 would delay it.
    jobs = [b("a", 50), b("k", 55, key=B), b("c", 50), b("d", 58)]
    # c would pass k (55 > 50): it stays; d (58) is not passed by anything higher: it joins
    # (k at 55 is below d's 58, so the batch a+d has a member above k).
    assert form_batches(jobs, 4) == [["a", "d"], ["k"], ["c"]]


def test_a_batch_keeps_to_its_first_members_band():
    jobs = [b("final", 95), b("draft", 15), b("final2", 91)]
    assert form_batches(jobs, 4) == [["final", "final2"], ["draft"]]


def test_bad_sizes_name_the_value():
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        form_batches([b("a")], 0)
    with pytest.raises(ValueError, match="batch_marginal must be in \\(0, 1\\], got 1.5"):
        batch_seconds(10.0, 2, 1.5)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        batch_seconds(10.0, 0, 0.5)


def test_batch_seconds():
    assert batch_seconds(10.0, 1, 0.3) == 10.0
    assert batch_seconds(10.0, 4, 0.25) == pytest.approx(17.5)
    assert batch_seconds(10.0, 4, 1.0) == pytest.approx(40.0)  # no gain


def test_random_lines_keep_the_rule_and_lose_no_job():
    rng = random.Random(15)
    keys = [A, B, None]
    for _ in range(3000):
        jobs = [b(f"j{i}", rng.randint(0, 100), rng.choice(keys))
                for i in range(rng.randint(0, 10))]
        cap = rng.randint(1, 5)
        batches = form_batches(jobs, cap)
        flat = [j for batch in batches for j in batch]
        assert sorted(flat) == sorted(j.job_id for j in jobs)  # each job exactly once
        at = {j.job_id: i for i, j in enumerate(jobs)}
        pri = {j.job_id: j.priority for j in jobs}
        key = {j.job_id: j.key for j in jobs}
        heads = [batch[0] for batch in batches]
        assert heads == sorted(heads, key=at.get)  # batches go in admission order
        sent: set[str] = set()  # jobs of earlier batches: sent before this one
        for batch in batches:
            assert len(batch) <= cap
            assert len({key[j] for j in batch}) == 1
            assert len(batch) == 1 or key[batch[0]] is not None
            top = max(pri[j] for j in batch)
            # every job standing between the head and the last member but outside the batch
            # is no higher than the batch's highest member: nobody higher is passed over
            between = [j.job_id for j in jobs[at[batch[0]]:at[batch[-1]] + 1]
                       if j.job_id not in batch and j.job_id not in sent]
            assert all(pri[j] <= top for j in between), (jobs, batches)
            assert len({pri[j] // 10 for j in batch}) == 1
            sent.update(batch)


def test_a_lone_job_is_held_only_in_its_window_and_when_nobody_higher_waits():
    lone = b("a", 50)
    assert may_hold(lone, 100, 500, 4, [50, 10])
    assert not may_hold(lone, 600, 500, 4, [])  # its window is over
    assert not may_hold(lone, 0, 0, 4, [])  # batch_wait_ms 0: never held
    assert not may_hold(lone, 0, 500, 1, [])  # its variant does not batch
    assert not may_hold(b("a", 50, key=None), 0, 500, 4, [])
    assert not may_hold(lone, 0, 500, 4, [51])  # a higher job would wait behind the hold


def test_catalog_batch_fields_default_to_no_batching_and_validate():
    cat = shipped_catalog()
    for model in cat.models.values():
        assert (model.max_batch, model.batch_wait_ms, model.batch_marginal) == (1, 0, 1.0)
    models = (CONFIG / "models.yaml").read_text()
    tiers = (CONFIG / "tiers.yaml").read_text()
    anchor = "    seconds_per_step: {cpu: 0.1}\n"  # wan-toy's
    ok = parse_catalog(tiers, models.replace(anchor, anchor + "    max_batch: 4\n"
                                             "    batch_wait_ms: 200\n    batch_marginal: 0.4\n"))
    toy = ok.model("wan-toy")
    assert (toy.max_batch, toy.batch_wait_ms, toy.batch_marginal) == (4, 200, 0.4)
    should = "models.wan-toy: {}: Input should be {} (got {})"
    for field, value, words in [
        ("max_batch", 0, should.format("max_batch", "greater than or equal to 1", 0)),
        ("batch_wait_ms", -5, should.format("batch_wait_ms", "greater than or equal to 0", -5)),
        ("batch_marginal", 0, should.format("batch_marginal", "greater than 0", 0)),
        ("batch_marginal", 1.2, should.format("batch_marginal", "less than or equal to 1", 1.2)),
    ]:
        with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse_catalog(tiers, models.replace(anchor, anchor + f"    {field}: {value}\n"))


@pytest.mark.parametrize("like, free, max_batch, cap", [
    (2, 2, 4, 1),    # an idle group each: no batch
    (3, 2, 4, 2),    # three over two groups: batches of two
    (9, 2, 4, 4),    # capped by max_batch
    (5, 0, 4, 4),    # none free: the next group to free takes a full batch
    (1, 0, 8, 1),
    (6, 3, 1, 1),    # the variant does not batch
])
def test_idle_groups_are_filled_before_jobs_are_batched(like, free, max_batch, cap):
    assert batch_cap(like, free, max_batch) == cap


def test_batch_cap_refuses_nonsense_naming_the_values():
    with pytest.raises(ValueError, match="-1"):
        batch_cap(-1, 2, 4)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        batch_cap(2, 1, 0)
