"""Deadlines with and without preemption and batching, on the same trace (issue #15, item 3).

The same fleet, trace and failure seed run four times: neither, preemption only, batching
only, both (the farm as issue #15 makes it; EDF admission in all four, it is the farm's
order). One row each: deadlines met and the hit rate; "spilled": of the jobs with a
deadline, those a rule's deadline_unmet fallback sent to a lighter route at submission
(a deadline the routing kept, not the scheduling); the drafts' queue wait (batching's gain);
the finals' p95 wait; the preemptions and the jobs rendered in batches; the GPU-hours.
Seeded failures repeat in each run, so what differs is the scheduling alone.
"""

from __future__ import annotations

from scheduler.simulate.engine import simulate
from scheduler.simulate.report import _dur, summarise

RUNS = (("neither", False, False), ("preemption", True, False),
        ("batching", False, True), ("both", True, True))


def compare(fleet, trace, hours: float = 24.0, seed: int = 0,
            known: dict | None = None) -> list[tuple[str, dict]]:
    """[(run name, summarise's dict)] for the four runs, in RUNS order; ``known``: run
    name -> a SimResult already simulated with these inputs (not run again)."""
    known = known or {}
    return [(name, summarise(known[name] if name in known else
                             simulate(fleet, trace, hours=hours, seed=seed,
                                      preemption=preempt, batching=batch)))
            for name, preempt, batch in RUNS]


def finals_p95(summary: dict) -> float:
    """p95 queue wait of the finals (not batches) over every tier, from the per-tier rows:
    the worst tier's p95, a bound (per-job waits are not kept in the summary)."""
    rows = [v for (track, tier), v in summary["waits"].items()
            if track == "final" and tier != "cache"]
    return max((v[2] for v in rows), default=0.0)


def format_comparison(rows: list[tuple[str, dict]]) -> str:
    head = (f"{'run':<12}{'deadlines met':>15}{'hit rate':>10}{'spilled':>9}{'draft wait p50':>16}"
            f"{'p95':>9}{'final p95':>11}{'preempted':>11}{'batched':>9}{'GPU-h':>9}")
    lines = ["deadlines with and without preemption and batching, the same trace:", head]
    for name, s in rows:
        met = s["deadline_jobs"] - s["deadline_missed"]
        rate = "-" if s["deadline_hit_rate"] is None else f"{s['deadline_hit_rate']:.1%}"
        _, p50, p95, _ = s["draft_waits"]
        gpu_h = sum(row["gpu_hours"] for row in s["tiers"].values())
        met_of = f"{met} of {s['deadline_jobs']}"
        lines.append(f"{name:<12}{met_of:>15}{rate:>10}{s['deadline_spilled']:>9}"
                     f"{_dur(p50):>16}{_dur(p95):>9}{_dur(finals_p95(s)):>11}"
                     f"{s['preempted']:>11}{s['batched_jobs']:>9}{gpu_h:>9.1f}")
    return "\n".join(lines)
