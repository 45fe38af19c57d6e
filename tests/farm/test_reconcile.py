"""The reconciler against a real PostgreSQL database and a real Redis broker (its own db):
a job whose task is gone is sent again with new task ids, and the old ones are fenced off."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis

from farm.jobs import events, service as jobs
from farm.tasks import reconcile
from farm.celery_app import make_celery
from farm.db.migrate import upgrade
from farm.db.tables import utcnow
from farm.db.session import session_scope
from farm.jobs.dispatch import enqueue_job
from farm.schemas import JobCreate
from farm.jobs.submit import route_request
from tests.conftest import REDIS_DB, RUN_ID, drop_database, make_database

# The session's own Redis database (FARM_TEST_REDIS_DB), its keys under a prefix of this
# module's: the session's workers never see these queues, and "Redis lost its queues" here
# deletes only this module's keys.
BROKER = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX = f"reconcile-{RUN_ID}:"


def lose_queues() -> None:
    """As a Redis restart without persistence does to this module's queues."""
    client = redis.Redis.from_url(BROKER)
    for key in client.scan_iter(match=f"{PREFIX}*", count=500):
        client.delete(key)


@pytest.fixture(scope="module")
def rsettings(settings):
    name = f"farm_reconcile_{RUN_ID}"
    url = make_database(name)
    upgrade(url)
    yield settings.model_copy(update={"database_url": url, "broker_url": BROKER,
                                      "result_backend": BROKER, "lease_s": 30.0})
    drop_database(name)


@pytest.fixture()
def broker(rsettings):
    lose_queues()
    app = make_celery(rsettings)
    for options in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
        options["global_keyprefix"] = PREFIX
    yield lambda job: enqueue_job(job, app, rsettings.database_url)
    lose_queues()


def sent_job(settings, enqueue=None, frames: int = 33):
    request = JobCreate(prompt="a red circle", frames=frames, model="wan-tiny")
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(settings.database_url, [job])
    with session_scope(settings.database_url) as session:
        assert jobs.claim_for_dispatch(session, job.id)
    if enqueue is not None:
        enqueue(jobs.get_job(settings.database_url, job.id))
    return jobs.get_job(settings.database_url, job.id)


def later(settings, seconds: float = 1.0):
    return utcnow() + timedelta(seconds=settings.lease_s + seconds)


def test_a_claimed_job_never_sent_is_sent_after_the_lease(rsettings, broker):
    job = sent_job(rsettings)  # claimed, then the process died before sending
    assert reconcile.reconcile(rsettings, broker) == []  # within the lease: left alone
    assert reconcile.reconcile(rsettings, broker, later(rsettings)) == [job.id]
    after = jobs.get_job(rsettings.database_url, job.id)
    assert after.resends == 1 and after.celery_id is not None
    # A continuous job's segments are a chain: only its head waits in the broker.
    assert after.segments[0].celery_id in reconcile.broker_task_ids(BROKER)
    assert [e.kind for e in events.list_events(rsettings.database_url, job.id)] == ["resent"]


def test_a_job_whose_task_waits_in_the_broker_is_not_sent_twice(rsettings, broker):
    job = sent_job(rsettings, broker)
    assert reconcile.reconcile(rsettings, broker, later(rsettings)) == []
    lose_queues()  # Redis restarted without persistence
    assert reconcile.reconcile(rsettings, broker, later(rsettings)) == [job.id]


def test_a_segment_whose_worker_stopped_heartbeating_is_rerun_and_the_old_task_fenced(
        rsettings, broker):
    db = rsettings.database_url
    job = sent_job(rsettings, broker)
    seg, old_task = job.segments[0], job.segments[0].celery_id
    assert jobs.start_segment(db, seg.id, "w1", task_id=old_task)
    lose_queues()  # its message went with the worker
    assert reconcile.reconcile(rsettings, broker, later(rsettings, -5)) == []  # fresh beat
    assert reconcile.reconcile(rsettings, broker, later(rsettings)) == [job.id]
    after = jobs.get_job(db, job.id)
    assert after.segments[0].state == "pending" and after.segments[0].celery_id != old_task
    lost = [e for e in events.list_events(db, job.id) if e.kind == "segment_lost"]
    assert [(e.segment_index, e.worker) for e in lost] == [(0, "w1")]
    # The old task, redelivered late, can neither start, beat nor finish the segment.
    assert not jobs.start_segment(db, seg.id, "w1", task_id=old_task)
    assert jobs.start_segment(db, seg.id, "w2", task_id=after.segments[0].celery_id)
    assert not jobs.beat_segment(db, seg.id, old_task)
    assert not jobs.finish_segment(db, seg.id, ["x.mp4"], task_id=old_task)
    assert jobs.finish_segment(db, seg.id, ["y.mp4"], task_id=after.segments[0].celery_id)


def test_a_segment_lost_on_three_workers_fails_the_job_with_each_loss(rsettings, broker):
    db = rsettings.database_url
    job = sent_job(rsettings, frames=5)
    for n, worker in enumerate(["w1", "w2", "w3"]):
        seg = jobs.get_job(db, job.id).segments[0]
        assert jobs.start_segment(db, seg.id, worker, task_id=seg.celery_id), n
        lose_queues()
        reconcile.reconcile(rsettings, broker, later(rsettings, 60 * n + 1))
    after = jobs.get_job(db, job.id)
    assert after.state == "failed"
    assert after.error.startswith("segment 0 failed on 3 different workers:\n[w1] worker w1 "
                                  "stopped heartbeating")
    assert "[w3]" in after.error and after.resends == 3


def test_a_stitch_task_that_died_is_replaced_and_the_old_one_fenced(rsettings, broker):
    db = rsettings.database_url
    job = sent_job(rsettings, broker, frames=5)
    seg = job.segments[0]
    assert jobs.start_segment(db, seg.id, "w1", task_id=seg.celery_id)
    assert jobs.finish_segment(db, seg.id, ["a.mp4"], task_id=seg.celery_id)
    assert jobs.begin_stitch(db, job.id, job.celery_id)
    lose_queues()
    assert reconcile.reconcile(rsettings, broker, later(rsettings)) == [job.id]
    after = jobs.get_job(db, job.id)
    assert after.state == "running" and after.segments[0].state == "done"
    assert not jobs.begin_stitch(db, job.id, job.celery_id)
    assert jobs.begin_stitch(db, job.id, after.celery_id)
    assert jobs.begin_stitch(db, job.id, after.celery_id)  # its own retry may begin again


def test_the_one_machine_brokers_queue_is_read_too(rsettings, tmp_path):
    """kombu's SQLAlchemy transport on SQLite (the embedded defaults of `farm up`)."""
    broker = f"sqla+sqlite:///{tmp_path}/broker.db"
    assert reconcile.broker_task_ids(broker) == set()  # nothing ever sent: no table yet
    local = rsettings.model_copy(update={"broker_url": broker,
                                         "result_backend": f"db+sqlite:///{tmp_path}/r.db"})
    app = make_celery(local)
    enqueue = lambda j: enqueue_job(j, app, rsettings.database_url)  # noqa: E731
    job = sent_job(rsettings, enqueue)
    # Its render tasks (and Celery's chord_unlock, which polls a database result backend).
    assert job.segments[0].celery_id in reconcile.broker_task_ids(broker)
    assert job.id not in reconcile.reconcile(local, enqueue, later(local))  # waiting there
