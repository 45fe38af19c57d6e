"""A result-cache hit against a plain health check, on the warm API (issue #13, item 1).

    .venv/bin/python benchmarks/cache.py                    # 100 clients, 2000 requests of each kind
    .venv/bin/python benchmarks/cache.py --clients 16 --requests 1000 --workers 2

One process run: a throwaway PostgreSQL database on 127.0.0.1:5432, Redis (database 13,
flushed) as the broker, and `farm api` on loopback. A job of the tiny model is stored as
succeeded with its video and remembered by the cache, as the stitcher leaves it; then
``--clients`` concurrent clients send, in turn:

1. ``GET /healthz`` (a database round trip and a broker connection: the baseline);
2. ``POST /v1/jobs`` with the stored job's request: each answer must be a 202 whose body
   says ``succeeded`` (a new job row, answered from the cache, no Celery task).

It prints p50/p95/p99 and requests per second of both; the target is p99 <= 20 ms for the
hit. The last line is p99(hit) / p99(healthz).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TMP = Path(tempfile.mkdtemp(prefix="farm-cache-bench-"))
RUN = uuid.uuid4().hex[:8]
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
DB_NAME = f"farm_cache_bench_{RUN}"
REQUEST = {"prompt": "a cached red circle", "model": "wan-tiny", "frames": 5, "width": 64,
           "height": 64, "steps": 2, "seed": 11}


def set_env(port: int) -> None:
    os.environ.update({
        "FARM_HOME": str(TMP / "home"), "FARM_DATABASE_URL": f"{PG_SERVER}/{DB_NAME}",
        "FARM_BROKER_URL": "redis://127.0.0.1:6379/13",
        "FARM_RESULT_BACKEND": "redis://127.0.0.1:6379/13",
        "FARM_STORAGE_URL": f"file://{TMP}/storage", "FARM_MODELS_DIR": str(TMP / "models"),
        "FARM_RATE_LIMIT_PER_MINUTE": "0", "FARM_MAX_QUEUED_PER_PROJECT": "0",
        "FARM_API_PORT": str(port),
    })


def seed_cache() -> str:
    """A succeeded job of REQUEST with a stored video, remembered by the cache; returns a key."""
    from farm.db.migrate import upgrade
    from farm.jobs import keys, result_cache, service as jobs
    from farm.jobs.submit import route_request
    from farm.schemas import JobCreate
    from farm.settings import get_settings
    from farm.storage import Storage
    from workers.tiny_model import make_tiny_checkpoint

    settings = get_settings()
    make_tiny_checkpoint(settings.models_dir / "wan-tiny")
    upgrade(settings.database_url)
    request = JobCreate(**REQUEST)
    job = jobs.new_job(request, route_request(request, {}), "bench")
    job.cache_key = result_cache.job_keys(settings, job)[0]
    video = TMP / "video.mp4"
    video.write_bytes(os.urandom(200_000))
    key = f"jobs/{job.id}/video.mp4"
    sha, size = Storage(settings.storage_url).put_file(video, key)
    job.state, job.output_key, job.output_sha256, job.output_bytes = "succeeded", key, sha, size
    for seg in job.segments:
        seg.state, seg.progress = "done", 1.0
    jobs.add_jobs(settings.database_url, [job])
    assert result_cache.remember(settings, job.id) == 1
    return keys.create_key(settings.database_url, "default", "bench")[1]


async def hammer(url: str, key: str, method: str, path: str, clients: int, total: int,
                 check) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    left = iter(range(total))

    async def client_loop(http: httpx.AsyncClient) -> None:
        for _ in left:
            started = time.perf_counter()
            resp = await http.request(method, path, json=REQUEST if method == "POST" else None)
            latencies.append(time.perf_counter() - started)
            check(resp)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        return latencies, time.perf_counter() - began


def summary(name: str, latencies: list[float], wall: float) -> float:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    print(f"{name:<16} {len(ordered):>6} {len(ordered) / wall:>9.0f} {pick(0.5):>9.1f} "
          f"{pick(0.95):>9.1f} {pick(0.99):>9.1f}")
    return pick(0.99)


def hit_answer(resp) -> None:
    if resp.status_code != 202 or resp.json()["state"] != "succeeded":
        raise AssertionError(f"not a cache hit: {resp.status_code} {resp.text[:300]}")


def healthy(resp) -> None:
    if resp.status_code != 200:
        raise AssertionError(f"healthz: {resp.status_code} {resp.text[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1, help="API worker processes")
    args = parser.parse_args()

    from tests.conftest import free_port, make_database, drop_database

    port = free_port()
    set_env(port)
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=13).flushdb()
    make_database(DB_NAME)
    api = None
    try:
        key = seed_cache()
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "farm.api.app:create_app",
                                "--factory", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(args.workers), "--log-level", "warning",
                                "--timeout-keep-alive", "120"],
                               cwd=ROOT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait_up(url)
        warm = min(200, args.requests)
        asyncio.run(hammer(url, key, "GET", "/healthz", 10, warm, healthy))
        asyncio.run(hammer(url, key, "POST", "/v1/jobs", 10, warm, hit_answer))
        print(f"{args.clients} clients, {args.requests} requests of each kind, {args.workers} API "
              f"worker(s), PostgreSQL + Redis on loopback, {os.cpu_count()} cores")
        print(f"{'request':<16} {'n':>6} {'per s':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")
        base = summary("GET /healthz", *asyncio.run(
            hammer(url, key, "GET", "/healthz", args.clients, args.requests, healthy)))
        hit = summary("cache hit", *asyncio.run(
            hammer(url, key, "POST", "/v1/jobs", args.clients, args.requests, hit_answer)))
        print(f"target: cache hit p99 <= 20 ms: {'met' if hit <= 20 else 'missed'}")
        print(f"p99 cache hit / p99 healthz: {hit / base:.2f}")
    finally:
        if api is not None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
        from farm.db.session import get_engine

        get_engine.cache_clear()
        drop_database(DB_NAME)


def _wait_up(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API at {url} did not come up")


if __name__ == "__main__":
    main()
