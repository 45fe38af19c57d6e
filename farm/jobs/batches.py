"""Batches: one job per line of a JSONL or CSV file, released now or in a daily window.

`tick` runs on every Celery beat tick: it wakes waiting jobs whose window has opened, parks
the unsent ones whose window has closed, releases what admission allows, and writes the
report of each batch whose jobs have all ended.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import select

from farm.jobs import admit, result_cache, service as jobs, webhooks
from farm.db.tables import FINAL_JOB_STATES, Batch, Job, JobState, utcnow
from farm.db.session import session_scope
from farm.errors import BadBatch, BatchNotFound, PromptTooLong, Unroutable
from farm.policy import get_policy
from farm.schemas import BatchCreate, JobCreate
from farm.settings import Settings
from farm.jobs.submit import (
    check_prompt_length, must_wait, parse_window, release_or_defer, route_request,
    with_deadline,
)
from scheduler.batch_lines import BatchFileError, parse_batch
from scheduler.routing import QueueLoad

log = logging.getLogger(__name__)

FINAL = tuple(s.value for s in FINAL_JOB_STATES)


def _line_request(line, body: BatchCreate) -> JobCreate:
    fields = dict(line.fields)
    if fields.setdefault("project", body.project) != body.project:
        raise BadBatch(f"line {line.line}: project: got {fields['project']!r}: a batch belongs "
                       f"to one project ({body.project!r})", line.line, "project",
                       fields["project"])
    try:
        return JobCreate(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"])) or "line"
        message = err["msg"].removeprefix("Value error, ")
        raise BadBatch(f"line {line.line}: {field}: {message} (got {err.get('input')!r})",
                       line.line, field, err.get("input")) from None


def create_batch(settings: Settings, body: BatchCreate,
                 count_jobs: Callable[[int], None] | None = None) -> tuple[Batch, list[Job]]:
    """Parse, validate and route every line, then save the batch and its jobs together.
    ``count_jobs(n)``: called with the number of jobs before saving; it raises (OverLimit,
    farm/api/limits.py) to refuse them all."""
    try:
        lines = parse_batch(body.content, body.format, body.defaults)
    except BatchFileError as exc:
        raise BadBatch(str(exc), exc.line, exc.field, exc.value) from None
    requests = [(line, _line_request(line, body)) for line in lines]
    batch = Batch(id=uuid.uuid4().hex, name=body.name, project=body.project, window=body.window,
                  timezone=body.timezone, on_window_close=body.on_window_close, state="open",
                  report_keys={}, webhook=body.webhook,
                  webhook_events=list(body.webhook_events), created_at=utcnow())
    loads = admit.queue_loads(settings.database_url)
    rules_sha = get_policy().rules.sha256
    now, new, answers = utcnow(), [], []
    for line, request in requests:
        try:
            chosen = route_request(request, loads, batch=True)
            check_prompt_length(settings, request, chosen.variant)
        except Unroutable as exc:
            raise BadBatch(f"line {line.line}: route: {exc}", line.line, "route") from None
        except PromptTooLong as exc:
            raise BadBatch(f"line {line.line}: {exc}", line.line, exc.field) from None
        if body.window:  # the batch's own window wins over its rule's
            chosen = dataclasses.replace(chosen, window=body.window, timezone=body.timezone)
        new.append(with_deadline(jobs.new_job(request, chosen, rules_sha, batch.id,
                                              waiting=must_wait(chosen.as_dict(), now)),
                                 request))
        if request.cache:  # a repeat of a rendered request is answered at once (issue #13)
            answers.append(result_cache.answer_from_cache(settings, new[-1]))
        # The batch's own jobs count in the queues the next lines see (fallbacks spill).
        load = loads.get(chosen.queue, QueueLoad())
        loads[chosen.queue] = QueueLoad(load.waiting_jobs + 1,
                                        load.backlog_gpu_s + (chosen.gpu_seconds or 0.0))
    if count_jobs is not None:
        count_jobs(len(new))
    try:
        jobs.add_jobs(settings.database_url, new, batch,
                      extra=tuple(e for a in answers for e in a.log),
                      statements=tuple(u for a in answers for u in a.updates))
    except Exception:
        for answer in answers:  # no job rows: no file of theirs may stay
            answer.undo(settings)
        raise
    log.info("batch %s: %d jobs, window %s", batch.id, len(new), body.window or "none")
    release_or_defer(settings)
    return batch, new


def get_batch(db_url: str, batch_id: str) -> tuple[Batch, list[tuple[str, str]]]:
    """The batch and its jobs' (id, state), oldest first."""
    with session_scope(db_url) as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise BatchNotFound(batch_id)
        rows = session.execute(select(Job.id, Job.state).where(Job.batch_id == batch_id)
                               .order_by(Job.created_at, Job.id)).all()
        return batch, [(r.id, r.state) for r in rows]


def counts(states: list[tuple[str, str]]) -> dict[str, int]:
    return dict(Counter(state for _, state in states))


def apply_windows(db_url: str, now: datetime) -> tuple[int, int]:
    """(jobs woken, jobs parked or canceled) for the windows as they are at ``now``. A job
    that has started (started_at set) is never parked nor canceled: un-sent again, it was
    preempted (issue #15), and running ones finish when their window closes."""
    with session_scope(db_url) as session:
        rows = session.execute(
            select(Job.id, Job.state, Job.route, Job.batch_id, Job.dispatched_at,
                   Job.started_at)
            .where(Job.state.in_([JobState.waiting.value, JobState.queued.value]))
        ).all()
        close_rule = dict(session.execute(select(Batch.id, Batch.on_window_close)
                                          .where(Batch.state == "open")).all())
    wake, park, cancel = [], [], []
    for r in rows:
        if not r.route.get("window"):
            continue
        waits = must_wait(r.route, now)
        if r.state == JobState.waiting.value and not waits:
            wake.append(r.id)
        elif (r.state == JobState.queued.value and waits and r.dispatched_at is None
              and r.started_at is None):
            (cancel if close_rule.get(r.batch_id) == "cancel" else park).append(r.id)
    woken = jobs.wake_jobs(db_url, wake) if wake else 0
    parked = (jobs.park_jobs(db_url, park, cancel=False) if park else 0) + \
             (jobs.park_jobs(db_url, cancel, cancel=True) if cancel else 0)
    if woken or parked:
        log.info("windows: %d job(s) released to the queue, %d parked or canceled", woken, parked)
    return woken, parked


def finish_batches(settings: Settings) -> list[str]:
    """Mark done, with a stored report, every open batch whose jobs have all ended."""
    from farm.jobs.reports import write_report

    db = settings.database_url
    with session_scope(db) as session:
        live = select(Job.batch_id).where(Job.batch_id.is_not(None), Job.state.not_in(FINAL))
        done_ids = session.scalars(select(Batch.id).where(Batch.state == "open",
                                                          Batch.id.not_in(live))).all()
    finished = []
    for batch_id in done_ids:
        try:
            keys = write_report(settings, batch_id)
        except Exception:  # one batch's storage trouble must not stop the others' reports
            log.exception("batch %s: report failed; the next tick tries again", batch_id)
            continue
        with session_scope(db) as session:
            # Locked: of two ticks, one marks it done and writes its webhook (issue #13).
            batch = session.get(Batch, batch_id, with_for_update=True)
            if batch.state == "open":
                batch.state, batch.report_keys, batch.finished_at = "done", keys, utcnow()
                webhooks.batch_completed(session, batch)
                finished.append(batch_id)
                log.info("batch %s done; report at %s", batch_id, keys)
    return finished


def tick(settings: Settings, now: datetime | None = None) -> dict:
    woken, parked = apply_windows(settings.database_url, now or utcnow())
    released = admit.release(settings)
    finished = finish_batches(settings)
    return {"woken": woken, "parked": parked, "released": len(released), "finished": finished}


def open_window(batch: Batch, now: datetime) -> bool | None:
    if not batch.window:
        return None
    return parse_window(batch.window, batch.timezone).is_open(now)
