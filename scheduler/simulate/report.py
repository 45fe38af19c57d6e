"""What a simulated day says: queue waits per track and tier, utilisation, deadlines,
overnight batches, cost per video; PNG plots of queue depth and utilisation over the day.

Queue wait: seconds from arrival to the first admission (a cache hit waits 0 and is its own
row, tier "cache"; a batch's jobs are track "final/batch", their wait includes the hours
before their window opens). Utilisation: GPU-seconds rendered within the horizon over the tier's
GPU-seconds in it. Cost: GPU-seconds rendered (failed attempts too) at the tier's price,
over the videos delivered (rendered or from the cache).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from scheduler.simulate.engine import SimResult

DELIVERED = ("succeeded", "cached")


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 (numpy's linear interpolation); zeros for no values."""
    if not values:
        return (0.0, 0.0, 0.0)
    return tuple(float(x) for x in np.percentile(np.asarray(values), [50, 95, 99]))


def batch_deadline(result: SimResult, first_at_s: float, tz: str):
    """06:00 in the batch's time zone, the first after its first job arrived."""
    local = (result.start + timedelta(seconds=first_at_s)).astimezone(ZoneInfo(tz))
    six = local.replace(hour=6, minute=0, second=0, microsecond=0)
    return six if six > local else six + timedelta(days=1)


def summarise(result: SimResult) -> dict:
    waits = defaultdict(list)  # (track, tier) -> seconds
    for job in result.jobs:
        if job.admitted_s is not None:
            tier = "cache" if job.state == "cached" else job.tier
            track = f"{job.trace.track}/batch" if job.trace.batch else job.trace.track
            waits[track, tier].append(job.admitted_s - job.trace.at_s)
    delivered = [j for j in result.jobs if j.state in DELIVERED]
    cost = sum(j.cost for j in result.jobs)
    by_track = defaultdict(lambda: [0.0, 0])  # track -> [dollars, videos]
    for job in result.jobs:
        by_track[job.trace.track][0] += job.cost
        by_track[job.trace.track][1] += job.state in DELIVERED
    with_deadline = [j for j in result.jobs if j.trace.deadline_s is not None]
    missed = [j for j in with_deadline if j.state not in DELIVERED
              or j.finished_s - j.trace.at_s > j.trace.deadline_s]
    drafts = [j.admitted_s - j.trace.at_s for j in result.jobs
              if j.admitted_s is not None and j.trace.track == "draft" and j.state != "cached"]
    return {
        "jobs": len(result.jobs),
        "states": dict(sorted(_count(j.state for j in result.jobs).items())),
        "waits": {key: (len(v), *percentiles(v)) for key, v in sorted(waits.items())},
        "tiers": {name: _tier_row(result, name, st) for name, st in result.tiers.items()
                  if st.gpus},
        "deadline_jobs": len(with_deadline), "deadline_missed": len(missed),
        # Issue #15: the share of deadlines met (None: no job had one), the drafts' queue
        # wait (rendered, any tier), runs that yielded, jobs rendered in batches.
        "deadline_hit_rate": (1 - len(missed) / len(with_deadline)) if with_deadline else None,
        "deadline_spilled": sum(1 for j in with_deadline  # met on a fallback's lighter route
                                if j.route is not None and j.route.fallback is not None),
        "draft_waits": (len(drafts), *percentiles(drafts)),
        "preempted": result.preempted, "batched_jobs": result.batched_jobs,
        "batch_runs": result.batch_runs,
        "batches": _batches(result),
        "retries": sum(j.attempts for j in result.jobs),
        "cost": cost,
        "cost_per_video": cost / len(delivered) if delivered else 0.0,
        "cost_per_video_by_track": {t: (d / n if n else 0.0) for t, (d, n) in
                                    sorted(by_track.items())},
        "passes": result.passes, "end_s": result.end_s, "horizon_s": result.horizon_s,
    }


def _count(items) -> dict:
    out = defaultdict(int)
    for item in items:
        out[item] += 1
    return out


def _tier_row(result: SimResult, name: str, st) -> dict:
    gpu_s = sum(j.gpu_s for j in result.jobs if j.tier == name)
    return {"gpus": st.gpus, "utilisation": st.busy_area / (st.gpus * result.horizon_s),
            "gpu_hours": gpu_s / 3600.0, "cost": gpu_s * st.cost_per_gpu_hour / 3600.0}


def _batches(result: SimResult) -> dict:
    """name -> (jobs, delivered by 06:00, all delivered by 06:00)."""
    groups = defaultdict(list)
    for job in result.jobs:
        if job.trace.batch:
            groups[job.trace.batch].append(job)
    out = {}
    for name, jobs in sorted(groups.items()):
        due = batch_deadline(result, min(j.trace.at_s for j in jobs), jobs[0].trace.timezone)
        by_six = sum(1 for j in jobs if j.state in DELIVERED
                     and result.start + timedelta(seconds=j.finished_s) <= due)
        out[name] = (len(jobs), by_six, by_six == len(jobs))
    return out


def format_report(s: dict) -> str:
    lines = [f"{s['jobs']} jobs: " + ", ".join(f"{k} {v}" for k, v in s["states"].items()),
             "", f"{'track':<13}{'tier':<10}{'jobs':>8}{'wait p50':>11}{'p95':>10}{'p99':>10}"]
    for (track, tier), (n, p50, p95, p99) in s["waits"].items():
        lines.append(f"{track:<13}{tier:<10}{n:>8}{_dur(p50):>11}{_dur(p95):>10}{_dur(p99):>10}")
    lines += ["", f"{'tier':<10}{'GPUs':>6}{'util':>8}{'GPU-h':>10}{'cost $':>12}"]
    for name, row in s["tiers"].items():
        lines.append(f"{name:<10}{row['gpus']:>6}{row['utilisation']:>8.1%}"
                     f"{row['gpu_hours']:>10.1f}{row['cost']:>12,.2f}")
    done = sum(1 for _, _, ok in s["batches"].values() if ok)
    lines += ["", f"deadlines missed: {s['deadline_missed']} of {s['deadline_jobs']} jobs "
                  f"with a deadline",
              f"overnight batches finished by 06:00: {done} of {len(s['batches'])}",
              f"preemptions: {s['preempted']}; jobs rendered in batches: {s['batched_jobs']} "
              f"(in {s['batch_runs']} batched renders)",
              f"failures retried: {s['retries']}",
              f"cost per video: ${s['cost_per_video']:.2f} (" + ", ".join(
                  f"{t} ${c:.2f}" for t, c in s["cost_per_video_by_track"].items()) + ")",
              f"admission passes: {s['passes']}; last event at {_dur(s['end_s'])} "
              f"(horizon {_dur(s['horizon_s'])})"]
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def plot(result: SimResult, out_dir: Path) -> list[Path]:
    """queue_depth.png and utilisation.png: one line per tier, hours on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hours = [t / 3600 for t, _ in result.samples]
    paths = []
    for name, ylabel, value in (
            ("queue_depth.png", "jobs waiting for GPUs", lambda st, w, b: w),
            ("utilisation.png", "GPUs busy (%)", lambda st, w, b: 100.0 * b / st.gpus)):
        fig, ax = plt.subplots(figsize=(9, 4))
        for tier, st in result.tiers.items():
            if st.gpus:
                ax.plot(hours, [value(st, *sample[tier]) for _, sample in result.samples],
                        label=tier)
        ax.set_xlabel(f"hours since {result.start:%Y-%m-%d %H:%M %Z}")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
