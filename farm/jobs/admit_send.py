"""Sending what an admission pass chose (farm.jobs.admit): each job its own chord, each
batch one batched render (issue #15, farm.jobs.dispatch.enqueue_batch), in admission order
(a batch where its first member stands); and, for a tier left blocked, the preemption
trigger (farm.jobs.preempt), whose failure never fails the pass."""

from __future__ import annotations

import logging
from collections.abc import Callable

from farm.errors import QueueUnavailable

log = logging.getLogger(__name__)


def _units(passes) -> list[list[str]]:
    """Send units in order: a batch's members together, every other job alone."""
    units = []
    for passed in passes:
        batch_of = {j: b for b in passed.batches if len(b) > 1 for j in b}
        done = set()
        for job_id in passed.chosen:
            if job_id in done:
                continue
            unit = list(batch_of.get(job_id, (job_id,)))
            done.update(unit)
            units.append(unit)
    return units


def send(db: str, passes, enqueue: Callable | None, enqueue_batch: Callable | None) -> list[str]:
    """Send every chosen job; returns their ids. On a refused send, the claims of that unit
    and of every later one are undone (the next release sends them) and QueueUnavailable
    is raised."""
    from farm.jobs import service as jobs

    if enqueue is None:
        from farm.jobs.dispatch import enqueue_job as enqueue
    if enqueue_batch is None:
        from farm.jobs.dispatch import enqueue_batch
    units, sent = _units(passes), []
    for i, unit in enumerate(units):
        try:
            if len(unit) == 1:
                enqueue(jobs.get_job(db, unit[0]))
            else:
                enqueue_batch([jobs.get_job(db, j) for j in unit], db_url=db)
        except Exception as exc:
            later = [j for u in units[i:] for j in u]
            jobs.unclaim(db, later)
            log.error("jobs %s stay queued: could not be sent: %s", later, exc)
            raise QueueUnavailable(f"the queue is unavailable: {exc}") from exc
        sent += unit
    return sent


def preempt_quietly(settings, tier: str, job_id: str) -> list[int]:
    """farm.jobs.preempt.preempt_for_waiting for the job that found no room; a failure is
    logged and left to the next tick's pass, which looks again."""
    from farm.jobs.preempt import preempt_for_waiting

    try:
        return preempt_for_waiting(settings, tier, job_id)
    except Exception:
        log.exception("tier %s: looking for segments to preempt failed; the next tick retries",
                      tier)
        return []
