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
