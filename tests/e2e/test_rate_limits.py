"""Submission limits (issue #11.9): every job of a batch counts against the project's rate
limit and its queued cap; the rate is one atomic step in Redis, shared by API processes;
the cap is counted through an index."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from farm.jobs import keys
from tests.conftest import RUN_ID, Service, _wait_until, free_port

pytestmark = pytest.mark.e2e

# Routed, but nothing renders it here (no GPU tier): its jobs stay queued.
QUEUED = {"prompt": "a red circle", "model": "wan2.2-t2v-a14b", "frames": 5, "steps": 1}


def batch(lines: int) -> dict:
    return {"content": "".join(f'{{"prompt": "shape {i}"}}\n' for i in range(lines)),
            "defaults": QUEUED}


def limited_app(settings, key: str, **limits) -> TestClient:
    from farm.api.app import create_app

    return TestClient(create_app(settings.model_copy(update=limits)),
                      headers={"Authorization": f"Bearer {key}"})


def cancel_all(client) -> None:
    """The project's jobs leave the queue: admission must not count them later."""
    for job in client.get("/v1/jobs", params={"limit": 200}).json()["items"]:
        client.post(f"/v1/jobs/{job['id']}/cancel")


@pytest.fixture()
def api_pair(db_url, redis_db):
    """Two `farm api` processes with a rate limit of 20 a minute, on the session's Redis."""
    env = {"FARM_RATE_LIMIT_PER_MINUTE": "20"}
    ports = [free_port(), free_port()]
    services = [Service(f"api-limited-{port}", ["api", "--port", str(port)], env)
                for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for url, service in zip(urls, services):
        _wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, service.name,
                    service.log)
    yield urls
    for service in services:
        service.stop()


def test_50_concurrent_submissions_against_a_limit_of_20_let_exactly_20_through(
        api_pair, db_url):
    _, key = keys.create_key(db_url, f"burst-{RUN_ID}", "rate tests")
    auth = {"Authorization": f"Bearer {key}"}
    start = threading.Barrier(50)

    def submit(n: int) -> httpx.Response:
        with httpx.Client(base_url=api_pair[n % 2], headers=auth, timeout=60) as client:
            start.wait()
            return client.post("/v1/jobs", json=QUEUED | {"seed": n})

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(submit, range(50)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [202] * 20 + [429] * 30, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert "rate limit 20 jobs per 60 s" in refused.text and "queued cap 10000 jobs" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    with httpx.Client(base_url=api_pair[0], headers=auth) as client:
        cancel_all(client)


def test_each_job_of_a_batch_counts_against_the_rate_limit(settings, db_url, redis_db):
    _, key = keys.create_key(db_url, f"batches-{RUN_ID}", "rate tests")
    with limited_app(settings, key, rate_limit_per_minute=20) as client:
        first = client.post("/v1/batches", json=batch(15))
        assert first.status_code == 202 and first.json()["jobs"] == 15
        second = client.post("/v1/batches", json=batch(10))
        assert second.status_code == 429
        detail = second.json()["detail"]
        assert "10 job(s) refused, over the rate limit: rate limit 20 jobs per 60 s (15 used)" \
            in detail and "queued cap 10000 jobs (15 waiting or queued)" in detail
        assert all(client.post("/v1/jobs", json=QUEUED).status_code == 202 for _ in range(5))
        assert client.post("/v1/jobs", json=QUEUED).status_code == 429  # 15 + 5 used
        too_big = client.post("/v1/batches", json=batch(21)).json()["detail"]
        assert "never fits: split it" in too_big
        cancel_all(client)


def test_the_queued_cap_refuses_a_batch_that_would_pass_it(settings, db_url, redis_db):
    _, key = keys.create_key(db_url, f"capped-{RUN_ID}", "rate tests")
    with limited_app(settings, key, rate_limit_per_minute=0, max_queued_per_project=5) as client:
        assert client.post("/v1/batches", json=batch(4)).status_code == 202
        refused = client.post("/v1/batches", json=batch(2))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.json()["detail"] == (
            f"project 'capped-{RUN_ID}': 2 job(s) refused, over the queued cap: no rate limit; "
            f"queued cap 5 jobs (4 waiting or queued)")
        last = client.post("/v1/jobs", json=QUEUED)
        assert last.status_code == 202
        assert client.post("/v1/jobs", json=QUEUED).status_code == 429
        client.post(f"/v1/jobs/{last.json()['id']}/cancel")  # a job that left the queue
        assert client.post("/v1/jobs", json=QUEUED).status_code == 202
        cancel_all(client)


def test_counting_the_queue_never_reads_the_finished_history(db_url):
    """20,000 finished jobs of the project: the count goes through an index, no Seq Scan."""
    from sqlalchemy.dialects import postgresql

    from farm.db.session import get_engine
    from farm.db.tables import Job
    from farm.jobs import service as jobs
    from farm.jobs.submit import route_request
    from farm.schemas import JobCreate

    project = f"history-{RUN_ID}"
    seed = JobCreate(**(QUEUED | {"project": project}))
    first = jobs.new_job(seed, route_request(seed, {}), "sha")
    jobs.add_jobs(db_url, [first])
    columns = [c.name for c in Job.__table__.columns]
    values = [{"id": "substr(md5(jobs.id || g::text), 1, 32)", "state": "'succeeded'"}
              .get(c, f"jobs.{c}") for c in columns]
    with get_engine(db_url).begin() as conn:
        conn.execute(text(f"INSERT INTO jobs ({', '.join(columns)}) SELECT {', '.join(values)} "
                          f"FROM jobs, generate_series(1, 20000) g WHERE jobs.id = :id"),
                     {"id": first.id})
        conn.execute(text("ANALYZE jobs"))
        query = jobs.queued_count_query(project).compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {query}")))
    assert "Seq Scan" not in plan and "Index" in plan, plan
    assert jobs.count_queued(db_url, project) == 1
    jobs.cancel_job(db_url, first.id)
