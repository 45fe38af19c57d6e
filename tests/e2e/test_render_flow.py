"""The spine end to end: API -> PostgreSQL -> Celery (Redis) -> Ray actor -> ffmpeg -> MP4.

Everything here is real: a PostgreSQL database, a Redis broker, two Celery worker
processes, a Ray head, uvicorn serving the API and ffmpeg.
"""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from tests.conftest import api_client
from workers.group import actor_name
from workers.video import probe

pytestmark = pytest.mark.e2e


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")


@pytest.fixture
def client(api_url):
    with api_client(api_url) as c:
        yield c


def test_submit_wait_download_probe(client, tmp_path, settings):
    # 33 frames with the tiny model (max 17 a segment) -> two segments: 17 + 16 kept frames.
    resp = client.post("/v1/jobs", json={"prompt": "a red circle moving left", "frames": 33,
                                         "seed": 3, "steps": 6, "model": "wan-tiny"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.json()["state"] == "queued"

    job = wait_for(client, job_id, {"succeeded", "failed", "canceled"})
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == 1.0
    assert {k: job["route"][k] for k in ("variant", "tier", "degree", "queue", "rule")} == \
        {"variant": "wan-tiny", "tier": "cpu", "degree": 1, "queue": "render.cpu",
         "rule": "toy-models-on-cpu"}
    assert len(job["rules_sha256"]) == 64 and job["dispatched_at"] is not None
    assert [s["state"] for s in job["segments"]] == ["done", "done"]
    assert job["run_seconds"] > 0 and job["queued_seconds"] >= 0

    video = tmp_path / "out.mp4"
    with client.stream("GET", job["output_url"]) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "video/mp4"
        video.write_bytes(resp.read())
    info = probe(video)
    assert (info.width, info.height, info.frames, info.codec, info.pix_fmt) == \
        (1280, 720, 33, "h264", "yuv420p")
    import hashlib
    assert hashlib.sha256(video.read_bytes()).hexdigest() == job["output_sha256"]


def test_actor_is_long_lived_and_reused(client, ray_head):
    first = wait_for(client, client.post("/v1/jobs", json={"prompt": "a blue square", "model": "wan-tiny",
                                                           "frames": 9, "steps": 2}).json()["id"],
                     {"succeeded", "failed"})
    actor = ray.get_actor(actor_name("wan-tiny", "cpu", 0), namespace="farm")
    before = ray.get(actor.info.remote())
    second = wait_for(client, client.post("/v1/jobs", json={"prompt": "a green triangle", "model": "wan-tiny",
                                                            "frames": 9, "steps": 2}).json()["id"],
                      {"succeeded", "failed"})
    after = ray.get(actor.info.remote())
    assert first["state"] == second["state"] == "succeeded"
    assert after["pid"] == before["pid"]  # the same process, the model loaded once
    assert after["renders"] == before["renders"] + 1


def test_cancel_running_job(client, settings, flower_url):
    from celery.result import AsyncResult

    from farm.celery_app import app
    from farm.storage import Storage

    # 81 frames = 5 segments; many steps so the first segment is still rendering when canceled.
    job_id = client.post("/v1/jobs", json={"prompt": "a slow purple ball", "frames": 81,
                                           "steps": 200, "model": "wan-tiny"}).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["segments"][0]["progress"] > 0.05:
            break
        time.sleep(0.1)
    assert job["state"] == "running", job

    # Progress is a custom task state, readable from the result backend and from Flower.
    task_id = job["segments"][0]["celery_id"]
    result = AsyncResult(task_id, app=app)
    assert result.state == "RENDERING"
    assert result.info["job_id"] == job_id and 0 < result.info["step"] <= 200
    flower = httpx.get(f"{flower_url}/api/task/result/{task_id}",
                       auth=("admin", settings.flower_password.get_secret_value()))
    assert flower.status_code == 200 and flower.json()["state"] == "RENDERING"

    # The render's pace, from the progress it writes (every 0.25 s at most).
    first, started = job["segments"][0]["progress"], time.monotonic()
    time.sleep(0.3)
    pace = (client.get(f"/v1/jobs/{job_id}").json()["segments"][0]["progress"] - first) / \
        (time.monotonic() - started)  # of the segment per second
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "canceled"
    at_cancel = resp.json()["segments"][0]["progress"]

    # The running segment stops (fails, saying the job was canceled) and nothing is stitched.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["segments"][0]["state"] == "failed":
            break
        time.sleep(0.2)
    assert job["state"] == "canceled"
    assert job["segments"][0]["state"] == "failed"
    assert job["segments"][0]["error"] == "job ended while rendering: canceled"
    # It stopped within a second of rendering (the cancel is seen at the next progress
    # write, at most 0.25 s on; the recorded progress may lag as much), before its 200
    # steps were done.
    stopped_at = job["segments"][0]["progress"]
    assert at_cancel <= stopped_at <= at_cancel + pace * 1.0 + 2 / 200 and stopped_at < 1
    assert all(s["state"] in ("pending", "failed") for s in job["segments"][1:])
    assert job["output_url"] is None
    assert client.get(f"/v1/jobs/{job_id}/video").status_code == 409
    stored = Storage(settings.storage_url).local_path(f"jobs/{job_id}")
    assert not list(stored.glob("video*.mp4"))
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409


@pytest.mark.parametrize("field,value,words", [
    ("frames", 10, "4k+1"),
    ("width", 1000, "multiple of 16"),
    ("height", 721, "multiple of 16"),
    ("model", "wan9-imaginary", "unknown model"),
    ("prompt", "x" * 2001, "at most 2000"),
    ("prompt", "", "at least 1"),
    ("steps", 0, "greater than or equal to 1"),
])
def test_bad_input_gets_422_naming_field(client, field, value, words):
    body = {"prompt": "a red circle", field: value}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert [e["field"] for e in errors] == [field]
    assert words in errors[0]["message"]
    assert errors[0]["value"] == value
    assert field in errors[0]["message"]


def test_healthz_checks_database_and_broker(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"database": "ok", "broker": "ok"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/video", "/healthz"} <= set(paths)


def test_healthz_says_503_when_database_or_broker_is_down(settings):
    from fastapi.testclient import TestClient

    from farm.api.app import create_app

    no_broker = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    resp = TestClient(create_app(no_broker)).get("/healthz")
    assert resp.status_code == 503
    assert resp.json()["detail"]["database"] == "ok"
    assert resp.json()["detail"]["broker"].startswith("error")
    no_db = settings.model_copy(update={
        "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    resp = TestClient(create_app(no_db)).get("/healthz")
    assert resp.status_code == 503 and resp.json()["detail"]["database"].startswith("error")


def test_list_filters_by_state_and_paginates(client):
    done = client.post("/v1/jobs", json={"prompt": "a red square", "frames": 5, "steps": 1,
                                         "model": "wan-tiny"})
    wait_for(client, done.json()["id"], {"succeeded"})
    canceled = client.post("/v1/jobs", json={"prompt": "a red square", "model": "wan2.2-t2v-a14b",
                                             "frames": 5})  # no a100 worker: it stays queued
    client.post(f"/v1/jobs/{canceled.json()['id']}/cancel")
    everything = client.get("/v1/jobs", params={"limit": 200}).json()
    succeeded = client.get("/v1/jobs", params={"state": "succeeded", "limit": 200}).json()
    assert done.json()["id"] in [j["id"] for j in succeeded["items"]]
    assert all(j["state"] == "succeeded" for j in succeeded["items"])
    assert canceled.json()["id"] not in [j["id"] for j in succeeded["items"]]
    assert succeeded["total"] < everything["total"]
    page = client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert len(page["items"]) == 1 and page["items"][0]["id"] == everything["items"][1]["id"]
    assert client.get("/v1/jobs", params={"state": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs/0123456789abcdef").status_code == 404
