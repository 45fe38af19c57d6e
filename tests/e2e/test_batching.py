"""Batched renders through the live farm (issue #15, item 2), one level below admission:
jobs are claimed here, as admission claims them, and sent as one batch with
`farm.jobs.dispatch.enqueue_batch`; each output must equal the same job rendered alone.

Real PostgreSQL, Redis, Celery, Ray and ffmpeg (the session fixtures).
"""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from sqlalchemy import select, update

from farm.db.session import session_scope
from farm.db.tables import Job, Segment
from farm.jobs import service as jobs
from farm.jobs.dispatch import enqueue_batch
from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for
from workers.ray_cluster import NAMESPACE
from workers.video import probe

pytestmark = pytest.mark.e2e

PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle")
# Small and quick: one segment of the tiny model, a small output (encoding is per member).
DRAFT = dict(model="wan-tiny", frames=9, steps=4, width=112, height=64, fps=8, cache=False)
ENDED = {"succeeded", "failed", "canceled"}
# Decoded H.264 of frames that differ by at most 1/255 (workers/batch_render.py): often
# bit-equal, but a 1/255 flip can change one block's encoding decision (measured: max 9, mean
# 0.011 of 255). Another member's noise or prompt would differ by tens on average.
MAX_PIXEL_DIFF = 24
MEAN_PIXEL_DIFF = 0.1


@pytest.fixture
def client(api_url):
    with api_client(api_url) as c:
        yield c


def submit(client, **fields) -> str:
    resp = client.post("/v1/jobs", json=DRAFT | fields)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def claim(db_url: str, job_ids: list[str]) -> list:
    """As admission does for a batch: the held jobs released and marked sent in one
    transaction (admission's own pass never sees them unheld and unsent)."""
    with session_scope(db_url) as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(held=False))
        assert all(jobs.claim_for_dispatch(session, job_id) for job_id in job_ids)
    return [jobs.get_job(db_url, job_id) for job_id in job_ids]


def frames_of(client, job: dict, path) -> np.ndarray:
    with client.stream("GET", job["output_url"]) as resp:
        assert resp.status_code == 200
        path.write_bytes(resp.read())
    info = probe(path)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(info.frames, info.height, info.width, 3)


def test_like_drafts_in_one_batch_equal_their_solo_renders(client, settings, tmp_path):
    db = settings.database_url
    solo = [submit(client, prompt=p, seed=i) for i, p in enumerate(PROMPTS)]
    held = [submit(client, prompt=p, seed=i, hold=True) for i, p in enumerate(PROMPTS)]
    batch_id = enqueue_batch(claim(db, held))

    for solo_id, batch_job_id in zip(solo, held):
        alone, batched = (wait_for(client, i, ENDED) for i in (solo_id, batch_job_id))
        assert alone["state"] == batched["state"] == "succeeded", (alone, batched)
        a = frames_of(client, alone, tmp_path / f"{solo_id}.mp4").astype(np.int16)
        b = frames_of(client, batched, tmp_path / f"{batch_job_id}.mp4").astype(np.int16)
        assert a.shape == b.shape == (9, 64, 112, 3)
        diff = np.abs(a - b)
        print(f"{batch_job_id}: max |solo - batched| {diff.max()}, mean {diff.mean():.3f}, "
              f"sha equal {alone['output_sha256'] == batched['output_sha256']}")
        assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF
        messages = [e["message"] for e in client.get(f"/v1/jobs/{batch_job_id}/events").json()]
        batched_line = next(m for m in messages if "rendered in a batch of 3" in m)
        assert all(other in batched_line for other in held if other != batch_job_id)
        assert batch_id in batched_line
    with session_scope(db) as session:
        tagged = session.scalars(select(Segment.render_batch).where(Segment.job_id.in_(held)))
        assert set(tagged) == {batch_id}
        stitches = session.scalars(select(Job.celery_id).where(Job.id.in_(held))).all()
        assert len(set(stitches)) == 3 and batch_id not in stitches  # each job its own stitch


def test_a_canceled_member_leaves_the_rest_of_its_batch_to_finish(client, settings):
    db = settings.database_url
    held = [submit(client, prompt=p, seed=10 + i, hold=True, steps=40)
            for i, p in enumerate(PROMPTS)]
    enqueue_batch(claim(db, held))
    wait_for_progress(client, held[1])
    assert client.post(f"/v1/jobs/{held[1]}/cancel").status_code == 200
    ended = {job_id: wait_for(client, job_id, ENDED) for job_id in held}
    assert {i: job["state"] for i, job in ended.items()} == \
        {held[0]: "succeeded", held[1]: "canceled", held[2]: "succeeded"}
    dropped = ended[held[1]]["segments"][0]
    # Started in the batch, then dropped from it: nothing of it stored as a result.
    assert dropped["attempts"] == 1 and dropped["state"] == "failed"
    assert dropped["error"] == "job ended while rendering in a batch"
    assert ended[held[1]]["output_url"] is None
    for job_id in (held[0], held[2]):
        assert any("rendered in a batch of 3" in e["message"] and held[1] in e["message"]
                   for e in client.get(f"/v1/jobs/{job_id}/events").json())


def test_a_failed_batch_sends_each_job_again_alone(client, settings):
    """The batch's actor dies mid-render: no job is lost, each member's job is re-sent with
    its own chord (its log says so) and succeeds."""
    db = settings.database_url
    held = [submit(client, prompt=p, seed=20 + i, hold=True, steps=100)
            for i, p in enumerate(PROMPTS)]
    batch_id = enqueue_batch(claim(db, held))
    group = wait_for_group(client, held[0])
    wait_for_progress(client, held[0])
    ray.kill(ray.get_actor(f"{group}:r0", namespace=NAMESPACE))
    for job_id in held:
        job = wait_for(client, job_id, ENDED)
        assert job["state"] == "succeeded", job
        assert job["segments"][0]["render_batch"] is None  # it ended outside the batch
        log = client.get(f"/v1/jobs/{job_id}/events").json()
        failed = [e for e in log if e["kind"] == "segment_failed"]
        assert failed and f"in batch {batch_id}" in failed[0]["message"], log
        assert "re-sent alone" in failed[0]["message"] and failed[0]["worker"] == group


def wait_for_group(client, job_id: str, timeout: float = 60) -> str:
    """The group the batch leased, from the member's log ("attempt 1 on GROUP in batch")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in client.get(f"/v1/jobs/{job_id}/events").json():
            if e["kind"] == "segment_started" and " in batch " in e["message"]:
                return e["message"].split(" on ")[1].split()[0]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}'s batch never started")


def wait_for_progress(client, job_id: str, timeout: float = 120) -> None:
    """Until the batch is rendering (the member's progress moved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/v1/jobs/{job_id}").json()["progress"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never rendered")


def _job(job_id: str, **fields):
    """A job row's shape, for the checks enqueue_batch makes before it writes anything."""
    segment = SimpleNamespace(id=hash(job_id) % 1000, index=0, state="pending", render_frames=9,
                              resume_key=fields.pop("resume_key", None))
    route = dict(tier="cpu", queue="render.cpu", variant="wan-tiny", parallel="single",
                 placement="resident", cache=None) | fields.pop("route", {})
    return SimpleNamespace(**dict(id=job_id, model="wan-tiny", steps=4, guidance_high=4.0,
                                  guidance_low=3.0, priority=50, route=route,
                                  segments=fields.pop("segments", [segment])) | fields)


@pytest.mark.parametrize("jobs_, message", [
    ([], "at least one job"),
    ([_job("a"), _job("a")], "appears twice"),
    ([_job("a"), _job("b", steps=8)], r"disagree on steps: \[4, 8\]"),
    ([_job("a"), _job("b", route={"queue": "render.cpu-b"})], "disagree on route.queue"),
    ([_job("a", route={"parallel": "tp2"}), _job("b", route={"parallel": "tp2"})],
     "route.parallel 'tp2' renders alone"),
    ([_job("a", route={"cache": {"kind": "mag"}}), _job("b", route={"cache": {"kind": "mag"}})],
     "route.cache .* renders alone"),
    ([_job("a"), _job("b", resume_key="jobs/b/resume.pt")], "resumes from 'jobs/b/resume.pt'"),
    ([_job("a"), _job("b", segments=[SimpleNamespace(state="pending")] * 2)],
     "job b: a batch renders jobs of one segment"),
])
def test_enqueue_batch_refuses_what_one_batched_render_cannot_take(jobs_, message):
    with pytest.raises(ValueError, match=message):
        enqueue_batch(jobs_, db_url="postgresql+psycopg://nowhere/none")


def test_admission_batches_like_drafts_that_outnumber_the_idle_groups(client, settings,
                                                                      celery_beat):
    """Five like drafts of wan-toy (its draft variant batches up to 4) let go at once: the
    beat tick's admission pass finds two idle groups on the cpu tier and spreads the five
    over them, a batch of three and a batch of two, sent as two batched renders."""
    db = settings.database_url
    held = [submit(client, model="wan-toy", prompt=f"{p} {i}", seed=i, hold=True, frames=5,
                   width=64, height=64, steps=None)
            for i, p in enumerate(PROMPTS + PROMPTS[:2])]
    with session_scope(db) as session:  # one transaction: the next pass sees all five
        session.execute(update(Job).where(Job.id.in_(held)).values(held=False))
    ended = [wait_for(client, job_id, ENDED) for job_id in held]
    assert [job["state"] for job in ended] == ["succeeded"] * 5, ended
    with session_scope(db) as session:
        batches = session.scalars(select(Segment.render_batch)
                                  .where(Segment.job_id.in_(held))).all()
    assert sorted(batches.count(b) for b in set(batches)) == [2, 3], batches
    for job_id in held:
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()]
        assert any("rendered in a batch of" in m for m in messages), messages
