"""Admission against a real database and a real (unreachable) broker: a send that fails is
undone, so the job stays queued for the next release instead of being lost as 'sent'."""

from __future__ import annotations

import pytest

from farm.jobs import admit, service as jobs
from farm.celery_app import make_celery
from farm.db.migrate import upgrade
from farm.jobs.dispatch import enqueue_job
from farm.errors import QueueUnavailable
from farm.schemas import JobCreate
from farm.jobs.submit import route_request


@pytest.fixture()
def sqlite_settings(settings, tmp_path):
    url = f"sqlite:///{tmp_path}/farm.db"
    upgrade(url)
    return settings.model_copy(update={"database_url": url})


def test_a_failed_send_is_undone_and_the_job_stays_queued(sqlite_settings):
    db = sqlite_settings.database_url
    request = JobCreate(prompt="a red circle", frames=5, model="wan-tiny")
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(db, [job])
    # kombu's SQLAlchemy transport on a database file that cannot be created.
    nowhere = "sqlite:////nonexistent-farm-dir/broker.db"
    dead = make_celery(sqlite_settings.model_copy(update={"broker_url": f"sqla+{nowhere}",
                                                          "result_backend": f"db+{nowhere}"}))
    dead.conf.task_publish_retry = False
    with pytest.raises(QueueUnavailable, match="the queue is unavailable"):
        admit.release(sqlite_settings, enqueue=lambda j: enqueue_job(j, dead, db))
    after = jobs.get_job(db, job.id)
    assert after.state == "queued" and after.dispatched_at is None and after.celery_id is None


def _random_line(db_url: str, tier: str, rng, count: int) -> list:
    """``count`` waiting jobs of ``tier`` with random priorities, deadlines and ages, many
    of them tied on one key or more (so every tie-break of the order is exercised)."""
    from datetime import timedelta

    from farm.db.tables import utcnow

    now = utcnow().replace(microsecond=0)
    request = JobCreate(prompt="a red circle", frames=5, model="wan-tiny")
    route = route_request(request, {})
    made = []
    for _ in range(count):
        job = jobs.new_job(request, route, "sha")
        job.route = {**job.route, "tier": tier}
        job.tier = tier
        job.priority = rng.choice([0, 9, 10, 15, 19, 50, 55, 59, 90, 95, 99, 100])
        job.created_at = now - timedelta(seconds=rng.choice([0, 1, 2, 30]))
        due = now + timedelta(seconds=rng.choice([5, 60, 600]))
        job.deadline_at = rng.choice([None, None, due])
        made.append(job)
    jobs.add_jobs(db_url, made)
    return made


@pytest.mark.parametrize("seed", [1, 2])
def test_the_sql_look_ahead_pages_in_the_same_order_as_queue_order(any_db, seed):
    """Issue #15: farm.jobs.admit_queries.look_ahead (the index ix_jobs_admission_edf, keyset
    paging) and scheduler.admission.queue_order give one order: band, earliest deadline,
    priority, age, id; read in pages of 7 so ties straddle page boundaries."""
    import random
    import uuid

    from farm.db.session import session_scope
    from farm.jobs.admit_queries import look_ahead
    from scheduler.admission import Waiting, queue_order

    tier = f"t{uuid.uuid4().hex[:8]}"
    made = _random_line(any_db, tier, random.Random(seed), 60)
    expected = [w.job_id for w in queue_order([
        Waiting(j.id, j.project, tier, 1, j.priority, j.created_at, deadline_at=j.deadline_at)
        for j in made])]
    read, after = [], None
    with session_scope(any_db) as session:
        while True:
            rows = look_ahead(session, tier, 7, after)
            read += [r.id for r in rows]
            if len(rows) < 7:
                break
            after = rows[-1]
    assert read == expected
    bands = [j.priority // 10 for j in sorted(made, key=lambda j: read.index(j.id))]
    assert bands == sorted(bands, reverse=True)  # never across bands
