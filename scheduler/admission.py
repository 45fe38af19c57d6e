"""Which waiting jobs go to the GPUs now: priority order, tier capacity, project quotas.

Pure (farm/jobs/admit.py feeds it from the database). Jobs are taken by priority band (100
first), earliest deadline first within a band (issue #15), then priority, ties to the oldest
(as Deadline does). A job takes ``groups`` actor groups of its
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

from scheduler.deadlines import admission_key
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
    deadline_at: datetime | None = None  # issue #15: earliest deadline first within a band

    @property
    def gpus(self) -> int:
        return self.degree * self.groups


@dataclass(frozen=True, slots=True)
class Holding:
    """A job already on (or sent to) the GPUs; or a batched render of several (issue #15):
    one group, charged to ``project`` and to each project in ``shared_with`` riding in it."""
    project: str
    tier: str
    degree: int
    groups: int = 1
    shared_with: tuple[str, ...] = ()

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
    # Released jobs sent together as one batched render (issue #15), each in send order.
    batches: tuple[tuple[str, ...], ...] = ()


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
    """Admission order (issue #15): priority bands first, earliest deadline first within a
    band, then priority, age and id (scheduler.deadlines.admission_key; the farm's SQL look-
    ahead, farm/jobs/admit_queries.py, reads the same order)."""
    return sorted(jobs, key=lambda j: admission_key(j.priority, j.deadline_at, j.created_at,
                                                    j.job_id))


def _riders(by_project: Counter, members: list[Waiting], limit_of, gpus: int) -> list[Waiting]:
    """Of a batch's members (the first already within its project's quota), those whose
    projects can take the batch's group too: a batch's group counts for every project
    riding in it. The others are left for their own turn in the line."""
    charged, out = {members[0].project}, [members[0]]
    for m in members[1:]:
        if m.project not in charged:
            limit = limit_of(m.project, m.tier)
            if limit is not None and by_project[m.project, m.tier] + gpus > limit:
                continue
            charged.add(m.project)
        out.append(m)
    return out


def select_for_release(waiting: list[Waiting], holding: list[Holding],
                       tiers: dict[str, TierSize], quotas: Quotas,
                       batches: list[list[str]] = (), hold: set[str] = frozenset()) -> Release:
    """``batches`` (scheduler.batching.form_batches, those of two or more): jobs rendered
    together in ONE group of the first member's degree (issue #15), so more like jobs fit.
    ``hold``: lone like jobs waiting for companions (scheduler.batching.may_hold): their
    group is reserved but not sent, and the line is not blocked behind them."""
    free = {name: [t.gpus_per_node] * t.nodes for name, t in tiers.items()}  # per node
    by_project = Counter()  # (project, tier) -> GPUs held
    for h in holding:
        for _ in range(h.groups):
            if not _place(free.setdefault(h.tier, []), h.degree) and free[h.tier]:
                biggest = max(range(len(free[h.tier])), key=free[h.tier].__getitem__)
                free[h.tier][biggest] = max(0, free[h.tier][biggest] - h.degree)
        for project in (h.project, *h.shared_with):
            by_project[project, h.tier] += h.gpus
    by_id = {j.job_id: j for j in waiting}
    batch_of = {m: b for b in batches if len(b) > 1 for m in b}
    blocked: dict[str, str] = {}  # tier -> the job that stopped its line
    released, sent_batches, held, impossible, done = [], [], {}, {}, set()
    for job in queue_order(waiting):
        if job.job_id in done:
            continue
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
        batch = batch_of.get(job.job_id, (job.job_id,))
        # a batch goes where its first member stands; a member left out of it (its
        # project's quota) goes alone in its own place
        members = [by_id[m] for m in batch if m in by_id and m not in done] \
            if batch[0] == job.job_id else [job]
        if job.tier in blocked:
            done.update(m.job_id for m in members)
            held.update((m.job_id, f"behind job {blocked[job.tier]} on tier {job.tier}")
                        for m in members)
            continue
        mine = by_project[job.project, job.tier]
        if limit is not None and mine + job.gpus > limit:
            held[job.job_id] = (f"project {job.project} holds {mine} of its {limit} GPUs on "
                                f"{job.tier}; needs {job.gpus}")
            continue
        members = _riders(by_project, members, quotas.limit, job.gpus)
        done.update(m.job_id for m in members)
        if not _place(free[job.tier], job.degree, job.groups):
            blocked[job.tier] = job.job_id
            held.update((m.job_id, f"tier {job.tier} has no room for {job.groups} group(s) of "
                                   f"{job.degree} GPUs (free per node: {free[job.tier]})")
                        for m in members)
            continue
        for project in dict.fromkeys(m.project for m in members):
            by_project[project, job.tier] += job.gpus
        if job.job_id in hold and len(members) == 1:
            held[job.job_id] = "its group is reserved while it waits for like jobs to batch with"
            continue
        released.extend(m.job_id for m in members)
        if len(members) > 1:
            sent_batches.append(tuple(m.job_id for m in members))
    return Release(tuple(released), held, impossible, blocked, tuple(sent_batches))
