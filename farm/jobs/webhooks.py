"""Webhooks (issue #13, item 5): signed event deliveries through a durable outbox.

An event is a row of ``webhook_deliveries`` written in the SAME transaction as the state
change it reports (farm.jobs.service calls the ``job_*`` hooks below right after its
compare-and-set), so a committed change always has its row and a rolled-back one never
does; the compare-and-set lets only one writer see the change, so each event is written
once. farm.jobs.webhook_delivery sends due rows from the beat tick and retries failures
with capped exponential backoff.

Events: ``start`` (the job began running), ``progress`` (at most one per 10% of the job's
progress, counted afresh in each run: a retried job reports its tenths again),
``completed`` (the job ended: succeeded, failed, canceled or expired), ``deadline_missed``
(issue #15: its deadline passed while it was live, or it was delivered after it; once, from
farm.jobs.deadline_watch, with ``deadline_at`` and ``deadline_missed_at``). A job's body carries
``run``: how many times it was retried before this event (0 the first time), so a retried
job's second ``completed`` is told from a repeat of the first (which has the same
``Farm-Delivery`` id); and ``output_url``: absolute under FARM_PUBLIC_URL when that is set,
else the API path ``/v1/jobs/{id}/video``. A batch's
webhook gets ``completed`` once when the whole batch is done, and its jobs' ``start`` and
``progress`` events when its ``webhook_events`` list them.

Signing: ``Farm-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``
with the project's secret (``project_secrets``, stored as is: it must sign).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time

from sqlalchemy import func, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.db.session import session_scope
from farm.db.tables import (
    Batch, Job, JobEvent, JobState, ProjectSecret, WebhookDelivery, utcnow,
)
from farm.jobs.events import RETRIED
from farm.settings import get_settings

START, PROGRESS, COMPLETED = "start", "progress", "completed"
DEADLINE_MISSED = "deadline_missed"  # issue #15: once, when the job's deadline passed unmet
EVENTS = (START, PROGRESS, COMPLETED, DEADLINE_MISSED)
SIGNATURE_HEADER = "Farm-Signature"
PROGRESS_STEPS = 10  # progress events at each tenth of the job's progress, no more often
# The ends a ``completed`` event reports; ``deleted`` (files removed later) is not one.
COMPLETED_STATES = frozenset({JobState.succeeded.value, JobState.failed.value,
                              JobState.canceled.value, JobState.expired.value})


# ---- signing ---------------------------------------------------------------------------------

def signature(secret: str, body: str, timestamp: int) -> str:
    """The Farm-Signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: str, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret``, sent within ``tolerance_s`` of now
    (a receiver's check; the README shows the same in a few lines)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


# ---- the project's secret --------------------------------------------------------------------

def _new_secret() -> str:
    return "whsec_" + secrets.token_hex(32)


def secret_for(session: Session, project: str) -> str:
    """The project's signing secret, made on first need (then only a rotation shows it)."""
    found = session.scalar(select(ProjectSecret.webhook_secret)
                           .where(ProjectSecret.project == project))
    if found is not None:
        return found
    savepoint = session.begin_nested()
    try:
        session.add(ProjectSecret(project=project, webhook_secret=_new_secret(),
                                  created_at=utcnow()))
        savepoint.commit()
    except IntegrityError:  # another process made it meanwhile: use theirs
        savepoint.rollback()
    return session.scalar(select(ProjectSecret.webhook_secret)
                          .where(ProjectSecret.project == project))


def rotate_secret(db_url: str, project: str) -> str:
    """A new secret for the project, replacing any earlier one; returned to be shown once.
    Deliveries sent from now on are signed with it (retries too)."""
    value = _new_secret()
    with session_scope(db_url) as session:
        row = session.get(ProjectSecret, project, with_for_update=True)
        if row is None:
            session.add(ProjectSecret(project=project, webhook_secret=value,
                                      created_at=utcnow()))
        else:
            row.webhook_secret, row.created_at = value, utcnow()
    return value


# ---- writing events (inside the caller's transaction) ----------------------------------------

def _job_row(session: Session, job_id: str):
    """Column read, not session.get: the identity map may hold the row as it was before the
    caller's UPDATE."""
    return session.execute(
        select(Job.id, Job.project, Job.batch_id, Job.state, Job.progress, Job.error,
               Job.webhook, Job.webhook_events, Job.started_at, Job.finished_at)
        .where(Job.id == job_id)
    ).one_or_none()


def _urls(session: Session, job, kind: str) -> list[str]:
    """Where ``kind`` of this job goes: its own webhook if it asked, and its batch's for
    ``start``/``progress`` if the batch asked (a batch's ``completed`` is the batch's)."""
    urls = [job.webhook] if job.webhook and kind in (job.webhook_events or []) else []
    if job.batch_id and kind != COMPLETED:
        batch = session.execute(select(Batch.webhook, Batch.webhook_events)
                                .where(Batch.id == job.batch_id)).one_or_none()
        if batch and batch.webhook and kind in (batch.webhook_events or []) \
                and batch.webhook not in urls:
            urls.append(batch.webhook)
    return urls


def output_url(job_id: str, public_url: str) -> str:
    """Where the job's video is downloaded: absolute under ``public_url`` (FARM_PUBLIC_URL)
    when set, else the API path, which the receiver resolves against the farm it called."""
    path = f"/v1/jobs/{job_id}/video"
    return public_url.rstrip("/") + path if public_url else path


def _runs_before(session: Session, job_id: str) -> int:
    """Times the job was retried: its ``retried`` log events (index on job_events.job_id)."""
    return session.scalar(select(func.count()).where(JobEvent.job_id == job_id,
                                                     JobEvent.kind == RETRIED)) or 0


def _job_body(session: Session, job, kind: str) -> dict:
    succeeded = job.state == JobState.succeeded.value
    return {"event": kind, "job_id": job.id, "project": job.project, "batch_id": job.batch_id,
            "state": job.state, "progress": round(job.progress or 0.0, 4), "error": job.error,
            "run": _runs_before(session, job.id),
            "output_url": output_url(job.id, get_settings().public_url) if succeeded else None,
            "sent_for": utcnow().isoformat()}


def _enqueue(session: Session, project: str, kind: str, urls: list[str], body: dict,
             job_id: str | None = None, batch_id: str | None = None) -> int:
    text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    now = utcnow()
    session.add_all(WebhookDelivery(project=project, job_id=job_id, batch_id=batch_id,
                                    event=kind, url=url, body=text, attempts=0,
                                    next_attempt_at=now, created_at=now) for url in urls)
    return len(urls)


def job_started(session: Session, job_id: str) -> int:
    """After the job's queued -> running compare-and-set succeeded. Rows written."""
    job = _job_row(session, job_id)
    urls = _urls(session, job, START) if job else []
    return _enqueue(session, job.project, START, urls, _job_body(session, job, START), job_id,
                    job.batch_id) if urls else 0


def job_ended(session: Session, job_id: str) -> int:
    """After a compare-and-set moved the job to a final state (any but ``deleted``)."""
    job = _job_row(session, job_id)
    if job is None or job.state not in COMPLETED_STATES:
        return 0
    urls = _urls(session, job, COMPLETED)
    return _enqueue(session, job.project, COMPLETED, urls, _job_body(session, job, COMPLETED),
                    job_id, job.batch_id) if urls else 0


def _tenths(progress: float) -> int:
    return int(progress * PROGRESS_STEPS + 1e-9)


def job_progressed(session: Session, job_id: str) -> int:
    """After the job's progress was updated: a ``progress`` event when it crossed into a new
    tenth since the last one sent in this run (rows written at or after the job's
    ``started_at``: a retry clears it and the next start sets it anew). Concurrent reports of
    one job are serialised by the row lock of their UPDATE of the job, so a tenth is written
    once."""
    job = _job_row(session, job_id)
    if job is None or job.state != JobState.running.value or _tenths(job.progress) == 0:
        return 0
    urls = _urls(session, job, PROGRESS)
    if not urls:
        return 0
    last = session.scalar(select(WebhookDelivery.body).where(
        WebhookDelivery.job_id == job_id, WebhookDelivery.event == PROGRESS,
        WebhookDelivery.created_at >= job.started_at if job.started_at else true())
        .order_by(WebhookDelivery.id.desc()).limit(1))
    if last is not None and _tenths(json.loads(last)["progress"]) >= _tenths(job.progress):
        return 0
    return _enqueue(session, job.project, PROGRESS, urls, _job_body(session, job, PROGRESS),
                    job_id, job.batch_id)


def job_deadline_missed(session: Session, job_id: str) -> int:
    """After the compare-and-set that stamped the job's deadline_missed_at (once, issue #15).
    Its batch's webhook gets it too when the batch asked for ``deadline_missed``."""
    job = _job_row(session, job_id)
    urls = _urls(session, job, DEADLINE_MISSED) if job else []
    if not urls:
        return 0
    due, missed = session.execute(select(Job.deadline_at, Job.deadline_missed_at)
                                  .where(Job.id == job_id)).one()
    body = {**_job_body(session, job, DEADLINE_MISSED),
            "deadline_at": due.isoformat() if due else None,
            "deadline_missed_at": missed.isoformat() if missed else None}
    return _enqueue(session, job.project, DEADLINE_MISSED, urls, body, job_id, job.batch_id)


def batch_completed(session: Session, batch: Batch) -> int:
    """When the batch was marked done (under its row lock, once). The body counts its jobs
    by final state (read through the index on jobs.batch_id)."""
    if not batch.webhook or COMPLETED not in (batch.webhook_events or []):
        return 0
    counts = dict(session.execute(select(Job.state, func.count()).where(
        Job.batch_id == batch.id).group_by(Job.state)).all())
    body = {"event": COMPLETED, "batch_id": batch.id, "project": batch.project,
            "name": batch.name, "state": "done", "counts": counts,
            "report_urls": {kind: f"/v1/batches/{batch.id}/report.{kind}"
                            for kind in (batch.report_keys or {})},
            "sent_for": utcnow().isoformat()}
    return _enqueue(session, batch.project, COMPLETED, [batch.webhook], body,
                    batch_id=batch.id)
