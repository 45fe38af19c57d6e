"""Job controls (issue #13) on the live farm: a held job never starts until released; a
canceled job retried succeeds with both in its log; a timeout_s that fires fails the job
with reason timeout; a queue_ttl_s that passes expires it. The CLI verbs drive some."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import api_client
from tests.e2e.test_cli import farm
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e
TINY = {"prompt": "a red circle", "model": "wan-tiny", "frames": 5, "steps": 2,
        "width": 64, "height": 64}


@pytest.fixture()
def client(api_url, celery_beat):
    with api_client(api_url) as c:
        yield c


def kinds(client, job_id: str) -> list[str]:
    return [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events").json()]


def test_a_held_job_never_starts_until_released(client, api_url):
    submitted = farm("submit", TINY["prompt"], "--model", "wan-tiny", "--frames", "5",
                     "--steps", "2", "--width", "64", "--height", "64", "--hold",
                     env=dict(os.environ, FARM_API_URL=api_url))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    for _ in range(8):  # four beat ticks: admission passes it over every time
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["state"], job["held"], job["dispatched_at"]) == ("queued", True, None)
        assert job["queue_position"] is None and job["eta_s"] is None
        time.sleep(0.5)
    bumped = client.patch(f"/v1/jobs/{job_id}", json={"priority": 70}).json()
    assert bumped["priority"] == 70 and bumped["held"] is True
    released = farm("release", job_id, env=dict(os.environ, FARM_API_URL=api_url))
    assert released.returncode == 0 and f"job {job_id}: " in released.stdout, released.stderr
    done = wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)
    assert done["state"] == "succeeded" and done["held"] is False
    assert kinds(client, job_id)[:2] == ["priority_changed", "released"]
    late = client.patch(f"/v1/jobs/{job_id}", json={"hold": True})
    assert late.status_code == 409 and "is succeeded" in late.json()["detail"]


def test_a_canceled_job_retried_succeeds_and_its_log_shows_both(client, api_url):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "canceled"
    env = dict(os.environ, FARM_API_URL=api_url)
    deadline = time.monotonic() + 30
    while (retried := farm("retry", job_id, env=env)).returncode != 0:  # a segment stopping
        assert "still stopping" in retried.stderr and time.monotonic() < deadline, retried.stderr
        time.sleep(0.5)
    assert "retried" not in retried.stderr and f"job {job_id}: " in retried.stdout
    done = wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)
    assert done["state"] == "succeeded" and done["error"] is None, done
    log = kinds(client, job_id)
    assert log.index("canceled") < log.index("retried") < log.index("segment_done"), log
    again = client.post(f"/v1/jobs/{job_id}/retry")
    assert again.status_code == 409 and "is succeeded" in again.json()["detail"]


def test_a_timeout_that_fires_fails_the_job_with_reason_timeout(client):
    # Five continuous segments of many steps: seconds of work; the sweep runs every tick (1 s).
    job_id = client.post("/v1/jobs", json=TINY | {"frames": 81, "steps": 30,
                                                  "timeout_s": 0.5}).json()["id"]
    job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["state"] == "failed" and job["error"].startswith("timeout: "), job
    assert "timed_out" in kinds(client, job_id)
    deadline = time.monotonic() + 60  # its render task sees the job ended and stops (a
    # task still loading its model sees it once loaded)
    while "running" in (states := [s["state"] for s in
                                   client.get(f"/v1/jobs/{job_id}").json()["segments"]]):
        assert time.monotonic() < deadline, states
        time.sleep(0.25)
    assert "done" not in states[-1:], states  # stopped before its last segment


def test_a_job_never_admitted_within_its_queue_ttl_expires(client):
    job_id = client.post("/v1/jobs", json=TINY | {"hold": True, "queue_ttl_s": 1}).json()["id"]
    job = wait_for(client, job_id, {"expired"}, timeout=30)
    assert job["error"].startswith("expired: ") and job["dispatched_at"] is None
    assert kinds(client, job_id) == ["expired"]
