"""Sending the webhook outbox (farm.jobs.webhooks), from every beat tick (issue #13, item 5).

A tick claims due rows (``next_attempt_at <= now``, read through its index; delivered and
abandoned rows have it NULL) with ``FOR UPDATE SKIP LOCKED`` and pushes their next attempt
a lease ahead, so two ticks never send the same row at once; then it POSTs them outside any
transaction and records each outcome: delivered (a 2xx), or a retry after
``base * 2**(attempts-1)`` seconds capped at ``cap``, until ``max_attempts`` give up. Each
attempt and the outcome are written to the job's log. Delivery is at least once: a tick
that dies between sending and recording sends again after the lease; a receiver drops
repeats by the ``Farm-Delivery`` header (the row's id).

Finished rows (delivered, or given up) older than FARM_WEBHOOK_KEEP_DAYS are deleted by
retention's tick (``prune``), a bounded batch per tick.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, select

from farm.db.session import session_scope
from farm.db.tables import WebhookDelivery, utcnow
from farm.jobs import events
from farm.jobs.webhooks import SIGNATURE_HEADER, secret_for, signature
from farm.settings import Settings

log = logging.getLogger(__name__)

# Job log kinds (farm.jobs.events).
WEBHOOK_FAILED = "webhook_failed"  # one attempt failed; another follows
WEBHOOK_DELIVERED = "webhook_delivered"
WEBHOOK_GAVE_UP = "webhook_gave_up"

CLAIM_LEASE_S = 120.0  # a claimed row is due again after this if its tick died mid-send
SEND_THREADS = 8  # deliveries in flight at once per tick
PER_TICK = 64  # rows a tick claims: a slow receiver never holds the tick for long


@dataclass(frozen=True)
class Due:
    id: int
    project: str
    job_id: str | None
    event: str
    url: str
    body: str
    attempt: int  # this attempt's number, from 1
    secret: str


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Seconds before the attempt after failed attempt number ``attempt`` (from 1)."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


def claim_due(db_url: str, now: datetime, limit: int = PER_TICK) -> list[Due]:
    with session_scope(db_url) as session:
        rows = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(limit)
            .with_for_update(skip_locked=True)).all()
        secrets = {p: secret_for(session, p) for p in {r.project for r in rows}}
        claimed = []
        for row in rows:
            row.attempts += 1
            row.next_attempt_at = now + timedelta(seconds=CLAIM_LEASE_S)
            claimed.append(Due(row.id, row.project, row.job_id, row.event, row.url, row.body,
                               row.attempts, secrets[row.project]))
        return claimed


def send(http: httpx.Client, due: Due) -> str | None:
    """POST one delivery, signed as sent; None when the receiver took it (2xx), else what
    went wrong."""
    timestamp = int(time.time())  # unix seconds
    headers = {"Content-Type": "application/json", "Farm-Event": due.event,
               "Farm-Delivery": str(due.id),
               SIGNATURE_HEADER: signature(due.secret, due.body, timestamp)}
    try:
        resp = http.post(due.url, content=due.body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"


def record(settings: Settings, due: Due, error: str | None, now: datetime) -> str:
    """Write the attempt's outcome on its row and in the job's log; returns the log kind."""
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, due.id, with_for_update=True)
        if error is None:
            kind = WEBHOOK_DELIVERED
            row.delivered_at, row.next_attempt_at, row.last_error = now, None, None
            message = f"{due.event} delivered to {due.url} (attempt {due.attempt})"
        elif due.attempt >= settings.webhook_max_attempts:
            kind, row.next_attempt_at, row.last_error = WEBHOOK_GAVE_UP, None, error
            message = f"{due.event} to {due.url}: attempt {due.attempt} failed ({error}); gave up"
        else:
            kind, row.last_error = WEBHOOK_FAILED, error
            wait = backoff_s(due.attempt, settings.webhook_retry_base_s,
                             settings.webhook_retry_cap_s)
            row.next_attempt_at = now + timedelta(seconds=wait)
            message = (f"{due.event} to {due.url}: attempt {due.attempt} failed ({error}); "
                       f"next in {wait:g} s")
        if due.job_id is not None:
            events.add(session, due.job_id, kind, f"delivery {due.id}: {message}")
    (log.info if error is None else log.warning)("webhook %s", message)
    return kind


def deliver_due(settings: Settings, now: datetime | None = None) -> dict[str, int]:
    """Send what is due now; counts of outcomes by log kind."""
    now = now or utcnow()
    claimed = claim_due(settings.database_url, now)
    if not claimed:
        return {}
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as http, \
            ThreadPoolExecutor(min(SEND_THREADS, len(claimed))) as pool:
        errors = list(pool.map(lambda due: send(http, due), claimed))
    outcomes: dict[str, int] = {}
    for due, error in zip(claimed, errors):
        kind = record(settings, due, error, utcnow())
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return outcomes


def prune(settings: Settings, now: datetime) -> int:
    """Delete finished deliveries created more than FARM_WEBHOOK_KEEP_DAYS ago, at most
    FARM_RETENTION_BATCH of each kind per tick. Delivered rows are found through the
    ``delivered_at`` index. Given-up rows (both stamps NULL) have no index of their own, so
    they are looked for only among the oldest rows by primary key (ids grow with
    ``created_at``): a bounded read that reaches every old row, since what keeps an old row
    (a delivery still being retried) ends within max_attempts x the retry cap."""
    cutoff = now - timedelta(days=settings.webhook_keep_days)
    batch = settings.retention_batch
    with session_scope(settings.database_url) as session:
        delivered = session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.delivered_at < cutoff)
            .order_by(WebhookDelivery.delivered_at).limit(batch)).all()
        oldest = select(WebhookDelivery.id).order_by(WebhookDelivery.id).limit(batch) \
            .subquery()
        gave_up = session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.id.in_(select(oldest.c.id)),
                                             WebhookDelivery.created_at < cutoff,
                                             WebhookDelivery.delivered_at.is_(None),
                                             WebhookDelivery.next_attempt_at.is_(None))).all()
        doomed = set(delivered) | set(gave_up)
        if doomed:
            session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(doomed)))
    return len(doomed)
