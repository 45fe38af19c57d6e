"""Who yields a group to an urgent job (issue #15, item 1): made-up priorities and GPUs."""

from __future__ import annotations

import random

import pytest

from scheduler.catalog import PolicyError
from scheduler.preemption import Running, choose_victims, qualifies, why_not_eligible
from scheduler.rules import parse_rules
from scheduler.routing import JobSpec, route
from tests.scheduler.policy_fixtures import CONFIG, shipped_catalog


def seg(sid, priority, gpus=2, preemptions=0, started=0.0, requested=False):
    return Running(sid, f"job-{sid}", priority, gpus, preemptions, started, requested)


def choose(urgent, need, free, running, preempt_at=90, margin=20, max_preemptions=2):
    return [s.segment_id for s in choose_victims(urgent, need, free, running, preempt_at,
                                                 margin, max_preemptions)]


def test_lowest_priority_first_then_the_most_recently_started():
    running = [seg(1, 50, started=10), seg(2, 10, started=5), seg(3, 10, started=20),
               seg(4, 60, started=30)]
    assert choose(95, 2, 0, running) == [3]  # priority 10, started last
    assert choose(95, 4, 0, running) == [3, 2]
    assert choose(95, 6, 0, running) == [3, 2, 1]
    assert choose(95, 8, 0, running) == [3, 2, 1, 4]


def test_a_job_below_preempt_at_or_a_route_without_it_never_preempts():
    running = [seg(1, 10)]
    assert choose(89, 2, 0, running, preempt_at=90) == []
    assert choose(90, 2, 0, running, preempt_at=90) == [1]
    assert choose(100, 2, 0, running, preempt_at=None) == []
    assert qualifies(0, 0) and not qualifies(99, None)


def test_the_margin_protects_work_of_nearly_the_same_priority():
    running = [seg(1, 75), seg(2, 71), seg(3, 70)]
    # urgent 90, margin 20: only priority <= 70 may yield
    assert choose(90, 2, 0, running) == [3]
    assert choose(90, 4, 0, running) == []  # 71 and 75 are too close: no partial set
    assert choose(90, 4, 0, running, margin=15) == [3, 2]
    assert "not 20 below 90" in why_not_eligible(running[1], 90, 20, 2)


def test_a_segment_yields_at_most_max_preemptions_times():
    running = [seg(1, 10, preemptions=2), seg(2, 30, preemptions=1)]
    assert choose(95, 2, 0, running, max_preemptions=2) == [2]
    assert choose(95, 2, 0, running, max_preemptions=1) == []
    assert "FARM_MAX_PREEMPTIONS" in why_not_eligible(running[0], 95, 20, 2)


def test_free_and_already_requested_gpus_count_before_asking_more():
    running = [seg(1, 10, requested=True), seg(2, 20)]
    assert choose(95, 2, 2, running) == []  # the tier has room: nothing to preempt
    assert choose(95, 2, 0, running) == []  # segment 1 is already yielding its 2 GPUs
    assert choose(95, 4, 0, running) == [2]  # 2 coming from segment 1, 2 more from 2
    assert choose(95, 3, 1, [seg(2, 20)]) == [2]  # 1 free + 2 freed
    assert choose(95, 4, 1, [seg(2, 20)]) == []  # 3 of 4: nobody is asked in vain
    assert why_not_eligible(running[0], 95, 20, 2) == "already asked to yield"


def test_no_partial_set_when_the_eligible_ones_cannot_free_enough():
    running = [seg(1, 10, gpus=1), seg(2, 80, gpus=8)]
    assert choose(95, 4, 1, running) == []  # 1 free + 1 eligible < 4


def test_bad_arguments_name_the_field_and_value():
    with pytest.raises(ValueError, match="preempt_margin must be >= 1, got 0"):
        choose(95, 2, 0, [], margin=0)
    with pytest.raises(ValueError, match="need_gpus must be >= 1, got 0"):
        choose(95, 0, 0, [])


def test_random_tiers_keep_every_promise():
    rng = random.Random(15)
    for _ in range(2000):
        running = [seg(i, rng.randint(0, 100), rng.choice([1, 2, 4]), rng.randint(0, 3),
                       rng.random() * 100, rng.random() < 0.2) for i in range(rng.randint(0, 8))]
        urgent, need, free = rng.randint(0, 100), rng.choice([1, 2, 4, 8]), rng.randint(0, 3)
        margin, cap, at = rng.randint(1, 40), rng.randint(0, 3), rng.choice([None, 50, 90])
        chosen = choose_victims(urgent, need, free, running, at, margin, cap)
        if not chosen:
            continue
        coming = free + sum(s.gpus for s in running if s.requested)
        assert at is not None and urgent >= at and coming < need
        assert all(s.priority <= urgent - margin and s.preemptions < cap and not s.requested
                   for s in chosen)
        assert coming + sum(s.gpus for s in chosen) >= need
        # minimal prefix: without the last one it would not be enough
        assert coming + sum(s.gpus for s in chosen[:-1]) < need
        # nobody lower than a chosen one (or as low and started later) was passed over
        eligible = [s for s in running if why_not_eligible(s, urgent, margin, cap) is None]
        worst = chosen[-1]
        for other in set(eligible) - set(chosen):
            assert (other.priority, -other.started) >= (worst.priority, -worst.started)


RULES = """
version: 1
rules:
  - name: urgent-toy
    match: {model: [wan-toy], priority: {min: 90}}
    route: {tier: cpu, preempt_at: 90, preempt_margin: 30}
  - name: toy
    match: {model: [wan-toy]}
    route: {tier: cpu}
"""


def test_rules_carry_preempt_fields_into_the_route():
    cat = shipped_catalog()
    rules = parse_rules(RULES, cat)
    job = JobSpec(track="draft", width=32, height=32, frames=17, priority=95, model="wan-toy")
    urgent = route(job, rules, cat).as_dict()
    assert (urgent["preempt_at"], urgent["preempt_margin"]) == (90, 30)
    plain = route(JobSpec(track="draft", width=32, height=32, frames=17, priority=50,
                          model="wan-toy"), rules, cat).as_dict()
    assert (plain["preempt_at"], plain["preempt_margin"]) == (None, 20)


@pytest.mark.parametrize("field,value,words", [
    ("preempt_at", 101, "preempt_at: Input should be less than or equal to 100 (got 101)"),
    ("preempt_at", -1, "preempt_at: Input should be greater than or equal to 0 (got -1)"),
    ("preempt_margin", 0, "preempt_margin: Input should be greater than or equal to 1 (got 0)"),
])
def test_bad_preempt_fields_name_the_field_and_value(field, value, words):
    text = RULES.replace("preempt_at: 90, preempt_margin: 30", f"{field}: {value}")
    with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_rules(text, shipped_catalog())


def test_shipped_finals_preempt_from_90_and_nothing_else_does():
    """The studio default chosen for issue #15: a final of priority >= 90 preempts work at
    least 20 below it (overnight batches, drafts at <= 70); no other shipped rule preempts."""
    cat = shipped_catalog()
    rules = parse_rules((CONFIG / "rules.yaml").read_text(), cat)
    by_name = {r.name: r for r in rules.rules}
    assert (by_name["finals"].route.preempt_at, by_name["finals"].route.preempt_margin) == (90, 20)
    others = [r.name for r in rules.rules if r.name != "finals" and r.route.preempt_at is not None]
    assert others == []
