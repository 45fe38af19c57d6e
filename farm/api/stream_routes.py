"""Watching jobs (issue #13, items 4 and 5): progress as server-sent events, and the
project's webhook signing secret. HTTP errors are raised here only.

`GET /v1/jobs/{id}/stream` and `GET /v1/batches/{id}/stream` answer `text/event-stream`:
the events farm.jobs.progress_feed makes from a database read every few tenths of a second,
a `: ping` comment every PING_S seconds, and the end of the stream once the job (the batch)
has ended. A job with a deadline also gets `deadline` {deadline_at, deadline_risk,
deadline_missed_at} first and whenever the deadline watch changes it (issue #15, item 3).
`POST /v1/webhook-secret` makes the caller's project a new signing secret and
shows it this once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from farm.api.batch_routes import _batch_or_404
from farm.api.routes import Project, _get_or_404
from farm.db.session import DATABASE_OUTAGE
from farm.errors import BatchNotFound, JobNotFound
from farm.jobs import batches, controls, progress_feed as feed, service as jobs, webhooks

log = logging.getLogger(__name__)
router = APIRouter()
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def _sse(event: str, data: dict) -> dict:
    return {"event": event, "data": json.dumps(data, separators=(",", ":"), default=str)}


async def _poll(read: Callable[[], dict], diff, poll_s: float,
                ended: Callable[[dict], bool]) -> AsyncIterator[dict]:
    """Read, send what changed, until ``ended``. A database outage skips a read; the watcher
    keeps its stream (a job or batch gone meanwhile ends it)."""
    before = None
    while True:
        try:
            now = await run_in_threadpool(read)
        except DATABASE_OUTAGE as exc:
            log.warning("stream: database unavailable (%s); next read in %.1f s",
                        type(exc).__name__, poll_s)
            await asyncio.sleep(poll_s)
            continue
        except (JobNotFound, BatchNotFound):
            return
        for event, data in diff(before, now):
            yield _sse(event, data)
        if ended(now):
            return
        before = now
        await asyncio.sleep(poll_s)


@router.get("/v1/jobs/{job_id}/stream", name="stream_job")
async def stream_job(job_id: str, request: Request, project: Project) -> EventSourceResponse:
    """The job's progress as server-sent events: state, progress (step i of N per
    segment), queue (position, eta_s), done (with the video's URL); ends with the job."""
    db = request.app.state.settings.database_url
    await run_in_threadpool(_get_or_404, db, job_id, project)

    def video_url(job_id: str) -> str:
        return str(request.url_for("download_video", job_id=job_id))

    def read() -> dict:
        job = jobs.get_job(db, job_id)
        return {**feed.job_view(job, controls.queue_estimate(db, job), video_url),
                "deadline": deadline_view(job)}

    return EventSourceResponse(
        _poll(read, job_events, feed.JOB_POLL_S,
              lambda view: view["state"]["state"] in feed.FINAL),
        ping=feed.PING_S, headers=HEADERS)


def deadline_view(job) -> dict | None:
    """The job's deadline as the stream shows it; None without one."""
    if job.deadline_at is None:
        return None
    return {"deadline_at": job.deadline_at, "deadline_risk": bool(job.deadline_risk),
            "deadline_missed_at": job.deadline_missed_at}


def job_events(before: dict | None, now: dict) -> list[tuple[str, dict]]:
    """progress_feed's events, with ``deadline`` when it is new or changed, before ``done``."""
    out = feed.job_events(before, now)
    if now["deadline"] is not None and (before is None or before["deadline"] != now["deadline"]):
        at = len(out) - (bool(out) and out[-1][0] == "done")
        out.insert(at, ("deadline", now["deadline"]))
    return out


@router.get("/v1/batches/{batch_id}/stream", name="stream_batch")
async def stream_batch(batch_id: str, request: Request, project: Project
                       ) -> EventSourceResponse:
    """The batch as server-sent events: counts, each job's state changes, done (with its
    report's URLs); ends when the batch is done."""
    db = request.app.state.settings.database_url
    await run_in_threadpool(_batch_or_404, db, batch_id, project)

    def report_url(batch_id: str, kind: str) -> str:
        return str(request.url_for("get_batch_report", batch_id=batch_id, kind=kind))

    def read() -> dict:
        batch, states = batches.get_batch(db, batch_id)
        return feed.batch_view(batch, states, batches.counts(states), report_url)

    return EventSourceResponse(
        _poll(read, feed.batch_events, feed.BATCH_POLL_S, lambda view: view["state"] == "done"),
        ping=feed.PING_S, headers=HEADERS)


class WebhookSecret(BaseModel):
    project: str
    webhook_secret: str  # shown this once; deliveries are signed with it from now on
    header: str = webhooks.SIGNATURE_HEADER


@router.post("/v1/webhook-secret", response_model=WebhookSecret)
def rotate_webhook_secret(request: Request, project: Project) -> WebhookSecret:
    """A new webhook signing secret for the caller's project, replacing the old one; shown
    this once (deliveries retried from now on are signed with the new one)."""
    secret = webhooks.rotate_secret(request.app.state.settings.database_url, project)
    return WebhookSecret(project=project, webhook_secret=secret)
