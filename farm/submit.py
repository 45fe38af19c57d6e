"""Submission: route a request by the rules in force, save the job, let admission send it."""

from __future__ import annotations

import logging
from datetime import datetime
from functools import lru_cache

from farm import admission, jobs
from farm.db.models import Job, utcnow
from farm.errors import QueueUnavailable, Unroutable
from farm.policy import get_policy
from farm.schemas import JobCreate
from farm.settings import Settings
from scheduler.routing import JobSpec, NoRoute, QueueLoad, Route, route
from scheduler.windows import Window

log = logging.getLogger(__name__)


def job_spec(request: JobCreate, batch: bool = False) -> JobSpec:
    return JobSpec(track=request.track, width=request.width, height=request.height,
                   frames=request.frames, fps=request.fps, priority=request.priority,
                   batch=batch, project=request.project, model=request.model,
                   steps=request.steps, deadline_s=request.deadline_s)


def route_request(request: JobCreate, loads: dict[str, QueueLoad], batch: bool = False) -> Route:
    policy = get_policy()
    try:
        return route(job_spec(request, batch), policy.rules, policy.catalog, loads)
    except NoRoute as exc:
        raise Unroutable(str(exc)) from None


@lru_cache(maxsize=256)
def parse_window(window: str, timezone: str) -> Window:
    return Window.parse(window, timezone)


def must_wait(route_dict: dict, now: datetime) -> bool:
    """The job's window (its batch's, else its rule's) is set and closed now."""
    window = route_dict.get("window")
    return bool(window) and not parse_window(window, route_dict.get("timezone") or "UTC").is_open(now)


def submit(settings: Settings, request: JobCreate) -> Job:
    """Route, save, then release. A job is accepted once saved: when the broker is down it
    stays queued, and the next release (a beat tick) sends it."""
    chosen = route_request(request, admission.queue_loads(settings.database_url))
    job = jobs.new_job(request, chosen, get_policy().rules.sha256,
                       waiting=must_wait(chosen.as_dict(), utcnow()))
    jobs.add_jobs(settings.database_url, [job])
    release_or_defer(settings)
    return job


def release_or_defer(settings: Settings) -> None:
    """After saving: the job is accepted whatever happens here; a failure to send it now
    (broker or database trouble) leaves it queued for the next release (a beat tick)."""
    try:
        admission.release(settings)
    except QueueUnavailable as exc:
        log.warning("saved; the queue is unavailable, the next tick sends it: %s", exc)
    except Exception:
        log.exception("saved; release failed, the next tick retries")
