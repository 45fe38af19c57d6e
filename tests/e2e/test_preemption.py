"""Preemption at a step boundary with exact resume (issue #15, item 1).

Through the live farm (real PostgreSQL, Redis, Celery, Ray, ffmpeg): a wan-toy job (two
experts, the switch mid-render) is asked to yield twice, once before the expert boundary and
once after it, as admission asks (farm.jobs.preemption_service.request_preemption); each
time its state is stored, the job goes back to the queue and resumes on a group of the pool
from the saved step. Its video must be byte-identical to the same request rendered without a
break. A job of two independent clips yields mid-render, is sent again and stitched to the
same video.

Below the farm, the split placement (each expert on its own group): a render yields during
the high-noise phase and during the low-noise phase, and resumes on the right group; a
stored state the group cannot continue is dropped and the render starts over from noise.
"""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select

from farm.db.session import session_scope
from farm.db.tables import Segment
from farm.jobs import events, preemption_service as preempting, service as jobs
from farm.policy import get_policy
from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for
from tests.farm.test_fencing import running_job
from workers import resume_state
from workers.group import ActorGroup

pytestmark = pytest.mark.e2e

# wan-toy at 12 ms a step here: 100 steps make a render of about a second and a half, long
# enough to ask it to yield after the expert switch (after step 31 of 100) from outside.
STEPS = 100
BOUNDARY = 31  # steps done when wan-toy's low-noise expert takes over (boundary_ratio 0.875)
TOY = dict(prompt="a red circle moving left", model="wan-toy", track="final", frames=5,
           steps=STEPS, seed=1234, width=64, height=64, fps=8, cache=False)


@pytest.fixture
def client(api_url):
    with api_client(api_url) as c:
        yield c


def segment_row(db: str, job_id: str) -> Segment:
    with session_scope(db) as session:
        return session.scalars(select(Segment).where(Segment.job_id == job_id)).one()


def poll(check, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ask_to_yield_when(db: str, job_id: str, preemptions: int, progress: float) -> None:
    """request_preemption once the segment runs its attempt after ``preemptions`` yields and
    its progress reaches ``progress`` (as admission's call would land, mid-render)."""
    def reached() -> bool:
        seg = segment_row(db, job_id)
        return (seg.state == "running" and seg.preemptions == preemptions
                and seg.progress >= progress)

    poll(reached, f"segment at progress {progress} after {preemptions} preemption(s)")
    assert preempting.request_preemption(db, [segment_row(db, job_id).id]) == 1


def test_a_preempted_job_resumes_to_the_same_video(client, settings, celery_beat):
    db = settings.database_url
    straight = client.post("/v1/jobs", json=TOY)
    preempted = client.post("/v1/jobs", json=TOY)
    assert straight.status_code == preempted.status_code == 202, preempted.text
    job_id = preempted.json()["id"]
    ask_to_yield_when(db, job_id, 0, 0.0)  # high-noise phase: seen at the first write
    ask_to_yield_when(db, job_id, 1, (BOUNDARY + 8) / STEPS)  # low-noise phase
    done = wait_for(client, job_id, {"succeeded", "failed", "canceled"})
    reference = wait_for(client, straight.json()["id"], {"succeeded", "failed", "canceled"})
    assert done["state"] == reference["state"] == "succeeded", (done["error"], reference["error"])
    assert done["output_sha256"] == reference["output_sha256"]

    seg = segment_row(db, job_id)
    assert (seg.preemptions, seg.resume_key, seg.preempt_requested_at) == (2, None, None)
    log = [e for e in events.list_events(db, job_id)
           if e.kind in (events.PREEMPTED, events.RESUMED, events.RESUME_DISCARDED)]
    assert [e.kind for e in log] == ["preempted", "resumed"] * 2, [e.message for e in log]
    stops = [re.match(rf"at step (\d+) of {STEPS}, expert (\w+) .*state (\S+)", e.message)
             for e in log[::2]]
    assert all(stops), [e.message for e in log]
    (first, high), (second, low) = [(int(m[1]), m[2]) for m in stops]
    assert 1 <= first < BOUNDARY <= second < STEPS and (high, low) == ("high", "low")
    assert log[1].message.startswith(f"from step {first} of {STEPS}, state {stops[0][3]}")
    assert log[3].message.startswith(f"from step {second} of {STEPS}, state {stops[1][3]}")
    # A finished segment's resume files are removed (the job's scratch).
    from farm.storage import Storage

    assert Storage(settings.storage_url).list_keys(f"jobs/{job_id}/resume") == []


# wan-tiny at about 6 ms a step here: 120 steps make its 17-frame segment render for most of a
# second, long enough to ask it to yield mid-render from outside.
CLIPS = dict(prompt="a blue square moving right", model="wan-tiny", frames=21, steps=120,
             seed=4321, width=112, height=64, fps=8, cache=False, continuous=False)


def segment_rows(db: str, job_id: str) -> list[Segment]:
    with session_scope(db) as session:
        return list(session.scalars(select(Segment).where(Segment.job_id == job_id)
                                    .order_by(Segment.index)))


def test_a_preempted_clip_job_is_sent_again_and_stitched_to_the_same_video(client, settings,
                                                                           celery_beat):
    """Two independent clips (continuous false: 17 + 4 frames), the first asked to yield
    mid-render (issue #15 review). With the second's task still waiting in the broker (the
    test farm's render.cpu worker runs one task at a time), the job goes back to the queue
    at once: that waiting task and the old chord's stitch are fenced out, admission sends
    the job again, the first clip resumes from its state, the second renders, the new stitch
    joins them. The video is the straight render's, byte for byte."""
    db = settings.database_url
    job_id = client.post("/v1/jobs", json=CLIPS).json()["id"]

    def first_mid_render():
        first, second = segment_rows(db, job_id)
        return first.state == "running" and first.progress > 0 and second.state == "pending"

    poll(first_mid_render, "the first clip mid-render, the second waiting")
    old_chord = jobs.get_job(db, job_id).celery_id
    assert preempting.request_preemption(db, [segment_rows(db, job_id)[0].id]) == 1
    straight = client.post("/v1/jobs", json=CLIPS).json()["id"]
    done = wait_for(client, job_id, {"succeeded", "failed", "canceled"})
    reference = wait_for(client, straight, {"succeeded", "failed", "canceled"})
    assert done["state"] == reference["state"] == "succeeded", (done["error"], reference["error"])
    assert done["output_sha256"] == reference["output_sha256"]

    job = jobs.get_job(db, job_id)
    assert job.celery_id != old_chord  # sent again; the old chord's stitch did nothing
    segs = segment_rows(db, job_id)
    # One start each that counts: the yield gives its attempt back, and the second clip's
    # first task never started (fenced out when the job went back to the queue).
    assert [(s.preemptions, s.attempts, s.resume_key) for s in segs] == [(1, 1, None), (0, 1, None)]
    log = [(e.kind, e.segment_index) for e in events.list_events(db, job_id)
           if e.kind in (events.PREEMPTED, events.RESUMED, events.RESUME_DISCARDED,
                         events.SEGMENT_DONE)]
    assert log[:2] == [("preempted", 0), ("resumed", 0)], log
    assert sorted(log[2:]) == [("segment_done", 0), ("segment_done", 1)], log


# ---- the split placement, one level below the farm -----------------------------------------

SPLIT = dict(prompt="a red circle moving left", negative_prompt="", frames=5, height=64,
             width=112, steps=24, guidance_high=4.0, guidance_low=3.0, seed=7)


def frames_of(events_: list[dict]) -> bytes:
    return b"".join(e["frames"].tobytes() for e in events_ if e["kind"] == "frames")


def render_until(stream, expert: str) -> list[dict]:
    """The stream's events, asking it to yield at the first progress event of ``expert``."""
    seen = []
    for event in stream:
        seen.append(event)
        if event["kind"] == "progress" and event["expert"] == expert:
            stream.preempt()
    return seen


@pytest.fixture(scope="module")
def split(ray_head, tiny_model):
    tier = get_policy().catalog.tier("cpu")
    group = ActorGroup.get_or_create("wan-tiny", tier, str(tiny_model), detached=False,
                                     placement="split")
    yield group
    group.kill()


@pytest.mark.parametrize("phase", ["high", "low"])
def test_split_placement_yields_in_either_phase_and_resumes(split, phase):
    reference = frames_of(list(split.render(SPLIT)))
    stopped = render_until(split.render(SPLIT), phase)
    last = stopped[-1]
    assert last["kind"] == "preempted" and last["expert"] == phase
    assert not any(e["kind"] == "frames" for e in stopped)
    ran = [e["expert"] for e in stopped if e["kind"] == "progress"]
    if phase == "high":  # the low-noise group never started
        assert set(ran) == {"high"} and last["step"] < 24
    else:
        assert "low" in ran and last["next_expert"] == "low"
    header = resume_state.describe(last["state"])
    assert header["step"] == last["step"] and header["info"]["next_expert"] == last["next_expert"]
    resumed = list(split.render(SPLIT, state=last["state"]))
    progress = [e for e in resumed if e["kind"] == "progress"]
    assert progress[0]["step"] == last["step"] + 1 and progress[-1]["step"] == 24
    if phase == "low":  # resumed on the low-noise group alone
        assert {e["expert"] for e in progress} == {"low"}
    assert frames_of(resumed) == reference


def test_a_parallel_group_yields_on_every_rank_together(ray_head, tiny_model):
    """tp2: both ranks stop after the same step (a collective agrees), the followers end
    without an error, and the same group resumes to the same frames."""
    tier = get_policy().catalog.tier("cpu")
    group = ActorGroup.get_or_create("wan-tiny", tier, str(tiny_model), detached=False,
                                     plan="tp2")
    try:
        reference = frames_of(list(group.render(SPLIT)))
        stopped = render_until(group.render(SPLIT), "high")
        last = stopped[-1]
        assert last["kind"] == "preempted" and last["expert"] == "high"
        resumed = list(group.render(SPLIT, state=last["state"]))
        assert frames_of(resumed) == reference
        assert group.healthy()
    finally:
        group.kill()


def test_a_state_the_group_refuses_is_dropped_and_the_render_starts_over(split, settings,
                                                                        tmp_path):
    """A stored state that checks out (sha256, step) but that the group cannot continue (a
    redeploy changed the latents' shape or the solver's config; here: a state of a 9-frame
    render for a 5-frame one) costs time, never the job (issue #15 review): the runner's
    start_render logs RESUME_DISCARDED, clears the segment's resume fields, removes the
    file and renders from noise on the same group: the same frames as a straight render."""
    from farm.db.migrate import upgrade
    from farm.storage import Storage
    from farm.tasks import preemption
    from sqlalchemy import update

    db = f"sqlite:///{tmp_path}/farm.db"  # its own database: the farm's admission never sees it
    upgrade(db)
    local = settings.model_copy(update={"database_url": db})
    job_id, seg_id = running_job(db)  # a 5-frame wan-tiny segment, running under task t1
    job = jobs.get_job(db, job_id)

    other = render_until(split.render(SPLIT | {"frames": 9}), "high")[-1]
    storage = Storage(f"file://{tmp_path}/store")
    key = preemption.resume_key(job, job.segments[0], 1)
    (tmp_path / "state").write_bytes(other["state"])
    storage.put_file(tmp_path / "state", key)
    with session_scope(db) as session:
        session.execute(update(Segment).where(Segment.id == seg_id).values(
            resume_key=key, resume_sha256=other["sha256"], resume_step=other["step"]))
    seg = jobs.get_job(db, job.id).segments[0]
    state = preemption.saved_state(local, storage, job, seg)
    assert state == other["state"]  # its sha256 and step check out: only the group can tell

    stream = preemption.start_render(local, storage, split, SPLIT, job, seg, "t1", state)
    assert frames_of(list(stream)) == frames_of(list(split.render(SPLIT)))
    log = [e for e in events.list_events(db, job.id)]
    assert [e.kind for e in log] == [events.RESUME_DISCARDED], [e.message for e in log]
    assert "refused by the group" in log[0].message and "latents" in log[0].message
    seg = jobs.get_job(db, job.id).segments[0]
    assert (seg.resume_key, seg.resume_sha256, seg.resume_step) == (None, None, None)
    assert storage.list_keys(f"jobs/{job.id}/resume") == []
