"""Derived variants in the catalog (issue #12): the overlay, and tracks in routing."""

from __future__ import annotations

import pytest
import yaml

from scheduler.catalog import PolicyError, parse_catalog
from scheduler.routing import JobSpec, NoRoute, base_of, route
from scheduler.rules import parse_rules
from tests.scheduler.policy_fixtures import CONFIG

TIERS = (CONFIG / "tiers.yaml").read_text()
MODELS = (CONFIG / "models.yaml").read_text()
RULES = (CONFIG / "rules.yaml").read_text()


def toy_derivative(**changes) -> dict:
    """A derived toy entry, as `farm models derive` writes one (farm/variants.py)."""
    base = yaml.safe_load(MODELS)["models"]["wan-toy"]
    entry = {**base, "folder": "/somewhere/wan-toy-4step", "derived_from": "wan-toy",
             "default_steps": 4, "guidance": {"high": 1.0, "low": 1.0}}
    entry.pop("bundled", None)
    entry.update(changes)
    return entry


def catalog_with(*overlays: dict):
    return parse_catalog(TIERS, MODELS, overlays=tuple(
        (yaml.safe_dump(o), f"overlay{i}.yaml") for i, o in enumerate(overlays)))


def test_an_overlay_adds_a_variant_and_gives_the_base_a_track():
    cat = catalog_with({"models": {"wan-toy-4step": toy_derivative(),
                                   "wan-toy": {"tracks": {"draft": "wan-toy-4step"}}}})
    assert cat.models["wan-toy-4step"].derived_from == "wan-toy"
    assert cat.models["wan-toy"].tracks == {"draft": "wan-toy-4step"}
    assert cat.models["wan-toy"].default_steps == 20  # the rest of the base is untouched


def test_overlay_errors_name_the_file_entry_and_value():
    with pytest.raises(PolicyError, match=r"overlay0.yaml: models.wan-toy: a variant of the "
                                          r"models file may only get tracks here"):
        catalog_with({"models": {"wan-toy": {"default_steps": 4}}})
    with pytest.raises(PolicyError, match=r"models.wan-toy.tracks.draft: unknown variant "
                                          r"'nope'"):
        catalog_with({"models": {"wan-toy": {"tracks": {"draft": "nope"}}}})
    with pytest.raises(PolicyError, match=r"models.x.derived_from: unknown variant 'gone'"):
        catalog_with({"models": {"x": toy_derivative(derived_from="gone")}})
    with pytest.raises(PolicyError, match=r"quantize_on_load.*'int4'"):
        catalog_with({"models": {"x": toy_derivative(quantize_on_load="int4")}})


def test_a_later_overlay_replaces_an_earlier_ones_entry():
    cat = catalog_with({"models": {"v": toy_derivative(default_steps=4)}},
                       {"models": {"v": toy_derivative(default_steps=8)}})
    assert cat.models["v"].default_steps == 8


def test_a_track_renders_the_bases_light_variant_and_the_other_track_the_base():
    cat = catalog_with({"models": {"wan-toy-4step": toy_derivative(),
                                   "wan-toy": {"tracks": {"draft": "wan-toy-4step"}}}})
    rules = parse_rules(RULES, cat)
    draft = route(JobSpec(track="draft", model="wan-toy"), rules, cat)
    assert (draft.variant, draft.track_of, draft.tier) == ("wan-toy-4step", "wan-toy", "cpu")
    final = route(JobSpec(track="final", model="wan-toy"), rules, cat)
    assert (final.variant, final.track_of) == ("wan-toy", None)
    # 4 steps, not 20: the light variant's estimate is its own.
    assert draft.est_seconds < final.est_seconds


def test_a_named_derived_variant_matches_its_bases_rules():
    cat = catalog_with({"models": {"wan-toy-4step": toy_derivative(),
                                   "wan-toy-4step-int8": toy_derivative(
                                       derived_from="wan-toy-4step")}})
    rules = parse_rules(RULES, cat)
    assert base_of("wan-toy-4step-int8", cat) == "wan-toy"
    chosen = route(JobSpec(track="final", model="wan-toy-4step-int8"), rules, cat)
    assert (chosen.variant, chosen.rule) == ("wan-toy-4step-int8", "toy-models-on-cpu")


def test_a_light_variant_that_does_not_fit_the_tier_leaves_the_rules_own_choice():
    huge = toy_derivative(params_b=500.0)  # 500 B parameters: no cpu slot holds it
    cat = catalog_with({"models": {"huge": huge, "wan-toy": {"tracks": {"draft": "huge"}}}})
    rules = parse_rules(RULES, cat)
    chosen = route(JobSpec(track="draft", model="wan-toy"), rules, cat)
    assert (chosen.variant, chosen.track_of) == ("wan-toy", None)
    with pytest.raises(NoRoute):
        route(JobSpec(track="draft", model="huge"), rules, cat)


def test_a_rules_step_cache_travels_on_the_route_and_a_bad_one_is_named():
    cat = catalog_with()
    text = RULES.replace("route: {tier: cpu, degree: 1}",
                         "route: {tier: cpu, degree: 1, cache: {kind: first_block, "
                         "threshold: 0.05}}")
    assert text != RULES
    chosen = route(JobSpec(model="wan-toy"), parse_rules(text, cat), cat)
    assert chosen.cache == {"kind": "first_block", "threshold": 0.05}
    bad = text.replace("first_block", "second_block")
    with pytest.raises(PolicyError, match=r"cache.kind 'second_block'"):
        parse_rules(bad, cat)


def test_the_shipped_policy_sends_drafts_to_derived_variants_and_finals_to_their_bases():
    """scheduler/config/variants.yaml over models.yaml: `--model auto` drafts reach the 5B's
    int8 variant, toy drafts the shipped 4-step int8 student; finals keep the bases."""
    from farm.policy import load_policy

    policy = load_policy()
    cat, rules = policy.catalog, policy.rules
    auto = route(JobSpec(track="draft"), rules, cat)
    assert (auto.variant, auto.track_of, auto.rule) == \
        ("wan2.2-ti2v-5b-int8", "wan2.2-ti2v-5b", "drafts")
    assert cat.models[auto.variant].quantize_on_load == "int8-weight"
    assert cat.models[auto.variant].folder == cat.models["wan2.2-ti2v-5b"].folder
    toy = route(JobSpec(track="draft", model="wan-toy", width=32, height=32, frames=17),
                rules, cat)
    assert (toy.variant, toy.track_of) == ("wan-toy-draft", "wan-toy")
    assert cat.models["wan-toy-draft"].default_steps == 4
    assert base_of("wan-toy-draft", cat) == "wan-toy"  # via wan-toy-4step
    final = route(JobSpec(track="final"), rules, cat)
    assert (final.variant, final.track_of) == ("wan2.2-t2v-a14b", None)
    toy_final = route(JobSpec(track="final", model="wan-toy"), rules, cat)
    assert (toy_final.variant, toy_final.track_of) == ("wan-toy", None)


def test_a_quantized_light_variant_is_skipped_on_an_offload_route():
    """The actor refuses quantized experts in the offload placement (workers/actor.py), so
    routing keeps the rule's own variant there rather than send a job that must fail."""
    for quantized in ({"quantized": "int8-weight"}, {"quantize_on_load": "int8-dynamic"}):
        cat = catalog_with({"models": {"light": toy_derivative(**quantized),
                                       "wan-toy": {"tracks": {"draft": "light"}}}})
        offload = RULES.replace("route: {tier: cpu, degree: 1}",
                                "route: {tier: cpu, degree: 1, placement: offload}")
        assert offload != RULES
        chosen = route(JobSpec(track="draft", model="wan-toy"), parse_rules(offload, cat), cat)
        assert (chosen.variant, chosen.track_of, chosen.placement) == ("wan-toy", None, "offload")
        resident = route(JobSpec(track="draft", model="wan-toy"), parse_rules(RULES, cat), cat)
        assert (resident.variant, resident.track_of) == ("light", "wan-toy")


def test_the_rules_step_cache_stays_with_the_rules_own_variant():
    """A cache tuned for the 20-step base is not applied to its 4-step draft student."""
    cat = catalog_with({"models": {"wan-toy-4step": toy_derivative(),
                                   "wan-toy": {"tracks": {"draft": "wan-toy-4step"}}}})
    text = RULES.replace("route: {tier: cpu, degree: 1}",
                         "route: {tier: cpu, degree: 1, cache: {kind: first_block, "
                         "threshold: 0.1}}")
    rules = parse_rules(text, cat)
    draft = route(JobSpec(track="draft", model="wan-toy"), rules, cat)
    final = route(JobSpec(track="final", model="wan-toy"), rules, cat)
    assert (draft.variant, draft.cache) == ("wan-toy-4step", None)
    assert (final.variant, final.cache) == ("wan-toy", {"kind": "first_block", "threshold": 0.1})
