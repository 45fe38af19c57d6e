"""Bytes per step of each parallel plan for A14B at 720P x 81 frames, and the default."""

from __future__ import annotations

import pytest

from scheduler.catalog import PolicyError
from scheduler.memory import NoFittingPlan, choose_plan, plan_memory, plan_table
from scheduler.parallel_cost import Plan, bytes_per_step, candidate_plans, parse_plan
from scheduler.rules import parse_rules
from scheduler.routing import JobSpec, route
from tests.scheduler.policy_fixtures import shipped_catalog

CAT = shipped_catalog()
A14B = CAT.model("wan2.2-t2v-a14b")


def test_a14b_720p_is_75600_tokens():
    assert A14B.tokens(1280, 720, 81) == 75_600  # 21 x 45 x 80 patches of (1, 2, 2)


def test_bytes_per_step_from_the_arithmetic():
    layer = 75_600 * 5120 * 2  # one S x D activation in bf16: 774 MB
    tp2 = bytes_per_step(A14B, Plan(tp=2), 1280, 720, 81)
    assert tp2 == pytest.approx(2 * 40 * 3 * layer * 2 * 1 / 2)  # 2 passes, 3 all-reduces
    sp2 = bytes_per_step(A14B, Plan(sp=2), 1280, 720, 81)
    assert sp2 == pytest.approx(2 * (40 * 4 * layer / 2 / 2 + 75_600 * 16 * 4 * 2 / 2))
    cfg2 = bytes_per_step(A14B, Plan(cfg=2), 1280, 720, 81)
    assert cfg2 == 16 * 21 * 90 * 160 * 2  # one all-gather of the latent: 9.7 MB
    assert cfg2 < sp2 < tp2


def test_the_default_is_the_cheapest_plan_that_fits():
    a100 = CAT.tier("a100")
    # Resident experts (56 GB of weights) leave no room for cfg2 on 80 GB: sp2 it is.
    plan, need = choose_plan(CAT, A14B, a100, 2, "resident")
    assert plan == Plan(sp=2) and need.total_gb == pytest.approx(56 + 11.6 + 18.7 / 2 + 1.5)
    rows = plan_table(CAT, A14B, a100, 2, "resident")
    assert {r["plan"]: r["fits"] for r in rows} == {"tp2": True, "sp2": True, "cfg2": False}
    # With the inactive expert offloaded, each CFG half fits: 9.7 MB a step instead of 62 GB.
    assert choose_plan(CAT, A14B, a100, 2, "offload")[0] == Plan(cfg=2)
    assert choose_plan(CAT, A14B, a100, 8, "resident")[0] == Plan(sp=4, cfg=2)
    assert plan_memory(CAT, A14B, Plan(tp=4), "resident").total_gb == pytest.approx(
        56 / 4 + 11.6 + 18.7 / 4 + 1.5)


def test_no_fitting_plan_is_an_error_not_the_first_plan():
    """Issue #11: default_plan used to return the first plan when none fit."""
    with pytest.raises(NoFittingPlan) as err:
        choose_plan(CAT, A14B, CAT.tier("a10"), 4, "offload")
    assert (err.value.variant, err.value.tier) == ("wan2.2-t2v-a14b", "a10")
    assert err.value.over_gb == pytest.approx(28 / 4 + 11.6 + 18.7 / 4 + 1.5 - 24)
    assert "no 4-rank plan fits; the smallest, tp4, needs" in str(err.value)
    with pytest.raises(NoFittingPlan, match="'cfg2' needs .* 87.8 GB per GPU"):
        choose_plan(CAT, A14B, CAT.tier("a100"), 2, "resident", "cfg2")


def test_plans_parse_and_list():
    assert parse_plan("sp2+cfg2") == Plan(sp=2, cfg=2) and parse_plan("single") == Plan()
    assert [p.name for p in candidate_plans(4)] == ["tp4", "sp4", "tp2+cfg2", "sp2+cfg2"]
    for bad in ("tp2+sp2", "pp2", "cfg3"):
        with pytest.raises(ValueError, match=bad.split("+")[-1]):
            parse_plan(bad)


def test_routes_carry_the_plan_and_rules_check_an_explicit_one():
    rules = parse_rules("""rules:
  - name: finals
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2, placement: offload}
  - name: drafts
    match: {track: draft}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 4, parallel: tp2+cfg2}
""", CAT)
    assert route(JobSpec(track="final"), rules, CAT).parallel == "cfg2"
    assert route(JobSpec(track="draft"), rules, CAT).parallel == "tp2+cfg2"
    with pytest.raises(PolicyError, match="'cfg2' needs .* = 87.8 GB per GPU, but tier a100 "
                                          r"\(A100-80GB\) has 80 GB: 7.8 GB over"):
        parse_rules("""rules:
  - name: finals
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2, parallel: cfg2}
""", CAT)
    # A14B's FFN (13824) does not split 5 ways: sp5 can run, tp5 cannot.
    with pytest.raises(PolicyError, match="'tp5' cannot split wan2.2-t2v-a14b"):
        parse_rules("""rules:
  - name: finals
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 5, parallel: tp5}
""", CAT)
    with pytest.raises(PolicyError, match="'sp4' uses 4 ranks; the route's degree is 2"):
        parse_rules("""rules:
  - name: finals
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 2, parallel: sp4}
""", CAT)
