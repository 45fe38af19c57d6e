"""Fencing (issue #11.8): the reconciler, a segment's final failure (record_final), the stitch
failure path and progress writes change state only by compare-and-set on the current task.

Each case interleaves for real on PostgreSQL: the fenced path reads in session A (what it
would decide on), the competing change (a finish, a cancel, a stitch success) commits in its
own session, then the fenced path writes in A and A commits. Nothing the competitor wrote
may be overwritten.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.db.session import get_engine, session_scope
from farm.db.tables import Job, Segment, utcnow
from farm.jobs import service as jobs
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from farm.tasks import reconcile

LEASE_S = 30.0


@pytest.fixture(scope="module")
def db(own_pg):
    return own_pg


def running_job(db: str) -> tuple[str, int]:
    """A sent job of one segment, running under task t1 (chord c1), its last heartbeat old."""
    request = JobCreate(prompt="a red circle", frames=5, model="wan-tiny")
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(db, [job])
    seg_id = job.segments[0].id
    with session_scope(db) as session:
        assert jobs.claim_for_dispatch(session, job.id)
    jobs.set_celery_ids(db, job.id, "c1", {seg_id: "t1"})
    assert jobs.start_segment(db, seg_id, "w1", task_id="t1")
    return job.id, seg_id


def stitching_job(db: str) -> tuple[str, int]:
    job_id, seg_id = running_job(db)
    assert jobs.finish_segment(db, seg_id, ["chunk.mp4"], task_id="t1")
    assert jobs.begin_stitch(db, job_id, "c1")
    return job_id, seg_id


# ---- the competing changes, each committed in a session of its own --------------------------

def finish(db, job_id, seg_id):
    assert jobs.finish_segment(db, seg_id, ["chunk.mp4"], task_id="t1")


def cancel(db, job_id, seg_id):
    assert jobs.cancel_job(db, job_id)


def stitch_succeeds(db, job_id, seg_id):
    """The stitch (c1) already begun succeeds."""
    assert jobs.succeed_job(db, job_id, "jobs/x/video-c1.mp4", "ab" * 32, 10, "c1")


def stitch_success(db, job_id, seg_id):
    """The job's segment finishes (if it has not), its stitch begins and succeeds."""
    jobs.finish_segment(db, seg_id, ["chunk.mp4"], task_id="t1")
    jobs.begin_stitch(db, job_id, "c1")
    stitch_succeeds(db, job_id, seg_id)


def stands(db, job_id, seg_id, competitor) -> None:
    """What ``competitor`` wrote is still there, and nothing else failed the job."""
    job = jobs.get_job(db, job_id)
    seg = job.segments[0]
    assert job.error is None and seg.error is None and job.resends == 0
    if competitor is finish:
        assert (seg.state, seg.progress, seg.chunk_keys, seg.celery_id) == \
            ("done", 1.0, ["chunk.mp4"], "t1")
        assert (job.state, job.celery_id) == ("running", "c1")
    elif competitor is cancel:
        assert job.state == "canceled" and job.celery_id == "c1"
    else:
        assert (job.state, job.progress, job.output_key) == \
            ("succeeded", 1.0, "jobs/x/video-c1.mp4")
        assert seg.state == "done" and seg.progress == 1.0


def interleave(db, job_id, seg_id, read, write, competitor) -> None:
    """``read`` in session A, ``competitor`` commits elsewhere, ``write`` in A, A commits."""
    with Session(get_engine(db)) as a:
        assert read(a), "the fenced path, on what it read, would change the job"
        competitor(db, job_id, seg_id)
        write(a)
        a.commit()
    stands(db, job_id, seg_id, competitor)


COMPETITORS = [finish, cancel, stitch_success]


def _owned_and_live(session, job_id, seg_id, task_id="t1") -> bool:
    seg = session.execute(select(Segment.celery_id, Segment.state)
                          .where(Segment.id == seg_id)).one()
    job_state = session.scalar(select(Job.state).where(Job.id == job_id))
    return seg.celery_id == task_id and job_state in jobs.LIVE_JOB_STATES


@pytest.mark.parametrize("competitor", COMPETITORS, ids=lambda f: f.__name__)
def test_the_reconciler_overwrites_nothing(db, competitor):
    job_id, seg_id = running_job(db)
    now = utcnow() + timedelta(seconds=LEASE_S + 1)  # the segment's heartbeat is stale by then
    found = {}

    def read(a):
        found["job"] = next(j for j in reconcile.stranded_jobs(a, now, LEASE_S, set())
                            if j.id == job_id)
        return True

    def write(a):
        assert reconcile._mark_for_resend(a, found["job"], now) is None

    interleave(db, job_id, seg_id, read, write, competitor)


@pytest.mark.parametrize("competitor", [cancel, stitch_succeeds], ids=lambda f: f.__name__)
def test_the_reconciler_leaves_a_stitch_that_ended_while_it_looked(db, competitor):
    """A stitching job whose stitch heartbeat is stale, read as stranded; it then succeeds
    (or is canceled) before the reconciler writes."""
    job_id, seg_id = stitching_job(db)
    now = utcnow() + timedelta(seconds=LEASE_S + 1)
    found = {}

    def read(a):
        found["job"] = next(j for j in reconcile.stranded_jobs(a, now, LEASE_S, set())
                            if j.id == job_id)
        return found["job"].state == "stitching"

    def write(a):
        assert reconcile._mark_for_resend(a, found["job"], now) is None

    interleave(db, job_id, seg_id, read, write, competitor)


def test_the_reconciler_still_resends_a_job_nothing_touched(db):
    job_id, seg_id = running_job(db)
    now = utcnow() + timedelta(seconds=LEASE_S + 1)
    with session_scope(db) as a:
        job = next(j for j in reconcile.stranded_jobs(a, now, LEASE_S, set()) if j.id == job_id)
        resend = reconcile._mark_for_resend(a, job, now)
    assert resend is not None and resend.lost == [(0, "w1")]
    after = jobs.get_job(db, job_id)
    assert (after.state, after.resends, after.celery_id) == ("running", 1, None)
    assert (after.segments[0].state, after.segments[0].celery_id) == ("pending", None)
    # Every task of the earlier send is fenced off before the new send records its own.
    assert not jobs.finish_segment(db, seg_id, ["late.mp4"], task_id="t1")
    assert not jobs.begin_stitch(db, job_id, "c1")


@pytest.mark.parametrize("competitor", COMPETITORS, ids=lambda f: f.__name__)
def test_a_final_failure_overwrites_nothing(db, competitor):
    """record_final (farm.tasks.failure_handling): the task's errback, or its own handler,
    fails the segment and job in one compare-and-set transaction."""
    job_id, seg_id = running_job(db)
    interleave(db, job_id, seg_id, lambda a: _owned_and_live(a, job_id, seg_id),
               lambda a: jobs.fail_for_task(a, job_id, seg_id, "segment 0: boom", "t1"),
               competitor)


def test_a_final_failure_of_a_replaced_task_changes_nothing(db):
    job_id, seg_id = running_job(db)
    jobs.set_celery_ids(db, job_id, "c2", {seg_id: "t2"})  # the reconciler re-sent it
    with session_scope(db) as a:
        assert not jobs.fail_for_task(a, job_id, seg_id, "segment 0: boom", "t1")
        assert jobs.fail_for_task(a, job_id, seg_id, "segment 0: boom", "t2")
    assert jobs.get_job(db, job_id).state == "failed"


@pytest.mark.parametrize("competitor", COMPETITORS, ids=lambda f: f.__name__)
def test_a_progress_write_overwrites_nothing(db, competitor):
    job_id, seg_id = running_job(db)
    interleave(db, job_id, seg_id, lambda a: _owned_and_live(a, job_id, seg_id),
               lambda a: jobs.record_progress(a, seg_id, 0.5, "t1"), competitor)


def test_a_replaced_tasks_progress_is_not_recorded(db):
    job_id, seg_id = running_job(db)
    jobs.set_celery_ids(db, job_id, "c2", {seg_id: "t2"})
    assert jobs.report_segment_progress(db, seg_id, 0.5, "t1") == "running"
    assert jobs.get_job(db, job_id).segments[0].progress == 0.0
    assert jobs.report_segment_progress(db, seg_id, 0.5, "t2") == "running"
    after = jobs.get_job(db, job_id)
    assert after.segments[0].progress == 0.5 and after.progress == pytest.approx(0.95 * 0.5)


@pytest.mark.parametrize("competitor", [cancel, stitch_succeeds], ids=lambda f: f.__name__)
def test_a_stitch_failure_overwrites_nothing(db, competitor):
    """The failing stitch is c1; the competing success is another copy of c1 (a redelivery)."""
    job_id, seg_id = stitching_job(db)

    def read(a):
        return a.execute(select(Job.state, Job.celery_id).where(Job.id == job_id)).one() == \
            ("stitching", "c1")

    interleave(db, job_id, seg_id, read,
               lambda a: jobs.stitch_failed(a, job_id, "stitch: OutputInvalid", "c1"),
               competitor)


def test_a_replaced_stitch_that_fails_leaves_the_job_to_its_successor(db, settings):
    from farm.tasks import stitcher

    job_id, seg_id = stitching_job(db)
    own = settings.model_copy(update={"database_url": db})
    jobs.set_celery_ids(db, job_id, "c2", {seg_id: "t1"})  # the reconciler re-sent it
    assert not stitcher.fail(own, job_id, RuntimeError("disk full"), "c1")
    assert jobs.get_job(db, job_id).state == "stitching"
    assert stitcher.fail(own, job_id, RuntimeError("disk full"), "c2")
    after = jobs.get_job(db, job_id)
    assert after.state == "failed" and after.error == "stitch: RuntimeError: disk full"
