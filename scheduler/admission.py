"""Which waiting jobs go to the GPUs now: priority order, tier capacity, project quotas.

Pure (farm.admission feeds it from the database). Jobs are taken by priority (100 first),
ties to the oldest (as Deadline does). A job takes its route's degree in GPUs of its tier
until it leaves the GPUs. A job whose tier is full stops that tier's line: nothing of lower
priority is let past it. A job whose project holds its quota on the tier is passed over,
so a project jumps the queue only within its own allowance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from scheduler.rules import Quotas


@dataclass(frozen=True, slots=True)
class Waiting:
    job_id: str
    project: str
    tier: str
    degree: int
    priority: int  # 0..100, 100 first
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Holding:
    """A job already on (or sent to) the GPUs."""
    project: str
    tier: str
    degree: int


@dataclass(frozen=True, slots=True)
class Release:
    released: tuple[str, ...]  # job ids, in the order to send them
    held: dict  # job id -> why it waits


def queue_order(jobs: list[Waiting]) -> list[Waiting]:
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id))


def select_for_release(waiting: list[Waiting], holding: list[Holding],
                       capacity: dict[str, int], quotas: Quotas) -> Release:
    """``capacity``: GPUs per tier."""
    used = Counter()  # tier -> GPUs held
    by_project = Counter()  # (project, tier) -> GPUs held
    for h in holding:
        used[h.tier] += h.degree
        by_project[h.project, h.tier] += h.degree
    blocked: dict[str, str] = {}  # tier -> the job that stopped its line
    released, held = [], {}
    for job in queue_order(waiting):
        if job.tier in blocked:
            held[job.job_id] = f"behind job {blocked[job.tier]} on tier {job.tier}"
            continue
        limit = quotas.limit(job.project, job.tier)
        mine = by_project[job.project, job.tier]
        if limit is not None and mine + job.degree > limit:
            held[job.job_id] = (f"project {job.project} holds {mine} of its {limit} GPUs on "
                                f"{job.tier}; needs {job.degree}")
            continue
        free = capacity.get(job.tier, 0) - used[job.tier]
        if job.degree > free:
            blocked[job.tier] = job.job_id
            held[job.job_id] = (f"tier {job.tier} has {max(free, 0)} of "
                                f"{capacity.get(job.tier, 0)} GPUs free; needs {job.degree}")
            continue
        used[job.tier] += job.degree
        by_project[job.project, job.tier] += job.degree
        released.append(job.job_id)
    return Release(tuple(released), held)
