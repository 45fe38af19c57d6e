"""The farm on S3 storage (issue #13, item 2): a stack of its own (API, beat, render and stitch
workers; own PostgreSQL database and Redis) storing in SeaweedFS, rendering the tiny model.
Downloads answer with a presigned URL; the CLI follows it and checks the sha256; pictures
are made from the S3 copy; DELETE empties the job's prefix in the bucket."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid

import httpx
import pytest

from farm.storage import Storage
from tests.conftest import BIN, RUN_ID, TMP, Service, _wait_until, drop_database, free_port, \
    make_database
from tests.faults.servers import ThrowawayRedis

pytestmark = pytest.mark.e2e
BUCKET = "farm-e2e"
TINY = {"prompt": "a red circle", "model": "wan-tiny", "width": 64, "height": 64, "frames": 5,
        "steps": 2}


@pytest.fixture(scope="module")
def s3_stack(ray_head, tiny_model, s3_server):
    from farm.celery_app import make_celery
    from farm.db.migrate import upgrade
    from farm.jobs import keys
    from farm.settings import get_settings

    s3_server.make_bucket(BUCKET)
    name, redis = f"farm_s3_{RUN_ID}", ThrowawayRedis()
    db = make_database(name)
    upgrade(db)
    env = {**s3_server.env(BUCKET, "farm"), "FARM_DATABASE_URL": db,
           "FARM_BROKER_URL": redis.url, "FARM_RESULT_BACKEND": redis.url,
           "FARM_HOME": str(TMP / "s3-home"), "FARM_WORK_DIR": str(TMP / "s3-work")}
    port = free_port()
    hosts = [f"s3-render@{RUN_ID}", f"s3-stitch@{RUN_ID}"]
    services = [Service("s3-api", ["api", "--port", str(port)], env),
                Service("s3-beat", ["beat"], env),
                Service("s3-render", ["worker", "-Q", "render.cpu", "-c", "1", "-n", hosts[0]],
                        env),
                Service("s3-stitch", ["worker", "-Q", "stitch", "-c", "1", "-n", hosts[1]], env)]
    url = f"http://127.0.0.1:{port}"
    celery = make_celery(get_settings().model_copy(update={"broker_url": redis.url,
                                                           "result_backend": redis.url}))
    try:
        _wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "s3 api",
                    services[0].log)
        _wait_until(lambda: len(celery.control.ping(destination=hosts, timeout=1.0)) == 2, 60,
                    "s3 workers", services[2].log)
        key = keys.create_key(db, "default", "s3 tests")[1]
        storage = Storage(f"s3://{BUCKET}/farm", s3_server.options())
        yield {"url": url, "key": key, "db": db, "storage": storage, "env": env}
    finally:
        for service in services:
            service.terminate()
        for service in services:
            service.stop()
        redis.destroy()
        drop_database(name)


def test_a_render_on_s3_downloads_through_a_presigned_url(s3_stack, tmp_path):
    from farm.jobs import service as jobs
    from tests.e2e.test_render_flow import wait_for

    storage = s3_stack["storage"]
    with httpx.Client(base_url=s3_stack["url"], timeout=30,
                      headers={"Authorization": f"Bearer {s3_stack['key']}"}) as http:
        job = wait_for(http, http.post("/v1/jobs", json=TINY).json()["id"],
                       {"succeeded", "failed"}, timeout=120)
        assert job["state"] == "succeeded", job["error"]
        record = jobs.get_job(s3_stack["db"], job["id"])
        # The fault suite's storage checks, on S3: every file named is there, the video's
        # sha256 is the recorded one, no half-written upload is left.
        assert all(storage.exists(k) for s in record.segments for k in s.chunk_keys)
        assert storage.sha256(record.output_key) == record.output_sha256
        assert not [k for k in storage.list_keys(f"jobs/{job['id']}") if ".part-" in k]

        moved = http.get(f"/v1/jobs/{job['id']}/video")
        assert moved.status_code == 307 and moved.headers["x-content-sha256"] == job[
            "output_sha256"]
        assert moved.headers["location"].startswith(s3_server_url(s3_stack))
        video = httpx.get(moved.headers["location"]).content  # no API key: the URL is signed
        assert hashlib.sha256(video).hexdigest() == job["output_sha256"]
        plain = http.get(f"/v1/jobs/{job['id']}/video", params={"redirect": "false"}).json()
        assert plain["sha256"] == job["output_sha256"] and plain["expires_at"]
        assert httpx.get(plain["url"]).content == video

        thumb = http.get(f"/v1/jobs/{job['id']}/thumbnail.jpg")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

        out = tmp_path / "v.mp4"
        cli = farm_cli(s3_stack, "download", job["id"], "-o", str(out))
        assert cli.returncode == 0, cli.stderr
        assert out.read_bytes() == video

        cli = farm_cli(s3_stack, "delete", job["id"])
        assert cli.returncode == 0 and cli.stdout.strip().endswith("deleted"), cli.stderr
        gone = http.get(f"/v1/jobs/{job['id']}").json()
        assert gone["state"] == "deleted" and gone["deleted_at"] and gone["output_url"] is None
        # Deleting drops the job's result-cache entries too: nothing of it is left.
        assert cache_keys(s3_stack["db"], job["id"]) == []
        assert storage.list_keys(f"jobs/{job['id']}") == []
        assert http.get(f"/v1/jobs/{job['id']}/video").status_code == 409
        live = http.post("/v1/jobs", json=TINY | {"seed": uuid.uuid4().int % 1000, "hold": True})
        refused = http.delete(f"/v1/jobs/{live.json()['id']}")
        assert refused.status_code == 409 and "cancel it before deleting" in refused.text


def farm_cli(stack: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack["env"], "FARM_API_URL": stack["url"],
           "FARM_API_KEY": stack["key"]}
    return subprocess.run([str(BIN / "farm"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def cache_keys(db: str, job_id: str) -> list[str]:
    from sqlalchemy import select

    from farm.db.session import session_scope
    from farm.db.tables import CacheEntry

    with session_scope(db) as session:
        return sorted(k for e in session.scalars(select(CacheEntry).where(
            CacheEntry.job_id == job_id)) for k in e.keys)


def s3_server_url(stack) -> str:
    return stack["env"]["FARM_S3_ENDPOINT_URL"]
