"""What happens after a segment fails: retried elsewhere, or failed for good (issue #6).

The rules, counted from the job's event log (farm.jobs.events):
- a worker that has failed this job's segments ``blocklist_after`` times (3) is blocklisted
  for the job: it hands the job's segments on to another worker instead of running them;
- a segment fails for good once it has failed on ``distinct_workers`` (3) different workers,
  or when every worker serving its queue is blocklisted for the job;
- a retry goes to a worker (Celery's per-worker queue) that has not failed this segment
  when there is one, else to one not blocklisted, else back to the tier's queue.

`decide` is plain Python over made-up events in the unit tests; `serving_workers` asks the
live Celery workers which of them consume a queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from farm.jobs.events import failures_by_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    final: str | None  # why the segment fails for good; None: retry it
    target: str | None  # the worker to retry on; None: back to the tier's queue
    newly_blocklisted: bool  # the failing worker has just reached the limit


def blocklisted(events, blocklist_after: int = 3) -> set[str]:
    return {w for w, n in failures_by_worker(events).items() if n >= blocklist_after}


def failed_on(events, segment_index: int) -> set[str]:
    """The workers on which the segment has failed."""
    return {e.worker for e in events if e.segment_index == segment_index}


def exhausted(events, segment_index: int, distinct_workers: int = 3) -> str | None:
    """Why the segment has failed for good by the different-workers rule, or None."""
    workers = failed_on(events, segment_index)
    if len(workers) >= distinct_workers:
        return f"segment {segment_index} failed on {len(workers)} different workers"
    return None


def decide(events, segment_index: int, worker: str, queue: str, serving: set[str] | None,
           blocklist_after: int = 3, distinct_workers: int = 3) -> Decision:
    """``events``: the job's failure events, this failure included. ``serving``: the workers
    consuming ``queue`` now (None: unknown, as in the one-process `farm render`)."""
    newly = failures_by_worker(events)[worker] == blocklist_after
    final = exhausted(events, segment_index, distinct_workers)
    if final:
        return Decision(final, None, newly)
    target, why = pick_worker(events, segment_index, worker, queue, serving, blocklist_after)
    return Decision(why and f"segment {segment_index} cannot run: {why}", target, newly)


def pick_worker(events, segment_index: int, worker: str, queue: str, serving: set[str] | None,
                blocklist_after: int = 3) -> tuple[str | None, str | None]:
    """-> (worker to send the segment to, or None for the queue; why none can take it)."""
    if serving is None:  # unknown: the tier's queue, where another worker may take it
        return None, None
    blocked = blocklisted(events, blocklist_after)
    fresh = sorted(serving - blocked - failed_on(events, segment_index))
    usable = sorted(serving - blocked)
    if fresh or usable:
        return (fresh or usable)[0], None
    return None, (f"no worker of queue {queue} is left for this job: blocklisted "
                  f"{sorted(blocked)} (after {blocklist_after} failures each)"
                  + (f", serving {sorted(serving)}" if serving else ", none serving it"))


# A blocklisted worker that cannot tell who else serves the queue puts the segment back on
# it; after this many hand-ons of one segment nobody else took it, and it fails.
MAX_HAND_ONS = 10


def serving_workers(app, queue: str, me: str, timeout: float = 1.0) -> set[str] | None:
    """Names of the live Celery workers consuming ``queue``. None when that cannot be known:
    in eager mode, or when not even the asking worker ``me`` answered (a broker without
    broadcast, as kombu's SQLAlchemy transport of the one-machine farm)."""
    if app.conf.task_always_eager:
        return None
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    if me not in replies:
        return None
    return {worker for worker, queues in replies.items()
            if any(q.get("name") == queue for q in queues)}


def segment_errors(events, segment_index: int) -> str:
    """The segment's failures, one per line, for the job's error."""
    return "\n".join(f"[{e.worker}] {e.message}" for e in events
                     if e.segment_index == segment_index)
