"""The Celery app, configured for long GPU tasks.

Late acks and reject-on-worker-lost: a segment whose worker dies goes back to the queue.
Prefetch 1: a worker holds no task it is not running, so priorities still apply to the
backlog. The Redis visibility timeout exceeds the hard time limit, or Redis would hand a
long task to a second worker.
"""

from __future__ import annotations

import redis.exceptions
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from farm.settings import Settings, get_settings, is_redis_url
from scheduler.routing import STITCH_QUEUE

TICK_TASK = "farm.tick"
# Issue #13: slow upkeep (retention, integrity re-hashes, cache eviction) and webhook
# deliveries run as beat tasks of their own, so neither delays admission's tick.
HOUSEKEEPING_TASK = "farm.housekeeping"
WEBHOOKS_TASK = "farm.deliver_webhooks"
# The broker or result backend is unreachable (Redis restarting): nothing can be sent.
BROKER_OUTAGE = (KombuOperationalError, redis.exceptions.ConnectionError,
                 redis.exceptions.TimeoutError)


def make_celery(settings: Settings) -> Celery:
    app = Celery("farm", broker=settings.broker_url, backend=settings.result_backend,
                 include=["farm.tasks.celery_tasks"])
    transport_options: dict = {}
    if is_redis_url(settings.broker_url):
        # kombu's SQLAlchemy transport hands these to create_engine, which refuses them.
        # Message priorities 0..9 within a queue; queues themselves are served round robin,
        # so a worker on render and stitch queues never starves the stitching.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s,
                             "priority_steps": list(range(10))}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Each worker also reads its own queue, so a failed segment can be sent to a worker
        # that is not blocklisted for its job (farm.tasks.failure_policy).
        worker_direct=True,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,  # Flower sees every task
        worker_redirect_stdouts=False,  # ray.init needs a real stdout fileno
        task_default_queue=STITCH_QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        broker_connection_retry_on_startup=True,
        task_always_eager=settings.celery_eager,
        task_eager_propagates=True,
        # Celery beat: batch windows, admission and batch reports (farm.jobs.batches.tick). A tick
        # that waited longer than one period is dropped: the next one does the same work.
        beat_schedule={
            name: {"task": task, "schedule": every,
                   "options": {"queue": STITCH_QUEUE, "expires": every}}
            for name, task, every in (
                ("farm-tick", TICK_TASK, settings.tick_seconds),
                ("farm-webhooks", WEBHOOKS_TASK, settings.tick_seconds),
                ("farm-housekeeping", HOUSEKEEPING_TASK,
                 max(settings.tick_seconds, settings.housekeeping_seconds)))
        },
    )
    return app


app = make_celery(get_settings())
