"""A simulated farm day (issue #14, item 4): 100,000 jobs on 1,000 GPUs of three tiers in
<= 60 s on this machine.

    .venv/bin/python benchmarks/simulate.py [--jobs 100000] [--scale 1.0]

The fleet: 400 A10s (4 a node), 400 A100s (8 a node), 200 H100s (8 a node, urgent finals,
a measured 38 s a step for the A14B); the shipped rules plus `urgent-finals` (priority >= 80
to the H100s), the toy rule and CPU tier left out; failures at 0.002 per GPU-hour. The
trace is `make_trace` (seeded): drafts, finals with and without deadlines, overnight
batches, 5% exact repeats. Admission passes are batched to a 5 s tick (the farm's own
select_for_release, per tier, pages of 100 waiting jobs). The baseline in the same process is
the same day with a pass at every arrival and finish (the live farm's cadence): its time,
and the queue waits both give (what batching costs in fidelity). The last line is the
day's seconds against the 60 s target.

Then (issue #15) the comparison table: deadline hit rates and draft waits with and without
preemption and batching on ONE trace (scheduler/simulate/compare.py, as `farm simulate`
prints it), on a smaller day (--compare-jobs, --compare-scale; 0 jobs: skipped) of the
shipped rules: priority-90 finals on the A100s preempting (preempt_at 90) overnight batches
and lower finals, the H100s left out; drafts batching 4 at a time at an assumed marginal
cost of 0.35 of a solo render (DRAFT_BATCH: benchmarks/batching.py measures the toy model's;
the 5B draft's needs a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.simulate.compare import compare, format_comparison  # noqa: E402
from scheduler.simulate.engine import simulate  # noqa: E402
from scheduler.simulate.fleet import parse_fleet  # noqa: E402
from scheduler.simulate.report import format_report, summarise  # noqa: E402
from scheduler.simulate.workload import make_trace  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "scheduler" / "config"
TARGET_S = 60.0
DRAFT_BATCH = {"wan2.2-ti2v-5b-int8": {"max_batch": 4, "batch_marginal": 0.35}}


def policy_files(folder: Path) -> tuple[Path, Path]:
    """Shipped tiers and rules, the CPU tier empty and its toy rule left out, plus the H100 tier and
    a rule sending urgent finals there."""
    tiers = yaml.safe_load((CONFIG / "tiers.yaml").read_text())
    tiers["tiers"]["cpu"]["count"] = 0  # models.yaml times the toys on it; no rule goes there
    tiers["tiers"]["h100"] = {"gpu": "H100-80GB", "memory_gb": 80, "gpus_per_node": 8,
                              "count": 25, "cost_per_gpu_hour": 6.5, "ray_resource": "tier:h100"}
    rules = yaml.safe_load((CONFIG / "rules.yaml").read_text())
    rules["rules"] = [r for r in rules["rules"] if r["name"] != "toy-models-on-cpu"]
    at = next(i for i, r in enumerate(rules["rules"]) if r["name"] == "finals")
    rules["rules"].insert(at, {"name": "urgent-finals",
                               "match": {"track": "final", "priority": {"min": 80}},
                               "route": {"variant": "wan2.2-t2v-a14b", "tier": "h100",
                                         "degree": 2}})
    rules["quotas"]["default"] = {"a10": 120, "a100": 160, "h100": 100}
    (folder / "tiers.yaml").write_text(yaml.safe_dump(tiers))
    (folder / "rules.yaml").write_text(yaml.safe_dump(rules))
    return folder / "tiers.yaml", folder / "rules.yaml"


def fleet_text(tiers: Path, rules: Path, scale: float, pass_every_s: float) -> str:
    def gpus(n: int, per_node: int) -> int:
        return max(per_node, round(n * scale / per_node) * per_node)

    return yaml.safe_dump({
        "policy": {"tiers_file": str(tiers), "rules_file": str(rules)},
        "tiers": {"a10": {"gpus": gpus(400, 4), "gpus_per_node": 4},
                  "a100": {"gpus": gpus(400, 8), "gpus_per_node": 8},
                  "h100": {"gpus": gpus(200, 8), "gpus_per_node": 8}},
        "measured": {"wan2.2-t2v-a14b": {"h100": 38.0}},
        "failures": {"per_gpu_hour": 0.002, "retry_delay_s": 60, "max_retries": 3},
        "admission": {"pass_every_s": pass_every_s, "lookahead": 100, "pages": 5},
    })


def comparison(folder: Path, jobs: int, scale: float, spill: bool = True) -> str:
    """The four-run table on a day of the shipped rules (urgent finals share the A100s);
    ``spill=False``: the rules' fallbacks left out, so a job whose deadline its route cannot
    meet stays on it (what preemption and batching alone make of the deadlines)."""
    tiers, _ = policy_files(folder)
    rules = yaml.safe_load((CONFIG / "rules.yaml").read_text())
    rules["rules"] = [r for r in rules["rules"] if r["name"] != "toy-models-on-cpu"]
    for rule in rules["rules"] if not spill else ():
        rule.pop("fallbacks", None)
    rules["quotas"]["default"] = {"a10": 120, "a100": 160}
    (folder / "compare-rules.yaml").write_text(yaml.safe_dump(rules))
    doc = yaml.safe_load(fleet_text(tiers, folder / "compare-rules.yaml", scale, 5.0))
    doc["tiers"]["h100"]["gpus"] = 0
    doc["batching"] = DRAFT_BATCH
    fleet = parse_fleet(yaml.safe_dump(doc), "bench-compare-fleet.yaml")
    return format_comparison(compare(fleet, make_trace(jobs, seed=0), hours=24.0, seed=0))


def timed_day(folder: Path, jobs: int, scale: float, pass_every_s: float):
    tiers, rules = policy_files(folder)
    fleet = parse_fleet(fleet_text(tiers, rules, scale, pass_every_s), "bench-fleet.yaml")
    trace = make_trace(jobs, seed=0)
    began = time.perf_counter()
    result = simulate(fleet, trace, hours=24.0, seed=0)
    return time.perf_counter() - began, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--scale", type=float, default=1.0, help="GPUs, as a share of 1,000")
    parser.add_argument("--compare-jobs", type=int, default=20_000,
                        help="jobs of the four-run comparison's day (0: skip it)")
    parser.add_argument("--compare-scale", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, result = timed_day(Path(tmp), args.jobs, args.scale, 5.0)
        summary = summarise(result)
        print(format_report(summary))
        gpus = sum(row["gpus"] for row in summary["tiers"].values())
        print(f"\nday: {args.jobs:,} jobs on {gpus:,} GPUs simulated in {seconds:.1f} s "
              f"({args.jobs / seconds:,.0f} jobs/s)")
        base_s, base = timed_day(Path(tmp), args.jobs, args.scale, 0.0)
        exact = summarise(base)
        print(f"baseline, a pass at every arrival and finish (the live farm's cadence): "
              f"{base_s:.1f} s, {exact['passes']:,} passes")
        for key in sorted(set(summary["waits"]) & set(exact["waits"])):
            if key[1] != "cache":
                print(f"  wait p50/p95 {key[0]} on {key[1]}: batched "
                      f"{summary['waits'][key][1]:.0f}/{summary['waits'][key][2]:.0f} s, "
                      f"per event {exact['waits'][key][1]:.0f}/{exact['waits'][key][2]:.0f} s")
        print(f"batched passes vs a pass at every event, speed: {base_s / seconds:.2f}x")
        if args.compare_jobs:
            print(f"\n{args.compare_jobs:,} jobs, GPUs x {args.compare_scale}, shipped rules; "
                  f"draft batching assumed {DRAFT_BATCH}")
            print(comparison(Path(tmp), args.compare_jobs, args.compare_scale))
            print("\nthe same, the rules' fallbacks left out (no deadline spills to the A10s):")
            print(comparison(Path(tmp), args.compare_jobs, args.compare_scale, spill=False))
    ratio = TARGET_S / seconds
    print(f"day vs the {TARGET_S:.0f} s target: {ratio:.2f}x")
    if args.jobs >= 100_000 and ratio < 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
