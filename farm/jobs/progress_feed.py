"""What the progress streams send (issue #13, item 4; farm/api/stream_routes.py).

A stream reads its job (by primary key, with its segments) or its batch (the batch row and
its jobs' states through the index on ``jobs.batch_id``) every few tenths of a second,
turns the read into a *view* (plain dicts), and sends only what differs from the view
before: no event when nothing changed. Polling the database rather than a pub/sub channel:
it needs no writer to publish, sees every change however it was made, and costs one
primary-key read per watcher per poll.

Job events: ``state`` {id, state, error}; ``progress`` per segment {index, state, step,
steps, progress, job_progress} (step i of N: the segment's progress fraction times the
job's steps); ``queue`` {queue_position, eta_s}; last ``done`` {id, state, error,
output_url}, after which the stream ends. Batch events: ``counts`` {jobs, counts}, ``job``
{id, state} for each job whose state changed, last ``done`` {id, state, counts,
report_urls}.
"""

from __future__ import annotations

from collections.abc import Callable

from farm.db.tables import FINAL_JOB_STATES, Batch, Job

JOB_POLL_S = 0.5  # seconds between reads of a watched job
BATCH_POLL_S = 1.0  # of a watched batch (its jobs' states: up to thousands of rows)
PING_S = 10  # a comment line this often keeps proxies from closing an idle stream
FINAL = frozenset(s.value for s in FINAL_JOB_STATES)


def segment_step(progress: float, steps: int) -> int:
    """Denoising steps done of ``steps``, from the segment's progress fraction (0..1)."""
    return max(0, min(steps, round(progress * steps)))


def job_view(job: Job, queue: tuple[int | None, float | None],
             output_url: Callable[[str], str]) -> dict:
    """``queue``: (queue_position, eta_s) as farm.jobs.controls.queue_estimate gives them."""
    position, eta = queue
    return {
        "state": {"id": job.id, "state": job.state, "error": job.error},
        "segments": {s.index: {"index": s.index, "state": s.state,
                               "step": segment_step(s.progress, job.steps), "steps": job.steps,
                               "progress": round(s.progress, 4),
                               "job_progress": round(job.progress, 4)}
                     for s in job.segments},
        "queue": {"queue_position": position,
                  "eta_s": None if eta is None else round(eta)},  # whole seconds
        "output_url": output_url(job.id) if job.state == "succeeded" else None,
    }


def _segment_changed(before: dict | None, index: int, seg: dict) -> bool:
    if before is None:
        return True
    old = before["segments"].get(index)
    # job_progress alone moving (another segment's step) is that segment's event
    return old is None or {k: v for k, v in old.items() if k != "job_progress"} != \
        {k: v for k, v in seg.items() if k != "job_progress"}


def job_events(before: dict | None, now: dict) -> list[tuple[str, dict]]:
    """The events that take a watcher from ``before`` (None: nothing sent yet) to ``now``."""
    out: list[tuple[str, dict]] = []
    if before is None or before["state"] != now["state"]:
        out.append(("state", now["state"]))
    out += [("progress", seg) for index, seg in now["segments"].items()
            if _segment_changed(before, index, seg)]
    queue_known = any(v is not None for v in now["queue"].values())
    if (before["queue"] != now["queue"]) if before else queue_known:
        out.append(("queue", now["queue"]))
    if now["state"]["state"] in FINAL:
        out.append(("done", {**now["state"], "output_url": now["output_url"]}))
    return out


def batch_view(batch: Batch, states: list[tuple[str, str]], counts: dict[str, int],
               report_url: Callable[[str, str], str]) -> dict:
    """``states``: (job id, state) of every job of the batch."""
    return {"id": batch.id, "state": batch.state, "jobs": dict(states), "counts": counts,
            "report_urls": {kind: report_url(batch.id, kind) for kind in batch.report_keys}}


def batch_events(before: dict | None, now: dict) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    if before is None or before["counts"] != now["counts"]:
        out.append(("counts", {"id": now["id"], "jobs": len(now["jobs"]),
                               "counts": now["counts"]}))
    if before is not None:
        out += [("job", {"id": job_id, "state": state}) for job_id, state in now["jobs"].items()
                if before["jobs"].get(job_id) != state]
    if now["state"] == "done":
        out.append(("done", {"id": now["id"], "state": "done", "counts": now["counts"],
                             "report_urls": now["report_urls"]}))
    return out
