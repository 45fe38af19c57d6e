"""Routing decisions per second, on one core, for a 10,000-job mix (issue #4: >= 20,000/s).

    .venv/bin/python benchmarks/routing.py

Routes a fixed, seeded mix of drafts, finals, batch jobs, named models, priorities, projects
and sizes with the shipped tiers, models and rules, against queue loads that make a share of
the finals spill to their fallback. The baseline in the same run is `explain` (every rule's
verdict and the memory arithmetic), the path `farm rules explain` takes. The last line is
the ratio of decisions per second to the 20,000/s target.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.catalog import parse_catalog  # noqa: E402
from scheduler.routing import JobSpec, QueueLoad, explain, route  # noqa: E402
from scheduler.rules import parse_rules  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "scheduler" / "config"
TARGET_PER_S = 20_000
JOBS = 10_000


def job_mix(n: int, seed: int = 4) -> list[JobSpec]:
    rng = random.Random(seed)
    sizes = [(1280, 720), (832, 480), (1920, 1088), (480, 832)]
    models = [None] * 8 + ["wan-toy", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"]
    jobs = []
    for _ in range(n):
        width, height = rng.choice(sizes)
        jobs.append(JobSpec(
            track=rng.choice(["draft", "draft", "final"]), width=width, height=height,
            frames=rng.choice([17, 49, 81, 161]), fps=rng.choice([16, 24]),
            priority=rng.randint(0, 100), batch=rng.random() < 0.2,
            project=rng.choice(["studio", "ads", "research"]), model=rng.choice(models),
            deadline_s=rng.choice([None, None, 600.0, 3600.0]),
        ))
    return jobs


def timed(fn, jobs, *args) -> tuple[float, list]:
    start = time.perf_counter()
    out = [fn(j, *args) for j in jobs]
    return time.perf_counter() - start, out


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    catalog = parse_catalog((CONFIG / "tiers.yaml").read_text(),
                            (CONFIG / "models.yaml").read_text())
    rules = parse_rules((CONFIG / "rules.yaml").read_text(), catalog)
    loads = {"render.a100": QueueLoad(12, 50_000.0), "render.a10": QueueLoad(3, 8_000.0)}
    jobs = job_mix(JOBS)
    timed(route, jobs[:500], rules, catalog, loads)  # warm the memory-estimate memo
    best_route = min(timed(route, jobs, rules, catalog, loads)[0] for _ in range(3))
    routes = timed(route, jobs, rules, catalog, loads)[1]
    best_explain = min(timed(explain, jobs, rules, catalog, loads)[0] for _ in range(2))
    explained = timed(explain, jobs, rules, catalog, loads)[1]
    # The fast path and the explaining path must agree on every job.
    assert [r.as_dict() for r in routes] == [e.route for e in explained]
    by_rule = Counter((r.rule, r.fallback is not None) for r in routes)
    print(f"{JOBS} jobs; routes by (rule, spilled): {dict(sorted(by_rule.items()))}")
    print(f"{'path':<10}{'seconds':>10}{'decisions/s':>14}")
    for name, seconds in (("route", best_route), ("explain", best_explain)):
        print(f"{name:<10}{seconds:>10.3f}{JOBS / seconds:>14,.0f}")
    print(f"route vs explain: {best_explain / best_route:.1f}x")
    ratio = JOBS / best_route / TARGET_PER_S
    print(f"route vs the {TARGET_PER_S:,}/s target: {ratio:.2f}x")
    if ratio < 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
