"""The deadline watch (issue #15, item 3) against a real PostgreSQL database of this module's
own: deadline_at stamped at submission, deadline_risk from the measured step times and the
work ahead, a missed deadline marked once with its log line and its webhook row."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from farm.db.session import session_scope
from farm.db.tables import Job, JobEvent, Segment, WebhookDelivery, utcnow
from farm.jobs import deadline_watch as watch, events, service as jobs
from farm.jobs.submit import route_request, with_deadline
from farm.schemas import JobCreate

HOOK = "http://127.0.0.1:9/h"


@pytest.fixture()
def own(own_pg, settings):
    conf = settings.model_copy(update={"database_url": own_pg, "step_time_window": 50})
    watch._times_cache.clear()  # each test measures its own history
    yield conf
    with session_scope(own_pg) as session:
        for table in (WebhookDelivery, JobEvent, Job):
            session.execute(delete(table))


def make(db, state="queued", sent=False, **fields):
    """A wan-tiny job on the cpu tier (8 steps; 33 frames: two 17-frame segments), saved."""
    request = JobCreate(**({"prompt": "a red circle", "frames": 33, "model": "wan-tiny"}
                           | fields))
    job = with_deadline(jobs.new_job(request, route_request(request, {}), "sha"), request)
    jobs.add_jobs(db, [job])
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            state=state, dispatched_at=utcnow() if sent else None))
    return jobs.get_job(db, job.id)


def history(db, seconds_per_step: float, jobs_n: int = 3):
    """Rendered jobs whose denoising took ``seconds_per_step`` a full step (8 steps x 2
    full segments each)."""
    for _ in range(jobs_n):
        job = make(db, "succeeded", sent=True)
        with session_scope(db) as session:
            session.execute(update(Job).where(Job.id == job.id).values(
                finished_at=utcnow(), stage_times={"denoise": seconds_per_step * 16}))


def kinds(db, job_id):
    return [e.kind for e in events.list_events(db, job_id)]


def outbox(db, job_id):
    with session_scope(db) as session:
        return list(session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.job_id == job_id)))


def set_job(db, job_id, **values):
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_submission_stamps_deadline_at_from_created_at(own):
    job = make(own.database_url, deadline_s=90.0)
    assert job.deadline_at == job.created_at + timedelta(seconds=90)
    assert (job.deadline_risk, job.deadline_missed_at) == (False, None)
    assert make(own.database_url).deadline_at is None


def test_measured_step_times_come_from_the_denoise_stage_per_full_step(own):
    history(own.database_url, 2.5)
    times = watch.step_times(own, fresh=True)
    assert times.measured("wan-tiny", "cpu", 1) == pytest.approx(2.5)
    assert times.counts[("wan-tiny", "cpu", 1)] == 3


def test_risk_turns_on_from_measured_times_the_catalog_would_miss_and_back_off(own):
    """Catalog: 0.05 s a step, 16 full steps = 0.8 s: a 60 s deadline is safe. Measured
    5 s a step: 80 s of render, so the job is at risk; given more time it is back on track."""
    db = own.database_url
    job = make(db, deadline_s=60.0)
    assert watch.sweep(own) == {"missed": [], "at_risk": [], "on_track": []}
    history(db, 5.0)
    watch._times_cache.clear()
    assert watch.sweep(own)["at_risk"] == [job.id]
    assert jobs.get_job(db, job.id).deadline_risk
    [line] = [e for e in events.list_events(db, job.id) if e.kind == events.DEADLINE_AT_RISK]
    assert "80.0 s of render left" in line.message
    assert watch.sweep(own)["at_risk"] == []  # no new line while it stays at risk
    set_job(db, job.id, deadline_at=utcnow() + timedelta(seconds=600))
    assert watch.sweep(own)["on_track"] == [job.id]
    assert not jobs.get_job(db, job.id).deadline_risk


def test_work_ahead_in_admission_order_counts_and_a_later_deadline_does_not(own):
    """Measured 1 s a step: each job is 16 s of render on the 2-GPU cpu tier. Ten jobs of
    a higher band (160 GPU-s) wait the deadline jobs 80 s: 80 + 16 misses 60 s. The 108 s
    one waits also for the 60 s one (EDF: 8 s more), 104 s in all; the priority-55 job with
    a 500 s deadline is behind both (EDF within the band): counted, it would add 8 s (112)."""
    db = own.database_url
    history(db, 1.0)
    for _ in range(10):
        make(db, priority=95)
    make(db, priority=55, deadline_s=500.0)  # same band as the tight one, later deadline
    tight = make(db, priority=50, deadline_s=60.0)
    easy = make(db, priority=50, deadline_s=108.0)
    result = watch.sweep(own)
    assert result["at_risk"] == [tight.id]
    assert not jobs.get_job(db, easy.id).deadline_risk


def test_a_running_job_counts_only_its_steps_left(own):
    """Measured 1 s a step: segment 0 done, segment 1 resumed at step 6 of 8: 2 s left."""
    db = own.database_url
    history(db, 1.0)
    job = make(db, "running", sent=True, deadline_s=3.0)
    with session_scope(db) as session:
        session.execute(update(Segment).where(Segment.job_id == job.id, Segment.index == 0)
                        .values(state="done", progress=1.0))
        session.execute(update(Segment).where(Segment.job_id == job.id, Segment.index == 1)
                        .values(state="pending", resume_step=6))
    assert watch.sweep(own)["at_risk"] == []
    with session_scope(db) as session:
        session.execute(update(Segment).where(Segment.job_id == job.id, Segment.index == 1)
                        .values(resume_step=2, progress=0.0))  # 6 s left now
    assert watch.sweep(own)["at_risk"] == [job.id]


def test_a_deadline_passing_while_live_is_marked_once_with_its_webhook(own):
    db = own.database_url
    job = make(db, "running", sent=True, deadline_s=30.0, webhook=HOOK,
               webhook_events=["completed", "deadline_missed"])
    quiet = make(db, deadline_s=30.0, webhook=HOOK)  # did not ask for the event
    for j in (job, quiet):
        set_job(db, j.id, deadline_at=utcnow() - timedelta(seconds=1))
    assert sorted(watch.sweep(own)["missed"]) == sorted([job.id, quiet.id])
    assert watch.sweep(own)["missed"] == []
    after = jobs.get_job(db, job.id)
    assert after.deadline_missed_at is not None and after.deadline_risk
    assert kinds(db, job.id).count(events.DEADLINE_MISSED) == 1
    [row] = outbox(db, job.id)
    body = json.loads(row.body)
    assert (row.event, body["event"], body["state"]) == ("deadline_missed",) * 2 + ("running",)
    assert body["deadline_at"] == after.deadline_at.isoformat()
    assert outbox(db, quiet.id) == []


def test_a_job_ending_after_its_deadline_misses_one_ending_before_it_does_not(own):
    db = own.database_url
    now = utcnow()
    late = make(db, "succeeded", sent=True, deadline_s=30.0, webhook=HOOK,
                webhook_events=["deadline_missed"])
    in_time = make(db, "succeeded", sent=True, deadline_s=30.0)
    failed = make(db, "failed", sent=True, deadline_s=30.0)  # before its deadline
    failed_late = make(db, "failed", sent=True, deadline_s=30.0)
    set_job(db, late.id, deadline_at=now - timedelta(seconds=20), finished_at=now)
    set_job(db, in_time.id, deadline_at=now + timedelta(seconds=20), finished_at=now,
            deadline_risk=True)  # flagged while it ran: cleared now that it made it
    set_job(db, failed.id, deadline_at=now - timedelta(seconds=5),
            finished_at=now - timedelta(seconds=10))
    set_job(db, failed_late.id, deadline_at=now - timedelta(seconds=5), finished_at=now)
    assert sorted(watch.sweep(own, now + timedelta(seconds=1))["missed"]) == \
        sorted([late.id, failed_late.id])
    [line] = [e for e in events.list_events(db, late.id) if e.kind == events.DEADLINE_MISSED]
    assert "delivered 20.0 s after its deadline" in line.message
    assert len(outbox(db, late.id)) == 1
    assert not jobs.get_job(db, in_time.id).deadline_risk
    assert jobs.get_job(db, failed.id).deadline_missed_at is None
    assert "failed 5.0 s after its deadline" in events.list_events(db, failed_late.id)[-1].message
