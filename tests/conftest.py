"""Shared fixtures: a fresh PostgreSQL database, a Redis db, a Ray head, Celery workers and
the API, all real, started once per test session on loopback.

The FARM_* environment is set here, before any farm module reads its settings, so that the
code under test and the servers it starts agree on where everything is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

RUN_ID = uuid.uuid4().hex[:8]
TMP = Path(tempfile.mkdtemp(prefix=f"farm-tests-{RUN_ID}-"))
# A password the trust-auth server ignores: tests/e2e/test_secrets.py checks no log shows it.
DB_PASSWORD = f"pg-secret-{RUN_ID}"
PG_SERVER = os.environ.get("FARM_TEST_PG",
                           f"postgresql+psycopg://postgres:{DB_PASSWORD}@127.0.0.1:5432")
PG_DB = f"farm_test_{RUN_ID}"
REDIS_DB = int(os.environ.get("FARM_TEST_REDIS_DB", "11"))
# The suite owns this database and the next one (a broker no worker reads, for the fuzzer).
REDIS_SCRATCH_DB = (REDIS_DB + 1) % 16
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_PORT = free_port()


def _test_policy() -> dict[str, str]:
    """The shipped tiers and rules plus a second CPU tier, `cpu-b`, and a rule sending the
    project `tier-b` there (jobs of two tiers on their own queues and actors; a job of
    priority >= 90 there preempts, issue #15), and a rule rendering the project `parallel`
    tensor-parallel on two ranks."""
    import yaml

    config = Path(__file__).resolve().parent.parent / "scheduler" / "config"
    tiers = yaml.safe_load((config / "tiers.yaml").read_text())
    tiers["tiers"]["cpu-b"] = dict(tiers["tiers"]["cpu"], gpus_per_node=1,
                                   ray_resource="tier:cpu-b")
    rules = yaml.safe_load((config / "rules.yaml").read_text())
    rules["rules"].insert(0, {"name": "tier-b-project",
                              "match": {"project": ["tier-b"], "model": ["wan-tiny", "wan-toy"]},
                              "route": {"tier": "cpu-b", "preempt_at": 90}})
    rules["rules"].insert(0, {"name": "tensor-parallel-project",
                              "match": {"project": ["parallel"], "model": ["wan-tiny"]},
                              "route": {"tier": "cpu", "degree": 2, "parallel": "tp2"}})
    TMP.joinpath("tiers.yaml").write_text(yaml.safe_dump(tiers))
    TMP.joinpath("rules.yaml").write_text(yaml.safe_dump(rules))
    return {"FARM_TIERS_FILE": str(TMP / "tiers.yaml"), "FARM_RULES_FILE": str(TMP / "rules.yaml")}


os.environ.update(_test_policy())
os.environ.update({
    "FARM_HOME": str(TMP / "home"),
    "FARM_DATABASE_URL": f"{PG_SERVER}/{PG_DB}",
    "FARM_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
    "FARM_RESULT_BACKEND": f"redis://127.0.0.1:6379/{REDIS_DB}",
    "FARM_STORAGE_URL": f"file://{TMP}/storage",
    "FARM_MODELS_DIR": str(TMP / "models"),
    "FARM_WORK_DIR": str(TMP / "work"),
    "FARM_RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
    "FARM_RAY_HEAD_PORT": str(RAY_PORT),
    "FARM_RAY_TEMP_DIR": f"/tmp/rf-{RUN_ID}",
    "FARM_RAY_OBJECT_STORE_BYTES": str(256 * 1024 * 1024),
    "FARM_FLOWER_PASSWORD": f"pw-{RUN_ID}",
    "FARM_METRICS_TOKEN": f"metrics-{RUN_ID}",
    "FARM_TICK_SECONDS": "1",
    # A lost task is noticed within seconds (issue #6's fault suite), not a minute.
    "FARM_HEARTBEAT_S": "0.5",
    "FARM_LEASE_S": "4",
    # A Ray node told to stop (SIGTERM) drains first, up to 30 s by default, waiting on the
    # suite's long-lived actors: the tests' heads stop at once instead.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
})

# Before anything imports Ray: it reads these settings once, at import.
from workers.ray_cluster import quiet_ray_env  # noqa: E402

quiet_ray_env()


def _admin_execute(sql: str) -> None:
    import psycopg

    url = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def make_database(name: str) -> str:
    """Create an empty PostgreSQL database; returns its SQLAlchemy URL."""
    _admin_execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_database(name: str) -> None:
    from sqlalchemy.orm import close_all_sessions

    close_all_sessions()
    from farm.db.session import get_engine

    get_engine.cache_clear()
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings():
    from farm.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def db_url(settings) -> str:
    """The session's PostgreSQL database, migrated to head."""
    from farm.db.migrate import upgrade

    make_database(PG_DB)
    upgrade(settings.database_url)
    yield settings.database_url
    drop_database(PG_DB)


@pytest.fixture(scope="session")
def redis_db():
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_model(settings) -> Path:
    """The tiny random checkpoint, where the catalog's `wan-tiny` points."""
    from workers.tiny_model import make_tiny_checkpoint

    return make_tiny_checkpoint(settings.models_dir / "wan-tiny")


def _wait_until(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the server is not up yet
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout}s\n{tail}")


def signal_group(args: list[str]) -> bool:
    """Whether a service's SIGTERM goes to its whole process group. Not for `ray start
    --block`: it stops its own processes (about 2 s); sent to the whole group, its GCS went
    first and the head's call to drain the node waited on it."""
    return args[:2] != ["ray", "start"]


class Service:
    """A farm command running as a child process, its output in a log file. ``env``:
    settings over the session's (another stack's database or broker)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None):
        self.name, self.log = name, TMP / f"{name}.log"
        self.signal_group = signal_group(args)
        self.proc = subprocess.Popen([str(BIN / "farm"), *args], stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the whole process group: a worker that dies with no goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            if self.signal_group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM (see ``signal_group``), then SIGKILL to what is left of the group, at once
        or after 30 s."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:  # anything of the group still there (always, after a timeout)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


@pytest.fixture(scope="session")
def ray_head(settings):
    """`farm ray start --block` on its own port and temp dir; this process joins it too."""
    import ray

    from workers import ray_cluster

    # Room for the single-rank pools (wan-tiny, wan-toy, wan-toy-draft: two groups each;
    # cpu-b) and for groups of 2 and 4 ranks beside them (issue #5).
    head = Service("ray-head", ["ray", "start", "--block", "--num-cpus", "11", "--resources",
                                '{"tier:cpu": 9, "tier:cpu-b": 1}'])
    _wait_until(lambda: _ray_up(settings.ray_address), 60, "ray head", head.log)
    ray_cluster.connect(settings.ray_address)
    yield settings.ray_address
    ray.shutdown()
    head.stop()


def _ray_up(address: str) -> bool:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=1):
        return True


@pytest.fixture(scope="session")
def celery_workers(db_url, redis_db, tiny_model, ray_head):
    """A worker for each cpu tier's render queue, one for the stitch queue (and ticks)."""
    from farm.celery_app import app

    workers = [Service("worker-render", ["worker", "-Q", "render.cpu", "-c", "1",
                                         "-n", f"render-{RUN_ID}@%h"]),
               Service("worker-render-b", ["worker", "-Q", "render.cpu-b", "-c", "1",
                                           "-n", f"render-b-{RUN_ID}@%h"]),
               Service("worker-stitch", ["worker", "-Q", "stitch", "-c", "1",
                                         "-n", f"stitch-{RUN_ID}@%h"])]
    _wait_until(lambda: len(app.control.ping(timeout=1.0)) >= 3, 60, "celery workers",
                workers[0].log)
    yield workers
    for worker in workers:  # all at once: each finishes its warm shutdown in parallel
        worker.terminate()
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def celery_beat(celery_workers):
    """`farm beat`: a tick every second (FARM_TICK_SECONDS) to the stitch worker."""
    beat = Service("beat", ["beat"])
    yield beat
    beat.stop()


def _http_service(name: str, health_path: str):
    """Start `farm NAME --port P` and wait until GET health_path answers 200; yields its URL."""
    import httpx

    port = free_port()
    service = Service(name, [name, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: httpx.get(f"{url}{health_path}").status_code == 200, 60, name,
                service.log)
    yield url
    service.stop()


@pytest.fixture(scope="session")
def api_key(db_url) -> str:
    """A key of the project `default`; also in FARM_API_KEY for the CLI the tests run."""
    from farm.jobs import keys

    _, key = keys.create_key(db_url, "default", "tests")
    os.environ["FARM_API_KEY"] = key
    return key


@pytest.fixture(scope="session")
def project_client(api_url, db_url):
    """project_client(name): an HTTP client with a key of that project (made once each)."""
    from farm.jobs import keys

    made: dict[str, str] = {}

    def make(project: str):
        if project not in made:
            made[project] = keys.create_key(db_url, project, "tests")[1]
        return api_client(api_url, made[project])

    return make


def api_client(url: str, key: str | None = None):
    """An HTTP client of the API, with the session's key unless told otherwise."""
    import httpx

    key = os.environ["FARM_API_KEY"] if key is None else key
    return httpx.Client(base_url=url, timeout=30,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


@pytest.fixture(scope="session")
def api_url(celery_workers, api_key) -> str:
    yield from _http_service("api", "/healthz")


@pytest.fixture(scope="session")
def flower_url(celery_workers) -> str:
    yield from _http_service("flower", "/healthcheck")


from tests.s3_server import s3_server  # noqa: E402,F401  (a SeaweedFS, issue #13)
