"""Admission order: priority, ties to the oldest, tier capacity and project quotas."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from scheduler.admission import (
    Holding, TierSize, Waiting, groups_for, queue_order, select_for_release,
)
from scheduler.rules import Quotas

T0 = datetime(2026, 11, 21, 22, 0, tzinfo=timezone.utc)
A100 = TierSize(nodes=2, gpus_per_node=8)


def job(job_id, priority=50, age_s=0, project="p", tier="a100", degree=2, groups=1):
    return Waiting(job_id, project, tier, degree, priority, T0 - timedelta(seconds=age_s),
                   groups)


def test_priority_first_then_the_oldest():
    jobs = [job("new-high", 90, 1), job("old-low", 10, 100), job("old-high", 90, 50),
            job("mid", 50, 10)]
    assert [j.job_id for j in queue_order(jobs)] == ["old-high", "new-high", "mid", "old-low"]


def test_capacity_in_gpus_and_head_of_line_blocking():
    waiting = [job("a", 90, degree=8), job("b", 80, degree=8), job("c", 70, degree=2)]
    out = select_for_release(waiting, [Holding("q", "a100", 4)], {"a100": A100}, Quotas())
    # Two nodes of 8, one with 4 held: a (8) takes the free node; b (8) finds no node;
    # c (2) would fit but must not overtake b.
    assert out.released == ("a",)
    assert out.held["b"] == ("tier a100 has no room for 1 group(s) of 8 GPUs "
                             "(free per node: [4, 0])")
    assert out.held["c"] == "behind job b on tier a100"
    assert out.blocked == {"a100": "b"}  # a caller reading page by page stops here (#14)
    # Held for quota only, the line is not blocked: the next page may still go.
    quota = select_for_release([job("d", degree=2)], [Holding("p", "a100", 2)],
                               {"a100": A100}, Quotas(default={"a100": 2}))
    assert quota.released == () and "d" in quota.held and quota.blocked == {}


def test_a_group_never_spans_nodes():
    # 2 nodes x 8 GPUs: two degree-5 groups fit, a third does not though 6 GPUs are free.
    out = select_for_release([job(f"j{i}", degree=5, age_s=-i) for i in range(3)], [],
                             {"a100": A100}, Quotas())
    assert out.released == ("j0", "j1") and "free per node: [3, 3]" in out.held["j2"]


def test_jobs_that_can_never_run_are_reported_not_left_blocking():
    quotas = Quotas(default={"a100": 1})
    out = select_for_release([job("too-wide", degree=16), job("over-quota", degree=2),
                              job("lost", tier="h100")], [], {"a100": A100}, quotas)
    assert out.impossible == {
        "too-wide": "tier 'a100' has no node with 16 GPUs",
        "over-quota": "project p's quota on a100 is 1 GPUs; the job needs 2",
        "lost": "tier 'h100' is not declared"}
    assert out.released == () and out.held == {}


def test_tiers_are_independent_lines():
    waiting = [job("big", 90, degree=8, tier="a100"), job("draft", 10, tier="a10", degree=1)]
    out = select_for_release(waiting, [Holding("q", "a100", 8), Holding("q", "a100", 8)],
                             {"a100": A100, "a10": TierSize(1, 4)}, Quotas())
    assert out.released == ("draft",)


def test_a_project_jumps_the_queue_only_within_its_quota():
    quotas = Quotas(default={"a100": 4}, projects={"studio": {"a100": 8}})
    waiting = [job(f"s{i}", 100, age_s=10 - i, project="studio") for i in range(5)]
    waiting += [job(f"o{i}", 10, age_s=10 - i, project="other") for i in range(3)]
    out = select_for_release(waiting, [], {"a100": A100}, quotas)
    # studio's priority-100 jobs take its 8 GPUs (4 jobs of 2); its fifth waits on its quota
    # and does not block the tier: other's priority-10 jobs go, up to other's 4 GPUs.
    assert out.released == ("s0", "s1", "s2", "s3", "o0", "o1")
    assert out.held["s4"] == "project studio holds 8 of its 8 GPUs on a100; needs 2"
    assert out.held["o2"] == "project other holds 4 of its 4 GPUs on a100; needs 2"


def test_quota_counts_what_the_project_already_holds():
    quotas = Quotas(default={"a100": 4})
    out = select_for_release([job("x", 100)], [Holding("p", "a100", 4)], {"a100": A100}, quotas)
    assert out.released == () and "holds 4 of its 4" in out.held["x"]
    out = select_for_release([job("x", 100)], [Holding("p", "a100", 2)], {"a100": A100}, quotas)
    assert out.released == ("x",)


def test_a_tier_holds_as_many_groups_as_its_nodes_pack():
    assert A100.groups(2) == 8 and A100.groups(3) == 4 and A100.groups(8) == 2
    assert TierSize(nodes=1, gpus_per_node=2).groups(1) == 2


def test_groups_for_a_job_follow_its_runnable_segments_the_pool_and_the_quota():
    assert groups_for(runnable=5, pool=4, degree=2, quota=None) == 4
    assert groups_for(runnable=1, pool=4, degree=2, quota=None) == 1
    assert groups_for(runnable=5, pool=4, degree=2, quota=6) == 3
    assert groups_for(runnable=0, pool=4, degree=2, quota=None) == 1


def test_a_job_of_independent_segments_takes_a_group_per_segment_on_any_node():
    # 8 A100s at degree 2: four groups a node. A job of 6 segments takes 6 groups (4 + 2),
    # so the next job of 3 finds only 2 left and waits; one of 2 fits in what remains.
    out = select_for_release([job("wide", 90, groups=6), job("three", 80, groups=3),
                              job("two", 70, groups=2)], [], {"a100": A100}, Quotas())
    assert out.released == ("wide",)
    assert "no room for 3 group(s) of 2 GPUs (free per node: [0, 4])" in out.held["three"]
    assert out.held["two"] == "behind job three on tier a100"


def test_held_groups_count_against_the_tier():
    # Two jobs hold 7 groups of 2 (14 GPUs); one group is left.
    holding = [Holding("p", "a100", 2, groups=4), Holding("p", "a100", 2, groups=3)]
    out = select_for_release([job("a", groups=1, age_s=2), job("b", groups=1, age_s=1)],
                             holding, {"a100": A100}, Quotas())
    assert out.released == ("a",) and "free per node: [0, 0]" in out.held["b"]


def test_earliest_deadline_first_within_a_band_never_across_bands():
    """Issue #15: within a priority band the earliest deadline goes first, jobs without one
    after; a higher band always goes first, deadline or not."""
    def due(job_id, priority, in_s=None, age_s=0):
        deadline = None if in_s is None else T0 + timedelta(seconds=in_s)
        return Waiting(job_id, "p", "a100", 2, priority, T0 - timedelta(seconds=age_s),
                       deadline_at=deadline)

    jobs = [due("final-no-deadline", 95, age_s=100), due("final-late", 91, 600),
            due("final-soon", 90, 60), due("batch-very-soon", 50, 5), due("draft-80", 80),
            due("batch-none", 59, age_s=50)]
    assert [j.job_id for j in queue_order(jobs)] == [
        "final-soon", "final-late", "final-no-deadline", "draft-80", "batch-very-soon",
        "batch-none"]


def test_a_batch_takes_one_group_so_more_like_jobs_fit():
    cpu = {"cpu": TierSize(nodes=1, gpus_per_node=2)}
    waiting = [job(f"j{i}", 50, age_s=10 - i, tier="cpu", degree=1) for i in range(5)]
    solo = select_for_release(waiting, [], cpu, Quotas())
    assert solo.released == ("j0", "j1") and solo.blocked == {"cpu": "j2"}
    out = select_for_release(waiting, [], cpu, Quotas(), batches=[["j0", "j1", "j2"], ["j3"]])
    # the batch j0+j1+j2 on one group, j3 alone on the other, j4 finds no room
    assert out.released == ("j0", "j1", "j2", "j3")
    assert out.batches == (("j0", "j1", "j2"),)
    assert out.blocked == {"cpu": "j4"}


def test_a_batch_that_finds_no_room_blocks_the_line_with_all_its_members():
    cpu = {"cpu": TierSize(nodes=1, gpus_per_node=1)}
    waiting = [job("a", 50, 3, tier="cpu", degree=1), job("b", 50, 2, tier="cpu", degree=1),
               job("c", 40, 1, tier="cpu", degree=1)]
    out = select_for_release(waiting, [Holding("q", "cpu", 1)], cpu, Quotas(),
                             batches=[["a", "b"]])
    assert out.released == () and out.blocked == {"cpu": "a"}
    assert "no room" in out.held["a"] and "no room" in out.held["b"]
    assert out.held["c"] == "behind job a on tier cpu"


def test_a_batch_counts_its_group_against_every_project_riding_in_it():
    cpu = {"cpu": TierSize(nodes=1, gpus_per_node=4)}
    waiting = [job("a", 50, 3, project="p", tier="cpu", degree=1),
               job("b", 50, 2, project="q", tier="cpu", degree=1),
               job("c", 50, 1, project="p", tier="cpu", degree=1)]
    quotas = Quotas(projects={"q": {"cpu": 1}})
    # q holds its one GPU: b cannot ride in a's group; it stays for its own turn (held
    # there for its quota), and c, of a's project, rides
    out = select_for_release(waiting, [Holding("q", "cpu", 1)], cpu, quotas,
                             batches=[["a", "b", "c"]])
    assert out.released == ("a", "c") and out.batches == (("a", "c"),)
    assert "project q holds 1 of its 1 GPUs" in out.held["b"]
    assert out.blocked == {}  # a quota hold never blocks the line
    free = select_for_release(waiting, [], cpu, quotas, batches=[["a", "b", "c"]])
    assert free.released == ("a", "b", "c") and free.batches == (("a", "b", "c"),)
    # the head over its own quota: nothing of the batch goes with it; the others go alone
    full = select_for_release(waiting, [Holding("p", "cpu", 1)], cpu,
                              Quotas(projects={"p": {"cpu": 1}}),
                              batches=[["a", "b", "c"]])
    assert full.released == ("b",) and "project p holds 1" in full.held["c"]


def test_a_held_lone_job_reserves_its_group_without_blocking_the_line():
    cpu = {"cpu": TierSize(nodes=1, gpus_per_node=2)}
    waiting = [job("lone", 50, 2, tier="cpu", degree=1), job("other", 40, 1, tier="cpu", degree=1),
               job("third", 40, 0, tier="cpu", degree=1)]
    out = select_for_release(waiting, [], cpu, Quotas(), hold={"lone"})
    assert out.released == ("other",) and "reserved" in out.held["lone"]
    assert out.blocked == {"cpu": "third"}  # lone's group stays reserved for its batch


def test_a_batched_render_held_counts_one_group_against_every_project_in_it():
    cpu = {"cpu": TierSize(nodes=1, gpus_per_node=2)}
    batch = Holding("p", "cpu", 1, 1, ("q",))
    out = select_for_release([job("a", project="q", tier="cpu", degree=1)], [batch], cpu,
                             Quotas(projects={"q": {"cpu": 1}}))
    assert out.released == () and "project q holds 1 of its 1 GPUs" in out.held["a"]
    free = select_for_release([job("a", project="r", tier="cpu", degree=1)], [batch], cpu,
                              Quotas())
    assert free.released == ("a",)  # the batch holds one group of the two
