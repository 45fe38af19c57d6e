"""Which waiting jobs go to the GPUs now: priority order, tier capacity, project quotas.

Pure (farm/jobs/admit.py feeds it from the database). Jobs are taken by priority (100
first), ties to the oldest (as Deadline does). A job takes ``groups`` actor groups of its
route's degree in GPUs, each group on one node of its tier (a parallel group never spans
nodes), until it leaves the GPUs: one group for a job whose segments run one after another,
one per segment that can run at once for a job whose segments are independent, never more
than the tier's pool holds (issue #11: admission counts what the pools can run). A job that finds no
node with room stops that tier's line: nothing of lower priority is let past it. A job whose
project holds its quota on the tier is passed over, so a project jumps the queue only within
its own allowance. A job that could never run (its degree exceeds every node of its tier,
or its project's quota) is reported as impossible, not left to block the line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
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
    groups: int = 1  # actor groups it renders on at once

    @property
    def gpus(self) -> int:
        return self.degree * self.groups


@dataclass(frozen=True, slots=True)
class Holding:
    """A job already on (or sent to) the GPUs."""
    project: str
    tier: str
    degree: int
    groups: int = 1

    @property
    def gpus(self) -> int:
        return self.degree * self.groups


@dataclass(frozen=True, slots=True)
class TierSize:
    nodes: int
    gpus_per_node: int

    def groups(self, degree: int) -> int:
        """Actor groups of ``degree`` GPUs the tier holds: a group never spans nodes."""
        return self.nodes * (self.gpus_per_node // degree)


@dataclass(frozen=True, slots=True)
class Release:
    released: tuple[str, ...]  # job ids, in the order to send them
    held: dict  # job id -> why it waits
    impossible: dict  # job id -> why it can never run as routed
    # tier -> the job that found no room: nothing after it on that tier goes now, so a
    # caller reading the queue page by page (farm.jobs.admit, issue #14) stops there.
    blocked: dict = field(default_factory=dict)


def _place(free: list[int], degree: int, groups: int = 1) -> bool:
    """First fit, each group on one node: take ``groups`` x ``degree`` GPUs, or none."""
    trial = list(free)
    for _ in range(groups):
        node = next((i for i, gpus in enumerate(trial) if gpus >= degree), None)
        if node is None:
            return False
        trial[node] -= degree
    free[:] = trial
    return True


def groups_for(runnable: int, pool: int, degree: int, quota: int | None) -> int:
    """Groups a job renders on at once: one per segment that can run now (one for a job
    whose segments continue one another), at most the tier's pool and the project's quota,
    at least one. Admission accounts these; leasing lets the job hold no more."""
    cap = pool if quota is None else min(pool, quota // degree)
    return max(1, min(runnable, cap))


def queue_order(jobs: list[Waiting]) -> list[Waiting]:
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id))


def select_for_release(waiting: list[Waiting], holding: list[Holding],
                       tiers: dict[str, TierSize], quotas: Quotas) -> Release:
    free = {name: [t.gpus_per_node] * t.nodes for name, t in tiers.items()}  # per node
    by_project = Counter()  # (project, tier) -> GPUs held
    for h in holding:
        for _ in range(h.groups):
            if not _place(free.setdefault(h.tier, []), h.degree) and free[h.tier]:
                biggest = max(range(len(free[h.tier])), key=free[h.tier].__getitem__)
                free[h.tier][biggest] = max(0, free[h.tier][biggest] - h.degree)
        by_project[h.project, h.tier] += h.gpus
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
        if limit is not None and mine + job.gpus > limit:
            held[job.job_id] = (f"project {job.project} holds {mine} of its {limit} GPUs on "
                                f"{job.tier}; needs {job.gpus}")
            continue
        if not _place(free[job.tier], job.degree, job.groups):
            blocked[job.tier] = job.job_id
            held[job.job_id] = (f"tier {job.tier} has no room for {job.groups} group(s) of "
                                f"{job.degree} GPUs (free per node: {free[job.tier]})")
            continue
        by_project[job.project, job.tier] += job.gpus
        released.append(job.job_id)
    return Release(tuple(released), held, impossible, blocked)
