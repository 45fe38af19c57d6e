"""Routing decisions: matching, explicit models, fallbacks on queue length and deadlines."""

from __future__ import annotations

import pytest

from scheduler.routing import JobSpec, NoRoute, QueueLoad, explain, mismatch, route
from scheduler.rules import parse_rules
from tests.scheduler.policy_fixtures import shipped_catalog, shipped_rules

CAT = shipped_catalog()
RULES = shipped_rules(CAT)


def test_shipped_rules_send_drafts_finals_and_the_toy_model_where_the_issue_says():
    draft = route(JobSpec(track="draft"), RULES, CAT)
    assert (draft.variant, draft.tier, draft.degree, draft.queue) == \
        ("wan2.2-ti2v-5b", "a10", 1, "render.a10")
    final = route(JobSpec(track="final"), RULES, CAT)
    assert (final.variant, final.tier, final.degree, final.rule) == \
        ("wan2.2-t2v-a14b", "a100", 2, "finals")
    toy = route(JobSpec(track="final", model="wan-toy"), RULES, CAT)
    assert (toy.variant, toy.tier, toy.queue) == ("wan-toy", "cpu", "render.cpu")
    night = route(JobSpec(track="final", batch=True), RULES, CAT)
    assert (night.rule, night.window, night.timezone) == ("overnight-final-batches",
                                                          "22:00-06:00", "UTC")


def test_a_named_model_runs_that_model():
    assert route(JobSpec(track="draft", model="wan2.2-t2v-a14b"), RULES, CAT).variant == \
        "wan2.2-t2v-a14b"
    assert route(JobSpec(track="final", model="wan2.2-ti2v-5b"), RULES, CAT).tier == "a10"


def test_finals_that_would_be_late_spill_to_the_light_model_on_an_a10():
    in_time = route(JobSpec(track="final", deadline_s=3600), RULES, CAT)
    assert in_time.tier == "a100" and in_time.fallback is None
    # 40 steps x 68.4 s / (2 x 0.85) = 1609 s on the a100s: past a 600 s deadline.
    late = route(JobSpec(track="final", deadline_s=600), RULES, CAT)
    assert (late.variant, late.tier, late.degree, late.rule, late.fallback) == \
        ("wan2.2-ti2v-5b", "a10", 1, "finals", 0)
    # A long queue alone does not: finals wait for the full model.
    assert route(JobSpec(track="final"), RULES, CAT, {"render.a100": QueueLoad(50)}).tier == \
        "a100"


RULES_WITH_DEADLINE = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 8}
    fallbacks:
      - when: {deadline_unmet: true}
        route: {variant: wan2.2-ti2v-5b, tier: a10, degree: 4}
      - when: {queue_longer_than: 0}
        route: {variant: wan-toy, tier: cpu}
"""


def test_deadline_fallback_uses_backlog_and_render_estimate():
    rules = parse_rules(RULES_WITH_DEADLINE, CAT)
    job = JobSpec(track="final", frames=81, steps=40, deadline_s=3600)
    first = route(job, rules, CAT)
    # 40 steps x 68.4 s / (8 x 0.85) = 402 s on an empty a100 tier: in time.
    assert first.tier == "a100" and first.est_seconds == pytest.approx(402.4, abs=0.1)
    # 16 GPUs with 64,000 GPU-seconds ahead: 4,000 s of queue, too late.
    late = route(job, rules, CAT, {"render.a100": QueueLoad(3, 64_000.0)})
    assert (late.tier, late.fallback) == ("a10", 0)
    # A chain: the a10 queue is not empty either, so the next fallback applies.
    chained = route(job, rules, CAT, {"render.a100": QueueLoad(3, 64_000.0),
                                      "render.a10": QueueLoad(1)})
    assert (chained.variant, chained.fallback) == ("wan-toy", 1)
    assert route(JobSpec(track="final"), rules, CAT, {"render.a100": QueueLoad(0, 1e9)}).tier \
        == "a100"  # no deadline: never late


def test_a_later_fallback_applies_when_an_earlier_one_does_not():
    rules = parse_rules("""rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 8}
    fallbacks:
      - when: {queue_longer_than: 8}
        route: {variant: wan2.2-ti2v-5b, tier: a10, degree: 4}
      - when: {deadline_unmet: true}
        route: {variant: wan-toy, tier: cpu}
""", CAT)
    job = JobSpec(track="final", deadline_s=60)  # 402 s of rendering: late even on an empty tier
    chosen = route(job, rules, CAT)
    assert (chosen.variant, chosen.fallback) == ("wan-toy", 1)
    verdicts = explain(job, rules, CAT).verdicts[0]["spills"]
    assert [s["taken"] for s in verdicts] == [False, True]


@pytest.mark.parametrize("job,words", [
    (JobSpec(track="draft"), "track is 'draft'"),
    (JobSpec(track="final", project="b"), "project is 'b'"),
    (JobSpec(track="final", project="a", priority=10), "priority 10 is outside 50.."),
    (JobSpec(track="final", project="a", frames=161, fps=16), "duration 10.0625s is outside ..10"),
    (JobSpec(track="final", project="a", width=1920, height=1088), "output 1920x1088 is outside"),
    (JobSpec(track="final", project="a", batch=True), "batch is true, rule wants false"),
])
def test_mismatch_says_which_field(job, words):
    rules = parse_rules("""rules:
  - name: r
    match: {track: final, project: a, priority: {min: 50}, duration_s: {max: 10},
            output: {max: 1280x720}, batch: false}
    route: {variant: wan-toy, tier: cpu}
""", CAT)
    assert words in mismatch(rules.rules[0].match, job)
    with pytest.raises(NoRoute, match="no routing rule matches the job"):
        route(job, rules, CAT)
    assert route(JobSpec(track="final", project="a", frames=81), rules, CAT).rule == "r"


def test_explain_lists_every_rule_and_the_memory_arithmetic():
    out = explain(JobSpec(track="final", deadline_s=600), RULES, CAT)
    verdicts = {v["rule"]: v for v in out.verdicts}
    assert verdicts["toy-models-on-cpu"]["why_not"].startswith("model is None")
    assert verdicts["overnight-final-batches"]["why_not"] == "batch is false, rule wants true"
    assert verdicts["finals"]["spills"] == [{"fallback": 0, "taken": True, "because":
                                             "deadline 600s cannot be met on a100: about 0s "
                                             "of queue + 1609s render"}]
    assert "drafts" not in verdicts  # first match wins: later rules are not consulted
    assert out.route["tier"] == "a10"
    assert out.memory == ("wan2.2-ti2v-5b single (resident, 1280x704 x 121 frames): weights "
                          "10.0 + encoders 1.4 + activations 10.0 + overhead 1.5 = 22.9 GB per "
                          "GPU; tier a10 has 24 GB")
    assert [p["plan"] for p in out.parallel_plans if p["fits"]] == ["single"]
    assert out.rules_sha256 == RULES.sha256


def test_explain_shows_the_plans_the_chosen_one_came_from():
    rules = parse_rules("""rules:
  - name: finals
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 4}
""", CAT)
    out = explain(JobSpec(track="final"), rules, CAT)
    plans = {p["plan"]: p for p in out.parallel_plans}
    # Only tp shards the weights: 14 GB a rank for tp4, whole 56 GB for sp4.
    assert (plans["tp4"]["memory_gb"], plans["sp4"]["memory_gb"]) == (31.78, 73.77)
    # All four fit 80 GB; sp2+cfg2 moves the fewest bytes a step.
    assert out.route["parallel"] == "sp2+cfg2" and out.route["memory_gb"] == \
        plans["sp2+cfg2"]["memory_gb"] == 78.45
    assert out.memory.startswith("wan2.2-t2v-a14b sp2+cfg2 (resident, 1280x720 x 81 frames)")
