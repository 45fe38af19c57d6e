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


def test_long_queue_spills_finals_to_int8_on_a10s():
    at_limit = route(JobSpec(track="final"), RULES, CAT, {"render.a100": QueueLoad(8)})
    assert at_limit.tier == "a100" and at_limit.fallback is None
    over = route(JobSpec(track="final"), RULES, CAT, {"render.a100": QueueLoad(9)})
    assert (over.variant, over.tier, over.degree, over.placement, over.fallback) == \
        ("wan2.2-t2v-a14b-int8", "a10", 4, "offload", 0)


RULES_WITH_DEADLINE = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 8}
    fallbacks:
      - when: {deadline_unmet: true}
        route: {variant: wan2.2-t2v-a14b-int8, tier: a10, degree: 4, placement: offload}
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
        route: {variant: wan2.2-t2v-a14b-int8, tier: a10, degree: 4, placement: offload}
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
    out = explain(JobSpec(track="final"), RULES, CAT, {"render.a100": QueueLoad(20)})
    verdicts = {v["rule"]: v for v in out.verdicts}
    assert verdicts["toy-models-on-cpu"]["why_not"].startswith("model is None")
    assert verdicts["overnight-final-batches"]["why_not"] == "batch is false, rule wants true"
    assert verdicts["finals"]["spills"] == [{"fallback": 0, "taken": True, "because":
                                             "queue render.a100 has 20 jobs waiting (> 8)"}]
    assert "drafts" not in verdicts  # first match wins: later rules are not consulted
    assert out.route["tier"] == "a10"
    assert out.memory.startswith("wan2.2-t2v-a14b-int8 at degree 4 (offload, tp4, 1280x720): "
                                 "weights 3.5 + encoders 11.6")
    # Only tp4 fits four 24 GB cards: the others keep whole weights on every rank.
    assert [p["plan"] for p in out.parallel_plans if p["fits"]] == ["tp4"]
    assert out.rules_sha256 == RULES.sha256
