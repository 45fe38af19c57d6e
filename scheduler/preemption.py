"""Which running segments yield their group to an urgent waiting job (issue #15, item 1).

Pure: the farm (farm/jobs/preempt.py) feeds it the tier's running segments and free GPUs,
and asks the chosen ones to yield at their next denoising step (their state is saved and
they resume later from that step, so nothing is lost but the wait).

A job qualifies when its route sets ``preempt_at`` and its priority reaches it. A running
segment is eligible when it is at least ``margin`` lower in priority (so a final at 90 does
not evict a final at 85, only the overnight batch at 50 or below with the default margin of
20), has yielded fewer than ``max_preemptions`` times (so it cannot starve), and is not
already asked. Victims are taken lowest priority first, then the most recently started (it
loses the least work to the restart overhead and the oldest keeps its place), until the
freed GPUs cover the urgent job; a partial set is never asked: yielding without letting the
urgent job in only slows the farm.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Running:
    """A segment rendering on a group of the tier."""
    segment_id: int
    job_id: str
    priority: int
    gpus: int  # GPUs its group holds
    preemptions: int  # times it has yielded already
    started: float  # seconds, any clock: later = started more recently
    requested: bool = False  # already asked to yield: its GPUs are as good as free


def qualifies(urgent_priority: int, preempt_at: int | None) -> bool:
    """The urgent job's route allows it to preempt at all."""
    return preempt_at is not None and urgent_priority >= preempt_at


def why_not_eligible(seg: Running, urgent_priority: int, margin: int,
                     max_preemptions: int) -> str | None:
    """None when ``seg`` may be asked to yield to a job of ``urgent_priority``; else why not
    (``farm rules explain`` prints it)."""
    if seg.requested:
        return "already asked to yield"
    if seg.priority > urgent_priority - margin:
        return (f"priority {seg.priority} is not {margin} below {urgent_priority} "
                f"(preempt_margin)")
    if seg.preemptions >= max_preemptions:
        return f"has yielded {seg.preemptions} time(s), the most allowed (FARM_MAX_PREEMPTIONS)"
    return None


def victim_order(segments: list[Running]) -> list[Running]:
    """Lowest priority first, then the most recently started, then the segment id (so the
    choice is deterministic)."""
    return sorted(segments, key=lambda s: (s.priority, -s.started, s.segment_id))


def choose_victims(urgent_priority: int, need_gpus: int, free_gpus: int,
                   running: list[Running], preempt_at: int | None, margin: int,
                   max_preemptions: int) -> list[Running]:
    """The running segments to ask to yield now, or [] when the urgent job does not
    qualify, when free GPUs plus those already asked to yield cover it, or when no set of
    eligible victims frees enough."""
    if margin < 1:
        raise ValueError(f"preempt_margin must be >= 1, got {margin!r}")
    if need_gpus < 1:
        raise ValueError(f"need_gpus must be >= 1, got {need_gpus!r}")
    if not qualifies(urgent_priority, preempt_at):
        return []
    coming = free_gpus + sum(s.gpus for s in running if s.requested)
    if coming >= need_gpus:
        return []
    eligible = [s for s in running
                if why_not_eligible(s, urgent_priority, margin, max_preemptions) is None]
    chosen, freed = [], coming
    for seg in victim_order(eligible):
        if freed >= need_gpus:
            break
        chosen.append(seg)
        freed += seg.gpus
    return chosen if freed >= need_gpus else []
