"""Batches of like segments rendered as one pass through the transformer (issue #15, item 2).

Pure: admission (farm/jobs/admit_batches.py) asks which of the jobs it releases in one pass
go together; the batching runner renders them with the batch dimension, each with its own
noise, prompt embedding and seed. Jobs are alike when one batched forward pass can serve
them all: the same variant on the same tier at the same size, frames, steps, guidance and
step caching (the ``batch_key``).

The rule the issue asks to be tested: batching never delays a job of higher priority than
every member of a batch. A batch is sent where its first member stands in admission order,
so a later member is pulled forward past the jobs between; it may not be pulled past a job
of higher priority than every member. And a batch keeps to its first member's priority band
(scheduler.deadlines.band): a batch renders longer than a solo segment
(``batch_seconds``), so a band-9 final is never slowed by band-1 companions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from scheduler.deadlines import band


def batch_key(variant: str, tier: str, width: int, height: int, frames: int, steps: int,
              guidance_high: float, guidance_low: float, cache: dict | None) -> tuple:
    """What must be equal for segments to share one batched forward pass. ``cache`` (the
    route's step-caching settings) is written canonically so equal settings give equal
    keys whatever their order."""
    cache_text = None if cache is None else json.dumps(cache, sort_keys=True)
    return (variant, tier, int(width), int(height), int(frames), int(steps),
            float(guidance_high), float(guidance_low), cache_text)


@dataclass(frozen=True, slots=True)
class Batchable:
    job_id: str
    priority: int
    key: tuple | None  # None: renders alone (continuous, several segments, a first frame)


def form_batches(in_order: list[Batchable], max_batch: int) -> list[list[str]]:
    """Admission order in, batches of job ids out in the order to send them (singletons
    included). A batch starts at the first job not yet placed and takes, in order, the later
    jobs of its key and band, up to ``max_batch``, never one that would be pulled past a job
    of higher priority than every member (so the rule above holds for every batch)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
    placed: set[int] = set()
    batches: list[list[str]] = []
    for head_at, head in enumerate(in_order):
        if head_at in placed:
            continue
        placed.add(head_at)
        members = [head]
        top = head.priority  # highest priority among the members
        # highest priority among the jobs passed over since the head
        passed = -1
        for at in range(head_at + 1, len(in_order)):
            if head.key is None or len(members) >= max_batch:
                break
            job = in_order[at]
            if at in placed:
                continue
            joins = (job.key == head.key and band(job.priority) == band(head.priority)
                     and passed <= max(top, job.priority))
            if joins:
                placed.add(at)
                members.append(job)
                top = max(top, job.priority)
            else:
                passed = max(passed, job.priority)
        batches.append([m.job_id for m in members])
    return batches


def batch_cap(like_jobs: int, free_groups: int, max_batch: int) -> int:
    """How many like jobs one batch may take now: idle groups are filled first, one job
    each, since a job alone on an idle group finishes sooner than in a batch
    (``batch_seconds``); only when like jobs outnumber the free groups are they spread over
    them, ceil(like_jobs / free_groups) a batch (all of them on the next group to free when
    none is free), at most ``max_batch``. 1: no batch."""
    if like_jobs < 0 or free_groups < 0:
        raise ValueError(f"like_jobs and free_groups must be >= 0, got {like_jobs!r}, "
                         f"{free_groups!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
    if like_jobs <= free_groups:
        return 1
    return max(1, min(max_batch, -(-like_jobs // max(1, free_groups))))


def batch_seconds(solo_seconds: float, size: int, marginal: float) -> float:
    """A batch's render time: ``solo * (1 + (size - 1) * marginal)``. ``marginal`` is the
    variant's measured cost of one more member (benchmarks/batching.py): 1.0, no gain; 0.25,
    a batch of 4 takes 1.75x one solo render."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size!r}")
    if not 0 < marginal <= 1:
        raise ValueError(f"batch_marginal must be in (0, 1], got {marginal!r}")
    if solo_seconds < 0:
        raise ValueError(f"solo_seconds must be >= 0, got {solo_seconds!r}")
    return solo_seconds * (1 + (size - 1) * marginal)


def may_hold(job: Batchable, age_ms: float, batch_wait_ms: int, max_batch: int,
             others_waiting: list[int]) -> bool:
    """Whether admission may hold a lone like job for companions instead of sending it now:
    its variant batches (``max_batch`` > 1), it is younger than ``batch_wait_ms`` (0: never
    hold), and no other job waiting for its tier (``others_waiting``: their priorities) has a
    higher priority, so the hold, which keeps the job's group reserved and idle for at most
    that window, delays only the held job and work of its priority or lower."""
    return (job.key is not None and max_batch > 1 and batch_wait_ms > 0
            and age_ms < batch_wait_ms and all(p <= job.priority for p in others_waiting))
