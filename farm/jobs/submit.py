"""Submission: route a request by the rules in force, save the job, let admission send it."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy.exc import IntegrityError

from farm.jobs import admit, result_cache, service as jobs
from farm.db.tables import IdempotencyRecord, Job, utcnow
from farm.db.session import session_scope
from farm.errors import (
    IdempotencyConflict, ModelUnavailable, PromptTooLong, QueueUnavailable, Unroutable,
)
from farm.model_dirs import resolve_model_dir
from farm.policy import get_policy
from farm.jobs.prompt_limits import too_long
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


def submit(settings: Settings, request: JobCreate, idempotency_key: str | None = None) -> Job:
    """Route, save, then release. A job is accepted once saved: when the broker is down it
    stays queued, and the next release (a beat tick) sends it. With an ``idempotency_key``,
    a retry of the same request returns the job first created; a different request under
    the same key raises IdempotencyConflict."""
    db = settings.database_url
    body_sha = (hashlib.sha256(request.model_dump_json().encode()).hexdigest()
                if idempotency_key else "")  # only a keyed submission is compared later
    if idempotency_key and (earlier := _replay(db, request.project, idempotency_key, body_sha)):
        return earlier
    chosen = route_request(request, admit.queue_loads(db))
    check_prompt_length(settings, request, chosen.variant)
    job = with_deadline(jobs.new_job(request, chosen, get_policy().rules.sha256,
                                     waiting=must_wait(chosen.as_dict(), utcnow())), request)
    answer = (result_cache.answer_from_cache(settings, job) if request.cache
              else result_cache.Answer())
    extra = tuple(answer.log)
    if idempotency_key:
        extra += (IdempotencyRecord(project=request.project, key=idempotency_key,
                                    body_sha256=body_sha, job_id=job.id, created_at=utcnow()),)
    try:
        jobs.add_jobs(db, [job], extra=extra, statements=answer.updates)
    except Exception as exc:
        answer.undo(settings)  # no job row: no file of its may stay
        # The same key, submitted at the same moment: the first one won.
        if isinstance(exc, IntegrityError) and idempotency_key and \
                (earlier := _replay(db, request.project, idempotency_key, body_sha)):
            return earlier
        raise
    if not answer.whole:  # a cached answer holds no GPU: nothing to release
        release_or_defer(settings, job)
    return job


def with_deadline(job: Job, request: JobCreate) -> Job:
    """Stamp ``deadline_at`` = created_at + deadline_s (issue #15, item 3): admission orders
    by it within a priority band and the tick's deadline watch compares against it."""
    if request.deadline_s is not None:
        job.deadline_at = job.created_at + timedelta(seconds=request.deadline_s)
    return job


def check_prompt_length(settings: Settings, request: JobCreate, variant: str) -> None:
    """PromptTooLong naming the field when the routed model would cut the text."""
    try:
        folder = resolve_model_dir(settings, get_policy().catalog.model(variant))
    except ModelUnavailable:  # not on this machine: its worker will say so
        return
    for field in ("prompt", "negative_prompt"):
        over = too_long(folder, getattr(request, field))
        if over:
            raise PromptTooLong(field, f"{field}: {over[0]} tokens; {variant} reads at most "
                                       f"{over[1]}")


def _replay(db_url: str, project: str, key: str, body_sha: str) -> Job | None:
    with session_scope(db_url) as session:
        record = session.get(IdempotencyRecord, (project, key))
    if record is None:
        return None
    if record.body_sha256 != body_sha:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was used for a different request "
                                  f"(job {record.job_id})")
    return jobs.get_job(db_url, record.job_id)


def release_or_defer(settings: Settings, job: Job | None = None) -> None:
    """After saving: the job is accepted whatever happens here; a failure to send it now
    (broker or database trouble) leaves it queued for the next release (a beat tick).
    With ``job`` (one job's submission, issue #14): a pass of its tier only if it could go
    now, one page of its queue, and none when a pass that will see it is already running
    or pending (farm.jobs.admit.release_submitted): the first job on an idle tier is sent
    before this returns; on a busy tier a submission costs a read of what the GPUs hold."""
    try:
        if job is not None:
            admit.release_submitted(settings, job)
        else:
            admit.release(settings)
    except QueueUnavailable as exc:
        log.warning("saved; the queue is unavailable, the next tick sends it: %s", exc)
    except Exception:
        log.exception("saved; release failed, the next tick retries")
