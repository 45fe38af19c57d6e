"""Prometheus metrics of the farm (issue #13, item 7): `GET /metrics` on the API and
`farm exporter --port N`, both this collector.

Gauges are read from the database on every scrape (jobs by state, tier and track: a GROUP BY
over the live states, through the indexed ``state`` column; actor groups from the small
``group_leases`` table; the webhook outbox's pending rows through ``next_attempt_at``), so
every process serving /metrics tells the same numbers.

Counters and histograms (GPU-seconds, queue wait and render time, cache lookups, delivered
webhooks, re-sends) must only grow, yet the database holds no running totals. The collector
keeps them: at each scrape it observes what finished since its last one, an index range on
``jobs.finished_at`` / ``webhook_deliveries.delivered_at`` (migration 0009) or on
``job_events.id``, never a scan. A row is read once its time is SETTLE_S old (a transaction
stamped just before the scrape may commit just after it), and the totals start at zero
when the process starts, as any process's counters do (Prometheus' rate() expects that).
Scrape one process for them: `farm exporter`, or the API when it runs one process.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from farm.db.leases import GroupLease
from farm.db.session import session_scope
from farm.db.tables import Job, JobEvent, JobState, Segment, WebhookDelivery, utcnow
from farm.jobs import events
from farm.jobs.webhook_delivery import WEBHOOK_FAILED, WEBHOOK_GAVE_UP

SETTLE_S = 3.0  # a finished row is observed once its time is this old
# Seconds: from a tiny draft (1 s) to an A14B final render (hours).
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf"))
TRACKS = ("draft", "final")
_WAITING = (JobState.queued.value, JobState.waiting.value)
_RUNNING = (JobState.running.value, JobState.stitching.value)
_COUNTED_EVENTS = (events.RESENT, WEBHOOK_FAILED, WEBHOOK_GAVE_UP)


class Histogram:
    """Cumulative bucket counts and sum of one label set (seconds)."""

    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def buckets(self) -> list[tuple[str, int]]:
        return [(floatToGoString(b), n) for b, n in zip(BUCKETS, self.counts)]


class Totals:
    """What the collector has observed since it started (its counters and histograms)."""

    def __init__(self, start: datetime, first_event_id: int):
        self.jobs_mark = start  # finished_at of jobs observed up to here
        self.webhooks_mark = start  # delivered_at of deliveries observed up to here
        self.event_mark = first_event_id  # job_events.id observed up to here
        self.queue_wait: dict[str, Histogram] = defaultdict(Histogram)  # track ->
        self.render: dict[str, Histogram] = defaultdict(Histogram)
        self.gpu_seconds: dict[tuple[str, str], float] = defaultdict(float)  # (tier, project)
        self.finished: dict[tuple[str, str], int] = defaultdict(int)  # (state, track)
        self.cache: dict[str, int] = {"hit": 0, "miss": 0}
        self.webhooks_delivered = 0
        self.logged: dict[str, int] = defaultdict(int)  # job_events kind -> lines


class FarmCollector(Collector):
    def __init__(self, db_url: str, settle_s: float = SETTLE_S):
        self.db_url, self.settle_s = db_url, settle_s
        self._lock = threading.Lock()  # two scrapes at once observe each row once
        self._totals: Totals | None = None

    def collect(self):
        """Every family, read in one transaction (the lock and the session are let go
        before the families are handed out)."""
        with self._lock, session_scope(self.db_url) as session:
            now = utcnow()
            totals = self._totals or self._start(session, now)
            observe_finished(session, totals, now - timedelta(seconds=self.settle_s))
            return [*job_gauges(session), *group_gauges(session, now),
                    *webhook_metrics(session, totals), *totals_metrics(totals)]

    def _start(self, session, now: datetime) -> Totals:
        last_event = session.scalar(select(func.max(JobEvent.id))) or 0
        self._totals = Totals(now - timedelta(seconds=self.settle_s), last_event)
        return self._totals


def _tier(route: dict | None) -> str:
    return (route or {}).get("tier") or "none"


def job_gauges(session):
    """farm_jobs_{waiting,admitted,running}{tier,track}: waiting for admission (queued, or
    held by a batch window), sent to the tier's queue, rendering or stitching. Every tier of
    the catalog and both tracks appear, at 0 when empty, so an autoscaler reads a value."""
    from farm.policy import get_policy

    # Grouped by the labels: one expression each (PostgreSQL compares GROUP BY expressions,
    # and two copies of route->>'tier' would be two bound parameters).
    tier = Job.route["tier"].as_string().label("tier")
    dispatched = Job.dispatched_at.is_not(None).label("dispatched")
    rows = session.execute(
        select(Job.state, dispatched, tier, Job.track, func.count())
        .where(Job.state.in_(_WAITING + _RUNNING))
        .group_by(Job.state, dispatched, tier, Job.track)).all()
    kinds = {k: GaugeMetricFamily(f"farm_jobs_{k}", help_, labels=["tier", "track"])
             for k, help_ in (("waiting", "Jobs waiting for admission to their tier"),
                              ("admitted", "Jobs sent to their tier's queue, not yet started"),
                              ("running", "Jobs rendering or stitching"))}
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for name in get_policy().catalog.tiers:
        for track in TRACKS:
            for kind in kinds:
                counts[(kind, name, track)] = 0
    for state, dispatched, tier_name, track, n in rows:
        kind = "running" if state in _RUNNING else \
            "admitted" if dispatched and state == JobState.queued.value else "waiting"
        counts[(kind, tier_name or "none", track)] += n
    for (kind, tier_name, track), n in sorted(counts.items()):
        kinds[kind].add_metric([tier_name, track], n)
    return kinds.values()


def group_gauges(session, now: datetime):
    """farm_actor_groups{tier,state}: the pools' groups (group_leases rows, one per group a
    pool has made; a few per GPU), leased now (busy) or not (idle)."""
    family = GaugeMetricFamily("farm_actor_groups", "Actor groups by tier, busy or idle",
                               labels=["tier", "state"])
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for pool, holder, expires in session.execute(
            select(GroupLease.pool, GroupLease.holder, GroupLease.expires_at)):
        busy = holder is not None and expires is not None and expires > now
        counts[(pool.split(":")[1], "busy" if busy else "idle")] += 1
    for (tier_name, state), n in sorted(counts.items()):
        family.add_metric([tier_name, state], n)
    return [family]


def webhook_metrics(session, totals: Totals):
    pending = session.execute(
        select(func.count(), func.count().filter(WebhookDelivery.attempts > 0))
        .where(WebhookDelivery.next_attempt_at.is_not(None),
               WebhookDelivery.delivered_at.is_(None))).one()
    gauge = GaugeMetricFamily("farm_webhook_deliveries_pending",
                              "Webhook deliveries waiting to be sent, by whether one failed",
                              labels=["retrying"])
    gauge.add_metric(["false"], pending[0] - pending[1])
    gauge.add_metric(["true"], pending[1])
    done = CounterMetricFamily("farm_webhook_deliveries", "Webhook deliveries delivered "
                               "(2xx); jobs' attempts failed, and deliveries given up",
                               labels=["result"])
    done.add_metric(["delivered"], totals.webhooks_delivered)
    done.add_metric(["failed_attempt"], totals.logged[WEBHOOK_FAILED])
    done.add_metric(["gave_up"], totals.logged[WEBHOOK_GAVE_UP])
    return [gauge, done]


def observe_finished(session, totals: Totals, until: datetime) -> None:
    """Jobs finished, deliveries delivered and re-sends recorded since the last scrape."""
    jobs = session.execute(
        select(Job.id, Job.state, Job.track, Job.project, Job.route, Job.cache_key,
               Job.cached_from, Job.created_at, Job.started_at, Job.finished_at)
        .where(Job.finished_at > totals.jobs_mark, Job.finished_at <= until)).all()
    rendered = [j.id for j in jobs if j.cached_from is None]
    spans = session.execute(
        select(Segment.job_id, Segment.started_at, Segment.finished_at)
        .where(Segment.job_id.in_(rendered), Segment.started_at.is_not(None),
               Segment.finished_at.is_not(None))).all() if rendered else []
    by_job = {j.id: j for j in jobs}
    for job_id, started, finished in spans:
        job = by_job[job_id]
        degree = int((job.route or {}).get("degree") or 1)
        totals.gpu_seconds[(_tier(job.route), job.project)] += \
            max(0.0, (finished - started).total_seconds()) * degree
    for job in jobs:
        _observe_job(totals, job)
    totals.jobs_mark = until
    totals.webhooks_delivered += session.scalar(
        select(func.count()).where(WebhookDelivery.delivered_at > totals.webhooks_mark,
                                   WebhookDelivery.delivered_at <= until)) or 0
    totals.webhooks_mark = until
    # Re-sends and failed webhook attempts are lines of the jobs' logs: a primary-key range
    # from the last scrape's highest id to this one's.
    top = session.scalar(select(func.max(JobEvent.id))) or 0
    for kind, count in session.execute(
            select(JobEvent.kind, func.count())
            .where(JobEvent.id > totals.event_mark, JobEvent.id <= top,
                   JobEvent.kind.in_(_COUNTED_EVENTS))
            .group_by(JobEvent.kind)):
        totals.logged[kind] += count
    totals.event_mark = max(totals.event_mark, top)


def _observe_job(totals: Totals, job) -> None:
    totals.finished[(job.state, job.track)] += 1
    if job.cache_key is not None or job.cached_from is not None:
        totals.cache["hit" if job.cached_from is not None else "miss"] += 1
    if job.cached_from is not None or job.started_at is None:
        return  # answered from the cache, or never started: no queue wait, no render
    totals.queue_wait[job.track].observe((job.started_at - job.created_at).total_seconds())
    if job.state == JobState.succeeded.value:
        totals.render[job.track].observe((job.finished_at - job.started_at).total_seconds())


def totals_metrics(totals: Totals):
    for name, doc, data in (
            ("farm_job_queue_wait_seconds", "Creation to first segment started, by track",
             totals.queue_wait),
            ("farm_job_render_seconds", "First segment started to video stored, by track",
             totals.render)):
        family = HistogramMetricFamily(name, doc, labels=["track"])
        for track, hist in sorted(data.items()):
            family.add_metric([track], hist.buckets(), sum_value=hist.sum)
        yield family
    gpu = CounterMetricFamily("farm_gpu_seconds", "GPU-seconds of finished jobs' segments "
                              "(segment time x route degree)", labels=["tier", "project"])
    for (tier_name, project), seconds in sorted(totals.gpu_seconds.items()):
        gpu.add_metric([tier_name, project], seconds)
    yield gpu
    finished = CounterMetricFamily("farm_jobs_finished", "Jobs ended, by state and track",
                                   labels=["state", "track"])
    for (state, track), n in sorted(totals.finished.items()):
        finished.add_metric([state, track], n)
    yield finished
    cache = CounterMetricFamily("farm_cache_lookups", "Result cache lookups of finished "
                                "jobs: answered from the cache (hit) or rendered (miss)",
                                labels=["result"])
    for result, n in totals.cache.items():
        cache.add_metric([result], n)
    yield cache
    resends = CounterMetricFamily("farm_reconciler_resends",
                                  "Jobs the reconciler sent again after their task was lost")
    resends.add_metric([], totals.logged[events.RESENT])
    yield resends


def registry_for(db_url: str, settle_s: float = SETTLE_S) -> CollectorRegistry:
    """A registry holding the farm's collector only (one per app or exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(db_url, settle_s))
    return registry


def serve_exporter(db_url: str, port: int, host: str = "127.0.0.1") -> None:
    """`farm exporter`: the collector on its own HTTP port, until interrupted."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry_for(db_url))
    try:
        while thread.is_alive():
            time.sleep(1)
    finally:
        server.shutdown()


router = APIRouter()


def check_metrics_token(request: Request) -> None:
    token = request.app.state.settings.metrics_token.get_secret_value()
    if not token:
        raise HTTPException(404, "metrics are not served by the API: set FARM_METRICS_TOKEN, "
                                 "or run `farm exporter`")
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "metrics need Authorization: Bearer $FARM_METRICS_TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Farm-wide aggregates (counts per tier, track, state and project; no job, prompt or
    key). They name every project, so the API serves them only with
    ``Authorization: Bearer $FARM_METRICS_TOKEN`` (not a project's key: any project could
    read the others' usage), and not at all while no token is set; `farm exporter` serves
    them without one on its own loopback port."""
    check_metrics_token(request)
    state = request.app.state
    if getattr(state, "metrics_registry", None) is None:
        state.metrics_registry = registry_for(state.settings.database_url)
    return Response(generate_latest(state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
