"""The job service's compare-and-set transitions, on PostgreSQL and on SQLite."""

from __future__ import annotations

import threading

import pytest

from farm.jobs import service as jobs
from farm.db.session import session_scope
from farm.schemas import JobCreate
from farm.jobs.submit import route_request


def new_job(db, **overrides):
    """Routed by the shipped rules and saved (not sent: no admission here)."""
    request = JobCreate(**({"prompt": "a red circle", "frames": 33, "model": "wan-tiny"}
                           | overrides))
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(db, [job])
    with session_scope(db) as session:  # as admission does when it sends the job
        assert jobs.claim_for_dispatch(session, job.id)
        assert not jobs.claim_for_dispatch(session, job.id)  # once only
    return job


def test_create_writes_job_and_planned_segments(any_db):
    job = jobs.get_job(any_db, new_job(any_db, seed=5).id)
    assert job.state == "queued" and job.seed == 5 and job.steps == 8
    assert job.route["queue"] == "render.cpu"
    assert [(s.index, s.render_frames, s.skip_frames, s.state) for s in job.segments] == \
        [(0, 17, 0, "pending"), (1, 17, 1, "pending")]
    assert len(job.id) == 32


def test_lifecycle_to_succeeded(any_db):
    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1")
    assert jobs.get_job(any_db, job.id).state == "running"
    assert jobs.report_segment_progress(any_db, first, 0.5, None) == "running"
    assert jobs.get_job(any_db, job.id).progress == pytest.approx(0.95 * 0.25)
    assert jobs.finish_segment(any_db, first, ["a.mp4"])
    assert not jobs.begin_stitch(any_db, "nonexistent")
    assert jobs.start_segment(any_db, second, "w1") and jobs.finish_segment(any_db, second, ["b"])
    assert jobs.begin_stitch(any_db, job.id)
    assert jobs.succeed_job(any_db, job.id, "jobs/x/video.mp4", "ab" * 32, 10)
    done = jobs.get_job(any_db, job.id)
    assert (done.state, done.progress, done.output_bytes) == ("succeeded", 1.0, 10)
    assert done.finished_at >= done.started_at >= done.created_at
    # An ended job cannot be canceled, failed or restarted.
    assert not jobs.cancel_job(any_db, job.id)
    assert not jobs.fail_job(any_db, job.id, "late")
    assert not jobs.start_segment(any_db, first, "w2")


def test_cancel_stops_new_segments_and_stitching(any_db):
    job = new_job(any_db)
    assert jobs.cancel_job(any_db, job.id)
    assert not jobs.start_segment(any_db, job.segments[0].id, "w1")
    assert not jobs.begin_stitch(any_db, job.id)
    assert jobs.get_job(any_db, job.id).state == "canceled"


def test_only_one_of_racing_finishers_wins(any_db):
    job = new_job(any_db, frames=9)
    seg = job.segments[0].id
    assert jobs.start_segment(any_db, seg, "w1")
    barrier, wins = threading.Barrier(8), []

    def finish(i):
        barrier.wait()
        wins.append(jobs.finish_segment(any_db, seg, [f"chunk-{i}"]))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert not jobs.fail_segment(any_db, seg, "too late")
    assert jobs.get_job(any_db, job.id).segments[0].state == "done"


def test_list_filters_and_pages(any_db):
    ids = [new_job(any_db, frames=9).id for _ in range(3)]
    jobs.cancel_job(any_db, ids[1])
    canceled, total = jobs.list_jobs(any_db, "canceled", 10, 0, "default")
    assert ids[1] in [j.id for j in canceled] and all(j.state == "canceled" for j in canceled)
    page, total_all = jobs.list_jobs(any_db, None, 2, 0, "default")
    assert len(page) == 2 and total_all >= 3 and total_all >= total


def test_largest_seed_fits_every_segment(any_db):
    from scheduler.planner import segment_seed

    job = jobs.get_job(any_db, new_job(any_db, seed=2**31 - 1).id)
    seeds = [s.seed for s in job.segments]
    assert seeds == [2**31 - 1, segment_seed(2**31 - 1, 1)]
    assert all(0 <= seed < 2**31 for seed in seeds) and seeds[1] != seeds[0]


def test_a_segment_started_too_often_gives_up(any_db):
    from farm.errors import SegmentExhausted

    seg = new_job(any_db, frames=9).segments[0].id
    for _ in range(3):  # a worker that dies mid-segment: the broker redelivers the task
        assert jobs.start_segment(any_db, seg, "w", max_attempts=3)
    with pytest.raises(SegmentExhausted, match="started 3 times"):
        jobs.start_segment(any_db, seg, "w", max_attempts=3)


def test_a_segment_of_an_ended_job_cannot_finish(any_db):
    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1") and jobs.start_segment(any_db, second, "w2")
    assert jobs.fail_segment(any_db, first, "boom") and jobs.fail_job(any_db, job.id, "boom")
    assert not jobs.finish_segment(any_db, second, ["late.mp4"])
    assert jobs.get_job(any_db, job.id).segments[1].state == "running"


def test_a_job_admission_has_not_sent_cannot_start(any_db):
    request = JobCreate(prompt="a red circle", frames=5, model="wan-tiny")
    job = jobs.new_job(request, route_request(request, {}), "sha", waiting=True)
    jobs.add_jobs(any_db, [job])
    assert not jobs.start_segment(any_db, job.segments[0].id, "w1")
    assert jobs.get_job(any_db, job.id).state == "waiting"
