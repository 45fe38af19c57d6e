"""Job controls (issue #13) against a real PostgreSQL database of this module's own: retry,
hold/release/priority, batch cancel and retry-failed, the timeout/queue-TTL sweep, and the
queue position and ETA."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.dialects import postgresql

from farm.celery_app import app as celery_app
from farm.db.migrate import upgrade
from farm.db.session import get_engine, session_scope
from farm.db.tables import Batch, Job, JobEvent, Segment, utcnow
from farm.errors import JobStateConflict
from farm.jobs import admit, controls, events, service as jobs
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from tests.conftest import RUN_ID, drop_database, make_database


@pytest.fixture(scope="module")
def own(settings):
    """Settings on a database of this module's own. As in the one-process `farm render`
    (eager Celery), a control's release after it sends nothing: no worker reads this
    database, so nothing here may reach the session's broker."""
    name = f"farm_controls_{RUN_ID}"
    url = make_database(name)
    upgrade(url)
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield settings.model_copy(update={"database_url": url})
    celery_app.conf.task_always_eager = eager
    drop_database(name)


@pytest.fixture()
def db(own):
    yield own.database_url
    with session_scope(own.database_url) as session:  # each test sees only its own jobs
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
        session.execute(delete(Batch))


def make(db, state="queued", sent=False, batch_id=None, **fields):
    """A job of the shipped rules (wan-tiny on the cpu tier), saved, then put in ``state``
    (``sent``: as admission marks a job it sent)."""
    request = JobCreate(**({"prompt": "a red circle", "frames": 33, "model": "wan-tiny"}
                           | fields))
    job = jobs.new_job(request, route_request(request, {}), "sha", batch_id=batch_id)
    jobs.add_jobs(db, [job])
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            state=state, dispatched_at=utcnow() if sent else None))
    return jobs.get_job(db, job.id)


def set_segment(db, job, index, **values):
    with session_scope(db) as session:
        session.execute(update(Segment).where(Segment.id == job.segments[index].id)
                        .values(**values))


def kinds(db, job_id):
    return [e.kind for e in events.list_events(db, job_id)]


# ---- retry ------------------------------------------------------------------------------

def test_retry_keeps_done_segments_of_an_independent_job_and_resets_the_rest(own, db):
    job = make(db, "failed", sent=True, continuous=False, frames=49)
    set_segment(db, job, 0, state="failed", attempts=3, celery_id="t0", chunk_keys=["x"],
                error="boom", progress=0.5)
    set_segment(db, job, 1, state="done", attempts=1, celery_id="t1", chunk_keys=["a", "b"],
                progress=1.0)
    set_segment(db, job, 2, state="pending", celery_id="t2")
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            celery_id="chord", error="segment 0 failed", finished_at=utcnow(),
            started_at=utcnow()))
    events.record(db, job.id, events.SEGMENT_FAILED, "boom", 0, "w1")
    controls.retry_job(own, job.id)
    after = jobs.get_job(db, job.id)
    assert (after.state, after.celery_id, after.dispatched_at, after.finished_at,
            after.started_at, after.error) == ("queued", None, None, None, None, None)
    assert after.progress == pytest.approx(jobs.RENDER_SHARE / 3)
    segs = [(s.state, s.attempts, s.celery_id, s.chunk_keys, s.error) for s in after.segments]
    assert segs == [("pending", 0, None, [], None), ("done", 1, "t1", ["a", "b"], None),
                    ("pending", 0, None, [], None)]
    # The log keeps the failure; the failure policy no longer counts it.
    assert kinds(db, job.id) == [events.SEGMENT_FAILED, events.RETRIED]
    assert events.list_events(db, job.id)[-1].message == \
        "retried: was failed; segments kept [1], rendered again [0, 2]"
    assert events.failures(db, job.id) == []


def test_retry_of_a_continuous_job_renders_again_from_its_first_segment_not_done(own, db):
    job = make(db, "canceled", sent=True, frames=49)  # continuous by default
    set_segment(db, job, 0, state="done", chunk_keys=["a"], progress=1.0)
    set_segment(db, job, 1, state="failed")
    set_segment(db, job, 2, state="done", chunk_keys=["c"], progress=1.0)
    controls.retry_job(own, job.id)
    after = jobs.get_job(db, job.id)
    assert [(s.state, s.chunk_keys) for s in after.segments] == \
        [("done", ["a"]), ("pending", []), ("pending", [])]


@pytest.mark.parametrize("state", ["queued", "running", "succeeded"])
def test_only_a_failed_canceled_or_expired_job_is_retried(own, db, state):
    job = make(db, state, sent=state != "queued")
    with pytest.raises(JobStateConflict, match=f"is {state}: only a failed, canceled or "
                                               "expired job"):
        controls.retry_job(own, job.id)
    assert jobs.get_job(db, job.id).state == state and kinds(db, job.id) == []


def test_retry_waits_for_a_segment_still_stopping_but_not_for_a_vanished_worker(own, db):
    job = make(db, "canceled", sent=True)
    set_segment(db, job, 0, state="running", heartbeat_at=utcnow())
    with pytest.raises(JobStateConflict, match=r"segment\(s\) \[0\] are still stopping"):
        controls.retry_job(own, job.id)
    assert jobs.get_job(db, job.id).state == "canceled"
    # A heartbeat older than lease_s: its worker is gone, the segment is rendered again.
    set_segment(db, job, 0, heartbeat_at=utcnow() - timedelta(seconds=own.lease_s + 1))
    controls.retry_job(own, job.id)
    assert [s.state for s in jobs.get_job(db, job.id).segments] == ["pending", "pending"]


def test_an_expired_job_retried_gets_its_queue_ttl_counted_from_the_retry(own, db):
    job = make(db, "expired", queue_ttl_s=30)
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id)
                        .values(created_at=utcnow() - timedelta(seconds=100)))
    controls.retry_job(own, job.id)
    after = jobs.get_job(db, job.id)
    assert after.state == "queued" and 129 < after.queue_ttl_s < 135
    assert controls.sweep(own)["expired"] == []
    # It expires again; retried 50 s after the first retry, its 30 s count from the second.
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            state="expired", created_at=utcnow() - timedelta(seconds=150)))
        session.execute(update(JobEvent).where(JobEvent.job_id == job.id).values(
            created_at=utcnow() - timedelta(seconds=50)))
    controls.retry_job(own, job.id)
    assert 179 < jobs.get_job(db, job.id).queue_ttl_s < 185


# ---- hold, release, priority --------------------------------------------------------------

def test_admission_passes_over_a_held_job_until_it_is_released(own, db):
    held = make(db, hold=True)
    with admit.locked_session(db) as session:
        chosen, _ = admit._choose(session)
    assert held.id not in chosen and jobs.get_job(db, held.id).dispatched_at is None
    assert controls.queue_estimate(db, held) == (None, None)
    controls.change_queued(own, held.id, held=False)
    with admit.locked_session(db) as session:
        chosen, _ = admit._choose(session)
    assert chosen == [held.id]
    assert kinds(db, held.id) == [events.RELEASED]


def test_hold_and_priority_change_only_before_admission_sends_the_job(own, db):
    job = make(db)
    controls.change_queued(own, job.id, held=True, priority=90)
    after = jobs.get_job(db, job.id)
    assert (after.held, after.priority) == (True, 90)
    assert kinds(db, job.id) == [events.HELD, events.PRIORITY_CHANGED]
    assert "50 -> 90" in events.list_events(db, job.id)[-1].message
    sent = make(db, sent=True)
    with pytest.raises(JobStateConflict, match="is queued and already sent to its tier's queue"):
        controls.change_queued(own, sent.id, priority=10)
    running = make(db, "running", sent=True)
    with pytest.raises(JobStateConflict, match="is running: hold and priority change only"):
        controls.change_queued(own, running.id, held=True)
    assert jobs.get_job(db, running.id).held is False


# ---- batches ------------------------------------------------------------------------------

def _batch(db, state="open"):
    batch = Batch(id=f"b{RUN_ID}", name="controls", project="default", state=state,
                  report_keys={"csv": "k"}, webhook_events=[], created_at=utcnow())
    with session_scope(db) as session:
        session.add(batch)
    return batch.id


def test_batch_cancel_cancels_its_live_jobs_only(own, db):
    batch = _batch(db)
    live = [make(db, batch_id=batch), make(db, "running", sent=True, batch_id=batch)]
    done = make(db, "succeeded", sent=True, batch_id=batch)
    other = make(db)
    assert sorted(controls.cancel_batch(own, batch)) == sorted(j.id for j in live)
    assert [jobs.get_job(db, j.id).state for j in live] == ["canceled", "canceled"]
    assert jobs.get_job(db, done.id).state == "succeeded"
    assert jobs.get_job(db, other.id).state == "queued"
    assert kinds(db, live[0].id) == [events.CANCELED] and kinds(db, done.id) == []


def test_batch_retry_failed_retries_failed_and_expired_and_reopens_the_batch(own, db):
    batch = _batch(db, state="done")
    failed = make(db, "failed", sent=True, batch_id=batch)
    expired = make(db, "expired", batch_id=batch)
    canceled = make(db, "canceled", batch_id=batch)
    stopping = make(db, "failed", sent=True, batch_id=batch)
    set_segment(db, stopping, 1, state="running", heartbeat_at=utcnow())
    retried, skipped = controls.retry_failed(own, batch)
    assert sorted(retried) == sorted([failed.id, expired.id])
    assert list(skipped) == [stopping.id] and "still stopping" in skipped[stopping.id]
    assert [jobs.get_job(db, j.id).state for j in (failed, expired, canceled, stopping)] == \
        ["queued", "queued", "canceled", "failed"]
    with session_scope(db) as session:
        reopened = session.get(Batch, batch)
        assert (reopened.state, reopened.finished_at) == ("open", None)


# ---- the sweep --------------------------------------------------------------------------

def _age(db, job, **ago):
    """Move the job's times into the past: {column: seconds ago}."""
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            **{col: utcnow() - timedelta(seconds=s) for col, s in ago.items()}))


def test_sweep_fails_jobs_past_their_timeout_and_keeps_what_they_rendered(own, db):
    late = make(db, "running", sent=True, timeout_s=5)
    set_segment(db, late, 0, state="done", chunk_keys=["kept.mp4"], progress=1.0)
    _age(db, late, dispatched_at=10)
    in_time = make(db, "running", sent=True, timeout_s=60)
    _age(db, in_time, dispatched_at=10)
    no_limit = make(db, "stitching", sent=True)
    _age(db, no_limit, dispatched_at=10_000)
    finished = make(db, "succeeded", sent=True, timeout_s=1)
    _age(db, finished, dispatched_at=10)
    assert controls.sweep(own) == {"timed_out": [late.id], "expired": []}
    after = jobs.get_job(db, late.id)
    assert after.state == "failed" and after.error.startswith("timeout: not finished within "
                                                              "timeout_s=5 s of admission")
    assert after.segments[0].chunk_keys == ["kept.mp4"]
    assert kinds(db, late.id) == [events.TIMED_OUT]
    assert [jobs.get_job(db, j.id).state for j in (in_time, no_limit, finished)] == \
        ["running", "stitching", "succeeded"]


def test_sweep_expires_jobs_never_admitted_within_their_queue_ttl(own, db):
    old = make(db, queue_ttl_s=5, hold=True)  # held all along: never admitted
    old_sent = make(db, sent=True, queue_ttl_s=5)
    young = make(db, queue_ttl_s=600)
    for job in (old, old_sent, young):
        _age(db, job, created_at=10)
    assert controls.sweep(own) == {"timed_out": [], "expired": [old.id]}
    after = jobs.get_job(db, old.id)
    assert after.state == "expired" and "queue_ttl_s=5 s" in after.error
    assert after.finished_at is not None and kinds(db, old.id) == [events.EXPIRED]
    assert [jobs.get_job(db, j.id).state for j in (old_sent, young)] == ["queued", "queued"]


def test_a_job_that_ends_as_the_sweep_decides_keeps_its_end(own, db):
    """The sweep read the job running; it succeeded before the compare-and-set landed."""
    job = make(db, "succeeded", sent=True, timeout_s=1)
    stamp = jobs.get_job(db, job.id).dispatched_at
    assert not controls._end(own, job.id, "running", Job.dispatched_at == stamp,
                             controls.JobState.failed, events.TIMED_OUT, "timeout: x", utcnow())
    assert jobs.get_job(db, job.id).state == "succeeded" and kinds(db, job.id) == []


# ---- queue position and ETA ---------------------------------------------------------------

def test_queue_position_follows_admission_order_and_eta_shares_the_pool(db):
    first = make(db, priority=90)
    second = make(db, priority=50)
    make(db, priority=95, hold=True)  # held: not ahead of anyone
    make(db, priority=99, sent=True)  # already sent: not waiting
    make(db, priority=99, project="tier-b")  # another tier (cpu-b): another line
    third = make(db, priority=50)
    est = first.route["est_seconds"]
    pool = admit.pool_size(first.route)
    assert est and pool == 2
    assert controls.queue_estimate(db, first) == (1, pytest.approx(est))
    assert controls.queue_estimate(db, second) == (2, pytest.approx(est + est / pool))
    assert controls.queue_estimate(db, third) == (3, pytest.approx(est + 2 * est / pool))
    running = make(db, "running", sent=True)
    _age(db, running, started_at=1)
    position, eta = controls.queue_estimate(db, jobs.get_job(db, running.id))
    assert position is None and eta == pytest.approx(max(0.0, est - 1), abs=0.5)


def test_the_sweep_and_position_queries_read_through_indexes(db):
    """100,000 jobs a day: with 20,000 finished jobs in the table, neither query scans it."""
    seed = make(db, timeout_s=5, queue_ttl_s=5)
    columns = [c.name for c in Job.__table__.columns]
    values = [{"id": "substr(md5(jobs.id || g::text), 1, 32)", "state": "'succeeded'"}
              .get(c, f"jobs.{c}") for c in columns]
    with get_engine(db).begin() as conn:
        conn.execute(text(f"INSERT INTO jobs ({', '.join(columns)}) SELECT {', '.join(values)} "
                          f"FROM jobs, generate_series(1, 20000) g WHERE jobs.id = :id"),
                     {"id": seed.id})
        conn.execute(text("ANALYZE jobs"))
        for query in (controls.timeout_candidates(), controls.ttl_candidates(),
                      controls.ahead_query(seed)):
            sql = query.compile(dialect=postgresql.dialect(),
                                compile_kwargs={"literal_binds": True})
            plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {sql}")))
            assert "Seq Scan" not in plan and "Index" in plan, plan
