"""Which waiting jobs go to the GPUs now: priority order, tier capacity, project quotas.

Pure (farm.jobs.admit feeds it from the database). Jobs are taken by priority (100 first),
ties to the oldest (as Deadline does). A job takes its route's degree in GPUs of one node of
its tier (a parallel group never spans nodes) until it leaves the GPUs. A job that finds no
node with room stops that tier's line: nothing of lower priority is let past it. A job whose
project holds its quota on the tier is passed over, so a project jumps the queue only within
its own allowance. A job that could never run (its degree exceeds every node of its tier,
or its project's quota) is reported as impossible, not left to block the line.
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
class TierSize:
    nodes: int
    gpus_per_node: int


@dataclass(frozen=True, slots=True)
class Release:
    released: tuple[str, ...]  # job ids, in the order to send them
    held: dict  # job id -> why it waits
    impossible: dict  # job id -> why it can never run as routed


def _place(free: list[int], degree: int) -> bool:
    """First fit: take ``degree`` GPUs of one node."""
    for i, gpus in enumerate(free):
        if gpus >= degree:
            free[i] -= degree
            return True
    return False


def queue_order(jobs: list[Waiting]) -> list[Waiting]:
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id))


def select_for_release(waiting: list[Waiting], holding: list[Holding],
                       tiers: dict[str, TierSize], quotas: Quotas) -> Release:
    free = {name: [t.gpus_per_node] * t.nodes for name, t in tiers.items()}  # per node
    by_project = Counter()  # (project, tier) -> GPUs held
    for h in holding:
        if not _place(free.setdefault(h.tier, []), h.degree) and free[h.tier]:
            biggest = max(range(len(free[h.tier])), key=free[h.tier].__getitem__)
            free[h.tier][biggest] = max(0, free[h.tier][biggest] - h.degree)
        by_project[h.project, h.tier] += h.degree
    blocked: dict[str, str] = {}  # tier -> the job that stopped its line
    released, held, impossible = [], {}, {}
    for job in queue_order(waiting):
        size = tiers.get(job.tier)
        limit = quotas.limit(job.project, job.tier)
        if size is None or job.degree > size.gpus_per_node or size.nodes == 0:
            impossible[job.job_id] = (f"tier {job.tier!r} has no node with {job.degree} GPUs"
                                      if size else f"tier {job.tier!r} is not declared")
            continue
        if limit is not None and job.degree > limit:
            impossible[job.job_id] = (f"project {job.project}'s quota on {job.tier} is {limit} "
                                      f"GPUs; the job needs {job.degree}")
            continue
        if job.tier in blocked:
            held[job.job_id] = f"behind job {blocked[job.tier]} on tier {job.tier}"
            continue
        mine = by_project[job.project, job.tier]
        if limit is not None and mine + job.degree > limit:
            held[job.job_id] = (f"project {job.project} holds {mine} of its {limit} GPUs on "
                                f"{job.tier}; needs {job.degree}")
            continue
        if not _place(free[job.tier], job.degree):
            blocked[job.tier] = job.job_id
            held[job.job_id] = (f"no node of tier {job.tier} has {job.degree} GPUs free "
                                f"(free per node: {free[job.tier]})")
            continue
        by_project[job.project, job.tier] += job.degree
        released.append(job.job_id)
    return Release(tuple(released), held, impossible)
