"""One memory model (issue #11): every route `farm rules check` accepts fits the plan routing
chooses for it, and a route with no fitting plan is a 422 at submission, never a silent pick."""

from __future__ import annotations

import os
from itertools import product

import pytest

from farm.policy import load_policy
from scheduler.catalog import parse_catalog
from scheduler.memory import choose_plan, fit_problem, plan_memory
from scheduler.parallel_cost import parse_plan
from scheduler.routing import JobSpec, NoRoute, QueueLoad, RouteDoesNotFit, explain, route
from tests.scheduler.policy_fixtures import CONFIG, shipped_catalog, shipped_rules


def policies():
    """The shipped files, and the tests' own (tests/conftest.py: tier cpu-b, a tp2 rule)."""
    test = load_policy(os.environ["FARM_TIERS_FILE"], None, os.environ["FARM_RULES_FILE"])
    return [("shipped", shipped_catalog(), None), ("tests", test.catalog, test.rules)]


def job_grid(catalog):
    """Tracks x batch x named models x sizes x frames x deadlines x projects."""
    models = [None, *catalog.models]
    sizes = [(1280, 720), (832, 480), (32, 32)]
    for track, batch, model, (w, h), frames, deadline, project in product(
            ("draft", "final"), (False, True), models, sizes, (1, 17, 81, 161),
            (None, 1.0, 1e6), ("default", "tier-b", "parallel")):
        yield JobSpec(track=track, batch=batch, model=model, width=w, height=h, frames=frames,
                      deadline_s=deadline, project=project)


@pytest.mark.parametrize("which", ["shipped", "tests"])
def test_every_route_rules_check_accepts_fits_its_chosen_plan(which):
    _, catalog, rules = next(p for p in policies() if p[0] == which)
    rules = rules or shipped_rules(catalog)
    # Each choice of each rule, checked as `rules check` does and planned as routing does.
    for rule in rules.rules:
        for choice in [rule.route] + [f.route for f in rule.fallbacks]:
            tier = catalog.tiers[choice.tier]
            for variant in [choice.variant] if choice.variant else rule.match.model:
                m = catalog.models[variant]
                assert fit_problem(catalog, m, tier, choice.degree, choice.placement,
                                   choice.parallel) is None
                plan, need = choose_plan(catalog, m, tier, choice.degree, choice.placement,
                                         choice.parallel)
                assert plan.degree == choice.degree and need.total_gb <= tier.memory_gb
    # Every job the rules route, under empty and overloaded queues (fallbacks taken).
    overloaded = {f"render.{t}": QueueLoad(1000, 1e9) for t in catalog.tiers}
    taken = set()
    for job, loads in product(job_grid(catalog), ({}, overloaded)):
        try:
            chosen = route(job, rules, catalog, loads)
        except NoRoute as exc:
            assert not isinstance(exc, RouteDoesNotFit) and "no routing rule" in str(exc)
            continue
        need = plan_memory(catalog, catalog.models[chosen.variant], parse_plan(chosen.parallel),
                           chosen.placement)
        assert chosen.memory_gb == round(need.total_gb, 2)
        assert need.total_gb <= catalog.tiers[chosen.tier].memory_gb, need.arithmetic()
        assert parse_plan(chosen.parallel).degree == chosen.degree
        taken.add((chosen.rule, chosen.fallback))
    every = {(r.name, i) for r in rules.rules for i in [None, *range(len(r.fallbacks))]}
    assert taken == every  # the grid reached every route and fallback


def test_a_route_with_no_fitting_plan_is_an_error_at_routing():
    """Rules checked against 80 GB A100s, routed with 40 GB ones: no silent first plan."""
    rules = shipped_rules()
    small = parse_catalog((CONFIG / "tiers.yaml").read_text().replace("memory_gb: 80",
                                                                      "memory_gb: 40"),
                          (CONFIG / "models.yaml").read_text())
    with pytest.raises(RouteDoesNotFit) as err:
        route(JobSpec(track="final"), rules, small)
    message = str(err.value)
    assert message.startswith("rule 'finals' route: wan2.2-t2v-a14b on tier a100: no 2-rank "
                              "plan fits; the smallest, tp2, needs")
    assert message.endswith("tier a100 (A100-80GB) has 40 GB: 10.5 GB over")
    assert isinstance(err.value, NoRoute)  # submission's path to a 422
    out = explain(JobSpec(track="final"), rules, small)
    assert out.route is None and out.error == message
    # A job the fitting routes take is unaffected.
    assert route(JobSpec(track="draft"), rules, small).tier == "a10"


def test_no_fitting_plan_reaches_the_client_as_a_422(monkeypatch):
    """farm/jobs/submit.py turns a NoRoute into Unroutable; the API answers it with 422."""
    from farm.api.routes import unroutable
    from farm.errors import Unroutable
    from farm.jobs import submit
    from farm.policy import Policy
    from farm.schemas import JobCreate

    small = parse_catalog((CONFIG / "tiers.yaml").read_text().replace("memory_gb: 80",
                                                                      "memory_gb: 40"),
                          (CONFIG / "models.yaml").read_text())
    monkeypatch.setattr(submit, "get_policy", lambda: Policy(small, shipped_rules()))
    with pytest.raises(Unroutable) as err:
        submit.route_request(JobCreate(prompt="a red circle", track="final"), {})
    answer = unroutable(err.value)
    assert answer.status_code == 422
    (detail,) = answer.detail
    assert detail["field"] == "route"
    for words in ("wan2.2-t2v-a14b", "tier a100", "10.5 GB over"):
        assert words in detail["message"]
