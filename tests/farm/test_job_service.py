"""The job service's compare-and-set transitions, on PostgreSQL and on SQLite."""

from __future__ import annotations

import threading

import pytest

from farm.jobs import preemption_service as preempting, service as jobs
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


# ---- preemption at a step boundary (issue #15, item 1) -------------------------------------------

def sent(db, job, chord="chord-1"):
    """Task ids as the chord's send records them: the render tasks' are t{index}."""
    jobs.set_celery_ids(db, job.id, chord, {s.id: f"t{s.index}" for s in job.segments})


def set_segment(db, seg_id, **values):
    from sqlalchemy import update

    from farm.db.tables import Segment

    with session_scope(db) as session:
        session.execute(update(Segment).where(Segment.id == seg_id).values(**values))


def kinds(db, job_id):
    from farm.jobs import events

    return [e.kind for e in events.list_events(db, job_id)]


def test_preemption_is_asked_of_running_segments_once(any_db):
    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1")
    assert jobs.report_progress_and_requests(any_db, first, 0.2, None) == ("running", False)
    assert preempting.request_preemption(any_db, [first, second]) == 1  # the pending one is not
    assert preempting.request_preemption(any_db, [first]) == 0  # already asked
    assert preempting.request_preemption(any_db, []) == 0
    assert jobs.report_progress_and_requests(any_db, first, 0.3, None) == ("running", True)
    assert jobs.report_segment_progress(any_db, first, 0.4, None) == "running"
    assert preempting.clear_preemption_request(any_db, first, None)  # it came after the last step
    assert jobs.report_progress_and_requests(any_db, first, 1.0, None) == ("running", False)


def test_only_the_segments_task_clears_its_request_to_yield(any_db):
    """A superseded task seeing a request after its last step must not drop the request
    meant for its successor's render (issue #15 review)."""
    job = new_job(any_db, frames=9)
    seg = job.segments[0].id
    sent(any_db, job)
    assert jobs.start_segment(any_db, seg, "w1", task_id="t0")
    jobs.set_celery_ids(any_db, job.id, "chord-2", {seg: "t1"})  # the reconciler re-sent it
    assert jobs.start_segment(any_db, seg, "w2", task_id="t1")
    assert preempting.request_preemption(any_db, [seg]) == 1
    assert not preempting.clear_preemption_request(any_db, seg, "t0")
    assert jobs.report_progress_and_requests(any_db, seg, 0.5, "t1") == ("running", True)
    assert preempting.clear_preemption_request(any_db, seg, "t1")
    assert jobs.report_progress_and_requests(any_db, seg, 1.0, "t1") == ("running", False)


def test_the_preemption_limit_can_be_passed_by_the_caller(any_db):
    from farm.settings import get_settings

    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1") and jobs.start_segment(any_db, second, "w2")
    set_segment(any_db, first, preemptions=1)
    assert get_settings().max_preemptions > 1  # the default would ask both
    assert preempting.request_preemption(any_db, [first, second], max_preemptions=1) == 1
    assert [s.preempt_requested_at is None for s in jobs.get_job(any_db, job.id).segments] \
        == [True, False]
    assert preempting.request_preemption(any_db, [first], max_preemptions=0) == 0


def test_batch_members_and_segments_at_the_limit_are_never_asked(any_db):
    from farm.settings import get_settings

    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1") and jobs.start_segment(any_db, second, "w2")
    set_segment(any_db, first, render_batch="batch-task")
    set_segment(any_db, second, preemptions=get_settings().max_preemptions)
    assert preempting.request_preemption(any_db, [first, second]) == 0
    set_segment(any_db, second, preemptions=get_settings().max_preemptions - 1)
    assert preempting.request_preemption(any_db, [first, second]) == 1


def test_a_yield_puts_the_segment_back_and_the_job_in_the_queue(any_db):
    job = new_job(any_db, frames=9)
    seg = job.segments[0].id
    sent(any_db, job)
    assert jobs.start_segment(any_db, seg, "w1", task_id="t0")
    started = jobs.get_job(any_db, job.id).started_at
    assert preempting.request_preemption(any_db, [seg]) == 1
    assert not preempting.yield_segment(any_db, seg, "other-task", "k", "ab", 3, "at step 3")  # fenced
    assert preempting.yield_segment(any_db, seg, "t0", "jobs/x/resume/s0000_p01.safetensors",
                              "ab" * 32, 3, "at step 3 of 8")
    back = jobs.get_job(any_db, job.id)
    s = back.segments[0]
    assert (s.state, s.attempts, s.preemptions, s.celery_id, s.preempt_requested_at) == \
        ("pending", 0, 1, None, None)  # the attempt does not count: it did not fail
    assert (s.resume_key, s.resume_sha256, s.resume_step) == \
        ("jobs/x/resume/s0000_p01.safetensors", "ab" * 32, 3)
    assert (back.state, back.dispatched_at, back.celery_id) == ("queued", None, None)
    assert kinds(any_db, job.id) == ["preempted"]
    # The old chord's tasks are fenced out: its render task and its stitch do nothing.
    assert not jobs.start_segment(any_db, seg, "w1", task_id="t0")
    assert not jobs.begin_stitch(any_db, job.id, "chord-1")
    # Admission sends it again; it starts with its first start kept, and finishing clears
    # the resume fields.
    with session_scope(any_db) as session:
        assert jobs.claim_for_dispatch(session, job.id)
    sent(any_db, job, "chord-2")
    assert jobs.start_segment(any_db, seg, "w2", task_id="t0")
    again = jobs.get_job(any_db, job.id)
    assert again.started_at == started and again.segments[0].attempts == 1
    assert jobs.finish_segment(any_db, seg, ["c.mp4"], "t0")
    s = jobs.get_job(any_db, job.id).segments[0]
    assert (s.resume_key, s.resume_sha256, s.resume_step, s.preemptions) == (None, None, None, 1)


def test_a_job_with_a_running_sibling_goes_back_when_the_sibling_ends(any_db):
    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    sent(any_db, job)
    assert jobs.start_segment(any_db, first, "w1", task_id="t0")
    assert jobs.start_segment(any_db, second, "w2", task_id="t1")
    assert preempting.yield_segment(any_db, first, "t0", "k", "ab" * 32, 2, "at step 2 of 8")
    assert jobs.get_job(any_db, job.id).state == "running"  # its sibling still renders
    assert not preempting.unsend_job_if_idle(any_db, job.id)
    assert jobs.finish_segment(any_db, second, ["b.mp4"], "t1")
    assert preempting.unsend_job_if_idle(any_db, job.id)
    back = jobs.get_job(any_db, job.id)
    assert (back.state, back.dispatched_at) == ("queued", None)
    assert [s.state for s in back.segments] == ["pending", "done"]
    assert not preempting.unsend_job_if_idle(any_db, job.id)  # once


def test_a_job_without_a_yielded_segment_is_never_unsent(any_db):
    job = new_job(any_db)
    first, second = (s.id for s in job.segments)
    sent(any_db, job)  # the second segment's task waits in the broker: not idle
    assert jobs.start_segment(any_db, first, "w1", task_id="t0")
    assert jobs.finish_segment(any_db, first, ["a.mp4"], "t0")
    assert not preempting.unsend_job_if_idle(any_db, job.id)
    assert jobs.get_job(any_db, job.id).dispatched_at is not None


def test_a_start_waits_for_a_yield_holding_the_jobs_row(own_pg):
    """start_segment locks the job's row first (issue #15 review): a sibling's yield reads
    whether any segment runs and un-sends the job in one transaction holding that lock, so
    a start landing between the read and the un-send waits, then finds its task fenced out
    (never a job back in the queue with a segment running)."""


    job = new_job(own_pg)
    first, second = (s.id for s in job.segments)
    sent(own_pg, job)
    assert jobs.start_segment(own_pg, first, "w1", task_id="t0")
    started = []
    with session_scope(own_pg) as session:  # the yield's transaction, as yield_segment's
        jobs._lock_job(session, job.id)
        assert jobs._cas_segment(session, first, ["running"], state="pending", celery_id=None)
        starter = threading.Thread(
            target=lambda: started.append(jobs.start_segment(own_pg, second, "w2",
                                                             task_id="t1")))
        starter.start()
        starter.join(0.5)
        assert starter.is_alive()  # blocked on the job's row
        assert preempting._unsend_if_idle(session, job.id)
    starter.join(10)
    back = jobs.get_job(own_pg, job.id)
    assert started == [False]
    assert (back.state, [s.state for s in back.segments]) == ("queued", ["pending", "pending"])


def test_a_stopped_render_fails_its_segment_only_while_it_is_its_own(any_db):
    """segment_runner._stopped, after a refused yield (the reconciler re-sent the segment
    meanwhile): the new task's segment is left alone (issue #15 review); a job that ended
    still gets its own task's segment failed."""
    from farm.tasks.segment_runner import _stopped

    job = new_job(any_db, frames=9)
    seg = job.segments[0].id
    sent(any_db, job)
    assert jobs.start_segment(any_db, seg, "w1", task_id="t0")
    jobs.set_celery_ids(any_db, job.id, "chord-2", {seg: "t1"})
    assert jobs.start_segment(any_db, seg, "w2", task_id="t1")
    assert _stopped(any_db, job.id, seg, 0, False, "t0") == {"segment_id": seg,
                                                             "superseded": True}
    assert jobs.get_job(any_db, job.id).segments[0].state == "running"
    assert jobs.cancel_job(any_db, job.id)
    assert _stopped(any_db, job.id, seg, 0, False, "t1") == {"segment_id": seg, "canceled": True}
    assert jobs.get_job(any_db, job.id).segments[0].state == "failed"


def test_a_refused_state_is_dropped_by_the_segments_task_only(any_db):
    job = new_job(any_db, frames=9)
    seg = job.segments[0].id
    sent(any_db, job)
    assert jobs.start_segment(any_db, seg, "w1", task_id="t0")
    set_segment(any_db, seg, resume_key="k", resume_sha256="ab" * 32, resume_step=3)
    assert not preempting.discard_resume_state(any_db, seg, "t9")
    assert jobs.get_job(any_db, job.id).segments[0].resume_key == "k"
    assert preempting.discard_resume_state(any_db, seg, "t0")
    s = jobs.get_job(any_db, job.id).segments[0]
    assert (s.resume_key, s.resume_sha256, s.resume_step, s.state) == (None, None, None,
                                                                       "running")


def test_siblings_yielding_at_once_send_the_job_back_once(own_pg):
    job = new_job(own_pg)
    sent(own_pg, job)
    for s in job.segments:
        assert jobs.start_segment(own_pg, s.id, "w", task_id=f"t{s.index}")
    barrier, results = threading.Barrier(2), []

    def give_way(seg):
        barrier.wait()
        results.append(preempting.yield_segment(own_pg, seg.id, f"t{seg.index}", f"k{seg.index}",
                                          "ab" * 32, 1, "at step 1 of 8"))

    threads = [threading.Thread(target=give_way, args=(s,)) for s in job.segments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    back = jobs.get_job(own_pg, job.id)
    assert results == [True, True]
    assert (back.state, back.dispatched_at) == ("queued", None)
    assert [s.state for s in back.segments] == ["pending", "pending"]


def saved_bytes(step: int, steps: int = 8) -> bytes:
    """A real resume state (workers/resume_state.py) without a model: a solver and latents."""
    import torch
    from diffusers import UniPCMultistepScheduler

    from workers import resume_state
    from workers.wan_pipeline import DenoiseState

    solver = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    solver.set_timesteps(steps)
    return resume_state.save(DenoiseState(torch.zeros(1, 4, 1, 2, 2), solver, step),
                             steps=steps, expert="high", next_expert="high")


def test_the_runner_stores_a_yield_and_checks_the_state_it_resumes_from(any_db, tmp_path):
    from farm.jobs import events
    from farm.settings import get_settings
    from farm.storage import Storage
    from farm.tasks import preemption
    from workers.resume_state import sha256_of

    settings = get_settings().model_copy(update={"database_url": any_db})
    storage = Storage(f"file://{tmp_path}/store")
    job = new_job(any_db, frames=9)
    sent(any_db, job)
    assert jobs.start_segment(any_db, job.segments[0].id, "w", task_id="t0")
    data = saved_bytes(3)
    event = {"kind": "preempted", "state": data, "sha256": sha256_of(data), "step": 3,
             "steps": 8, "expert": "high", "next_expert": "high"}
    seg = jobs.get_job(any_db, job.id).segments[0]
    # Another task's yield is refused and leaves no file behind.
    assert not preemption.store_and_yield(settings, storage, job, seg, "t9",
                                          preemption.Yielded(event), tmp_path)
    assert storage.list_keys(f"jobs/{job.id}/resume") == []
    assert preemption.store_and_yield(settings, storage, job, seg, "t0",
                                      preemption.Yielded(event), tmp_path)
    key = f"jobs/{job.id}/resume/s0000_p01.safetensors"
    assert storage.list_keys(f"jobs/{job.id}/resume") == [key]
    assert storage.sha256(key) == event["sha256"]
    seg = jobs.get_job(any_db, job.id).segments[0]
    assert (seg.resume_key, seg.resume_sha256, seg.resume_step) == (key, event["sha256"], 3)
    assert preemption.saved_state(settings, storage, job, seg) == data
    # RESUMED is the render's to log, once the group took the state (start_render).
    assert kinds(any_db, job.id) == ["preempted"]
    # A state whose bytes changed, or that is gone, is not used: the render starts from noise.
    storage.local_path(key).write_bytes(saved_bytes(3)[:-1] + b"x")
    assert preemption.saved_state(settings, storage, job, seg) is None
    storage.remove(key)
    assert preemption.saved_state(settings, storage, job, seg) is None
    discarded = [e.message for e in events.list_events(any_db, job.id)
                 if e.kind == "resume_discarded"]
    assert len(discarded) == 2 and "is not the stored" in discarded[0]
    assert "missing from storage" in discarded[1] and "starting from noise" in discarded[1]
