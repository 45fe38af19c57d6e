"""The farm's own bookkeeping at fleet scale (issue #14, item 5).

    .venv/bin/python benchmarks/bookkeeping.py
    .venv/bin/python benchmarks/bookkeeping.py --jobs 100000 --waiting 10000 --clients 16 \\
        --requests 2000 --workers 2

One process run: a throwaway PostgreSQL database on 127.0.0.1:5432, Redis database 13
(flushed) as the broker, `farm api` (uvicorn, ``--workers``) on loopback. Measured twice,
on empty tables and then with ``--jobs`` rows in ``jobs`` of which ``--waiting`` wait for
admission (three tiers, twenty projects, priorities 0..100; a few dozen on the GPUs with
fresh heartbeats, 4 sent an hour ago whose heartbeats stopped, the rest finished):

1. one full admission pass (every tier, farm.jobs.admit.release) and one reconciler tick
   (farm.tasks.reconcile.reconcile), each with an enqueue that records (the first run of
   each; then the median of five more, once the first has sent what it could);
2. ``GET /healthz`` from ``--clients`` clients (a database round trip: this machine's
   floor for any request), then ``--clients`` concurrent clients POSTing tiny jobs of the full model, which route to
   the a100 tier (nobody serves its queue: after the first few are admitted they wait).

Targets: pass and tick under 200 ms at scale; >= 200 submissions/s, and the rate at
``--waiting`` waiting >= 0.8x the rate at none. The ratios are printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cache import _wait_up, hammer, healthy, summary  # noqa: E402  (benchmarks/cache.py)

TMP = Path(tempfile.mkdtemp(prefix="farm-bookkeeping-bench-"))
RUN = uuid.uuid4().hex[:8]
DB_NAME = f"farm_bookkeeping_bench_{RUN}"
SUBMITTED = {"prompt": "a queued red circle", "model": "wan2.2-t2v-a14b", "frames": 5,
             "width": 64, "height": 64, "steps": 2, "cache": False}
TEMPLATES = ({"prompt": "draft", "track": "draft", "frames": 33},  # a10
             {"prompt": "final", "model": "wan2.2-t2v-a14b", "frames": 81},  # a100
             {"prompt": "toy", "model": "wan-tiny", "frames": 5, "width": 64, "height": 64})


def set_env(port: int, db_url: str) -> None:
    """The farm's settings for this run; the shipped policy (not the tests' own)."""
    for name in ("FARM_TIERS_FILE", "FARM_RULES_FILE"):
        os.environ.pop(name, None)
    os.environ.update({
        "FARM_HOME": str(TMP / "home"), "FARM_DATABASE_URL": db_url,
        "FARM_BROKER_URL": "redis://127.0.0.1:6379/13",
        "FARM_RESULT_BACKEND": "redis://127.0.0.1:6379/13",
        "FARM_STORAGE_URL": f"file://{TMP}/storage", "FARM_MODELS_DIR": str(TMP / "models"),
        "FARM_RATE_LIMIT_PER_MINUTE": "0", "FARM_MAX_QUEUED_PER_PROJECT": "0",
        "FARM_API_PORT": str(port), "FARM_LEASE_S": "60",
    })


def _job_values(total: int, waiting: int) -> str:
    """An INSERT ... SELECT of ``total`` jobs cloned from a template row: g <= waiting wait
    (not sent), then 30 run with fresh heartbeats, 4 (a node's) lost theirs an hour ago,
    the rest ended."""
    from farm.db.tables import Job

    run, lost = waiting + 30, waiting + 34
    state = (f"CASE WHEN g <= {run} THEN (CASE WHEN g <= {waiting} THEN 'queued' ELSE 'running' "
             f"END) WHEN g <= {lost} THEN 'running' WHEN g % 10 = 0 THEN 'failed' "
             f"WHEN g % 10 = 1 THEN 'canceled' ELSE 'succeeded' END")
    sent = (f"CASE WHEN g <= {waiting} THEN NULL WHEN g <= {run} THEN now() - interval '2 min' "
            f"ELSE now() - interval '1 hour' END")
    special = {
        "id": "md5(g::text || 'bench')", "state": state, "priority": "(g * 37) % 101",
        "project": "'p' || (g % 20)", "dispatched_at": sent,
        "created_at": f"now() - ({total} - g) * interval '1 second' - interval '2 hour'",
        "finished_at": f"CASE WHEN g > {lost} THEN now() - interval '30 min' END",
        "updated_at": "now() - interval '1 hour'", "tier": "t.tier", "route": "t.route"}
    columns = [c.name for c in Job.__table__.columns]
    values = [special.get(c, f"t.{c}") for c in columns]
    return (f"INSERT INTO jobs ({', '.join(columns)}) SELECT {', '.join(values)} FROM "
            f"generate_series(1, {total}) g JOIN jobs t ON t.id = "
            f"(ARRAY[{', '.join(':t' + str(i) for i in range(3))}])[1 + g % 3]")


SEGMENTS = """INSERT INTO segments (job_id, "index", state, frame_start, render_frames,
  skip_frames, seed, progress, attempts, chunk_keys, worker, heartbeat_at)
SELECT j.id, 0, CASE WHEN j.state = 'queued' THEN 'pending' WHEN j.state = 'running'
  THEN 'running' ELSE 'done' END, 0, 5, 0, 1,
  CASE WHEN j.state IN ('queued', 'running') THEN 0.3 ELSE 1.0 END, 1, '[]', 'w-bench',
  CASE WHEN j.state = 'running' AND j.dispatched_at > now() - interval '10 min' THEN now()
       WHEN j.state = 'running' THEN now() - interval '1 hour' END
FROM jobs j WHERE j.id NOT IN (:t0, :t1, :t2)"""


def fill(db_url: str, total: int, waiting: int) -> None:
    """``total`` job rows (one segment each); ``waiting`` of them not yet sent."""
    from sqlalchemy import text

    from farm.db.session import get_engine
    from farm.jobs import service as jobs
    from farm.jobs.submit import route_request
    from farm.schemas import JobCreate

    templates = []
    for fields in TEMPLATES:
        request = JobCreate(**fields)
        job = jobs.new_job(request, route_request(request, {}), "bench")
        job.state = "canceled"
        templates.append(job)
    jobs.add_jobs(db_url, templates)
    ids = {f"t{i}": job.id for i, job in enumerate(templates)}
    with get_engine(db_url).begin() as conn:
        conn.execute(text(_job_values(total - 3, waiting)), ids)
        conn.execute(text(SEGMENTS), ids)
    with get_engine(db_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE segments"))


def empty(db_url: str) -> None:
    from sqlalchemy import text

    from farm.db.session import get_engine

    with get_engine(db_url).begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))


def timed(run) -> tuple[float, float]:
    """(ms of the first run, median ms of five more)."""
    began = time.perf_counter()
    run()
    first = (time.perf_counter() - began) * 1000
    again = []
    for _ in range(5):
        began = time.perf_counter()
        run()
        again.append((time.perf_counter() - began) * 1000)
    return first, statistics.median(again)


def bookkeeping(settings) -> dict[str, tuple[float, float]]:
    from farm.jobs import admit
    from farm.jobs.admit_queries import queue_loads_now
    from farm.tasks import reconcile

    sent: list[str] = []
    record = lambda job: sent.append(job.id)  # noqa: E731
    return {"admission pass": timed(lambda: admit.release(settings, record)),
            "reconciler tick": timed(lambda: reconcile.reconcile(settings, record)),
            "routing loads": timed(lambda: queue_loads_now(settings.database_url))}


def accepted(resp) -> None:
    if resp.status_code != 202 or resp.json()["state"] != "queued":
        raise AssertionError(f"not accepted: {resp.status_code} {resp.text[:300]}")


def submissions(url: str, key: str, clients: int, total: int) -> tuple[list[float], float]:
    import cache

    cache.REQUEST = SUBMITTED  # hammer() posts cache.REQUEST
    return asyncio.run(hammer(url, key, "POST", "/v1/jobs", clients, total, accepted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="API worker processes")
    args = parser.parse_args()

    from tests.conftest import drop_database, free_port, make_database

    port = free_port()
    set_env(port, make_database(DB_NAME))
    import redis

    from farm.db.migrate import upgrade
    from farm.jobs import keys
    from farm.settings import get_settings

    redis.Redis(host="127.0.0.1", port=6379, db=13).flushdb()
    api = None
    try:
        settings = get_settings()
        upgrade(settings.database_url)
        key = keys.create_key(settings.database_url, "default", "bench")[1]
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "farm.api.app:create_app",
                                "--factory", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(args.workers), "--log-level", "warning"],
                               cwd=ROOT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait_up(url)
        bookkeeping(settings)  # imports, connections, the policy: not what is measured
        small = bookkeeping(settings)
        submissions(url, key, 4, 100)  # warm the API's processes
        empty(settings.database_url)
        health = asyncio.run(hammer(url, key, "GET", "/healthz", args.clients, args.requests,
                                    healthy))
        rate0 = submissions(url, key, args.clients, args.requests)
        empty(settings.database_url)
        began = time.perf_counter()
        fill(settings.database_url, args.jobs, args.waiting)
        print(f"filled {args.jobs} jobs ({args.waiting} waiting) in "
              f"{time.perf_counter() - began:.1f} s")
        large = bookkeeping(settings)
        rate_n = submissions(url, key, args.clients, args.requests)
        report(args, small, large, health, rate0, rate_n)
    finally:
        if api is not None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
        drop_database(DB_NAME)


def report(args, small, large, health, rate0, rate_n) -> None:
    print(f"\n{args.jobs} jobs, {args.waiting} waiting; {args.clients} clients, "
          f"{args.requests} submissions each way, {args.workers} API worker(s), "
          f"{os.cpu_count()} cores")
    print(f"{'step (ms)':<18} {'empty 1st':>10} {'empty med':>10} {'full 1st':>10} "
          f"{'full med':>10}")
    for name in small:
        print(f"{name:<18} {small[name][0]:>10.1f} {small[name][1]:>10.1f} "
              f"{large[name][0]:>10.1f} {large[name][1]:>10.1f}")
    print(f"\n{'submissions':<16} {'n':>6} {'per s':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")
    summary("GET /healthz", *health)  # the API's floor on this machine, for scale
    summary("0 waiting", *rate0)
    summary(f"{args.waiting} waiting", *rate_n)
    per_s0, per_sn = len(rate0[0]) / rate0[1], len(rate_n[0]) / rate_n[1]
    worst = max(max(large["admission pass"]), max(large["reconciler tick"]))
    print(f"\ntargets: pass and tick < 200 ms at scale: {'met' if worst < 200 else 'missed'}; "
          f">= 200 submissions/s: {'met' if min(per_s0, per_sn) >= 200 else 'missed'}; "
          f"rate ratio >= 0.8: {'met' if per_sn >= 0.8 * per_s0 else 'missed'}")
    for name in ("admission pass", "reconciler tick"):
        print(f"{name} full / empty (first run): {large[name][0] / max(small[name][0], 0.01):.1f}x")
    print(f"submissions/s at {args.waiting} waiting / at 0: {per_sn / per_s0:.2f}")


if __name__ == "__main__":
    main()
