"""Loading rules: every problem named by rule and reason; reachability; the shipped file."""

from __future__ import annotations

import pytest

from scheduler.catalog import PolicyError
from scheduler.rules import parse_rules
from tests.scheduler.policy_fixtures import CONFIG, shipped_catalog, shipped_rules

CAT = shipped_catalog()


def problems(text: str) -> str:
    with pytest.raises(PolicyError) as err:
        parse_rules(text, CAT, "r.yaml")
    return str(err.value)


def test_shipped_rules_load_and_hash_their_bytes():
    import hashlib

    rules = shipped_rules(CAT)
    assert [r.name for r in rules.rules][:1] == ["toy-models-on-cpu"]
    assert rules.sha256 == hashlib.sha256((CONFIG / "rules.yaml").read_bytes()).hexdigest()
    assert rules.quotas.limit("anyone", "a100") == 8
    assert rules.quotas.limit("anyone", "nowhere") is None


@pytest.mark.parametrize("route,words", [
    ("{variant: wan2.2-t2v-a14b, tier: h200}", "rule 'r1': route.tier: unknown tier 'h200'"),
    ("{variant: wan9, tier: a100}", "rule 'r1': route.variant: unknown variant 'wan9'"),
    ("{variant: wan2.2-t2v-a14b, tier: a10, degree: 1}", "has 24 GB: 63.8 GB over"),
    ("{variant: wan2.2-t2v-a14b, tier: a100, degree: 3}",
     "rule 'r1': route: degree 3 does not divide wan2.2-t2v-a14b's 40 attention heads"),
    ("{variant: wan-toy, tier: cpu, window: '22:00-30:00'}", "rule 'r1': route.window: window"),
    ("{tier: cpu}", "rule 'r1': route: names no variant, and the rule's match names no model"),
    ("{variant: wan-toy, tier: cpu, placement: everywhere}", "route.placement"),
])
def test_bad_route_is_named_with_its_reason(route, words):
    assert words in problems(f"rules:\n  - name: r1\n    match: {{track: final}}\n    route: {route}\n")


def test_fallbacks_are_checked_like_routes():
    text = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2}
    fallbacks:
      - when: {queue_longer_than: 3}
        route: {variant: wan2.2-t2v-a14b, tier: a10, degree: 4}
      - when: {}
        route: {variant: wan-toy, tier: cpu}
"""
    out = problems(text)
    assert "fallbacks.1.when: Value error, a fallback needs queue_longer_than or deadline_unmet" in out


def test_fallback_memory_is_checked():
    text = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2}
    fallbacks:
      - when: {queue_longer_than: 3}
        route: {variant: wan2.2-t2v-a14b, tier: a10, degree: 4}
"""
    assert ("rule 'finals': fallbacks[0]: no 4-rank plan fits; the smallest, tp4, needs "
            "wan2.2-t2v-a14b tp4 (resident" in problems(text))


def test_every_problem_is_listed_at_once():
    text = """rules:
  - name: a
    match: {model: [wan-toy, wan-nope]}
    route: {tier: cpu}
  - name: a
    route: {variant: wan-toy, tier: gpu9}
quotas:
  default: {h100: 4}
"""
    out = problems(text)
    assert "rule 'a': match.model: unknown variant 'wan-nope'" in out
    assert "rule 'a': the name is used twice" in out
    assert "unknown tier 'gpu9'" in out
    assert "quotas.default: unknown tier 'h100'" in out


def test_unreachable_after_a_broader_rule_and_after_a_union():
    text = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan-toy, tier: cpu}
  - name: vip-finals
    match: {track: final, priority: {min: 90}}
    route: {variant: wan-toy, tier: cpu}
  - name: drafts
    match: {track: draft}
    route: {variant: wan-toy, tier: cpu}
  - name: rest
    route: {variant: wan-toy, tier: cpu}
"""
    out = problems(text)
    assert "rule 'vip-finals': unreachable: earlier rule(s) 'finals'" in out
    assert "rule 'rest': unreachable: earlier rule(s) 'drafts', 'finals'" in out


def test_narrower_earlier_rules_leave_later_ones_reachable():
    text = """rules:
  - name: vip
    match: {priority: {min: 90}, output: {max: 832x480}}
    route: {variant: wan-toy, tier: cpu}
  - name: small
    match: {output: {max: 1280x720}, duration_s: {max: 6}}
    route: {variant: wan-toy, tier: cpu}
  - name: batches
    match: {batch: true}
    route: {variant: wan-toy, tier: cpu}
  - name: rest
    route: {variant: wan-toy, tier: cpu}
"""
    assert len(parse_rules(text, CAT).rules) == 4


def test_not_yaml_or_wrong_shape():
    assert "not valid YAML" in problems("rules: [\n")
    assert "rules: List should have at least 1 item" in problems("rules: []\n")
    assert "rules.0.match.colour: Extra inputs" in problems(
        "rules:\n  - name: x\n    match: {colour: red}\n    route: {variant: wan-toy, tier: cpu}\n")


def test_a_degree_above_the_default_quota_could_never_start():
    text = """rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2}
quotas:
  default: {a100: 1}
"""
    assert ("rule 'finals': route: degree 2 exceeds the default quota on a100 (1 GPUs)"
            in problems(text))
