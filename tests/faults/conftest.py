"""The fault suite's own farm (issue #6): a throwaway PostgreSQL and Redis, the API, beat,
a stitch worker and render workers, all real and all on loopback. Tests kill and restart
parts of it; the session's shared servers are never touched. The session's Ray head is
shared: its actors are what a killed actor test kills.

Every trial is recorded in TRIALS; the table is printed at the end of the test run.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import TMP, Service, _wait_until, free_port
from tests.faults.servers import ThrowawayPostgres, ThrowawayRedis

FINAL = {"succeeded", "failed", "canceled"}
# One request for every trial: a fault must never change what is rendered. Rendered every
# time: a repeat would otherwise be answered by the result cache, with no fault to survive.
REQUEST = {"prompt": "a red circle crossing a storm", "frames": 33, "steps": 60, "seed": 7,
           "model": "wan-tiny", "cache": False}


@dataclass
class Trial:
    fault: str
    job_id: str
    expected: str  # the state the job must end in
    state: str = ""
    resends: int = 0
    failures: int = 0
    seconds: float = 0.0
    same_video: bool | None = None  # the video is byte-identical to the fault-free one
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == self.expected and self.same_video is not False


TRIALS: list[Trial] = []


class FaultStack:
    def __init__(self, pg: ThrowawayPostgres, redis: ThrowawayRedis, env: dict[str, str]):
        self.pg, self.redis, self.env = pg, redis, env
        self.services: dict[str, Service] = {}
        self.keys: dict[str, str] = {}
        self.api_url = ""
        self.reference_sha256: str | None = None

    # ---- services -----------------------------------------------------------------------
    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(f"fault-{name}", args, {**self.env, **(env or {})})
        self.services[name] = service
        return service

    def worker(self, name: str, queue: str, env: dict[str, str] | None = None,
               wait: bool = True) -> str:
        """Start a Celery worker on ``queue``; returns its name (once it answers a ping,
        unless ``wait`` is False)."""
        hostname = f"fault-{name}@{TMP.name}"
        self.start(name, ["worker", "-Q", queue, "-c", "1", "-n", hostname], env)
        if wait:
            self.wait_for_workers([hostname])
        return hostname

    def stop(self, *names: str) -> None:
        """SIGTERM to all at once, then wait: each takes seconds to shut down."""
        services = [self.services.pop(name) for name in names]
        for service in services:
            service.terminate()
        for service in services:
            service.stop()

    def wait_for_workers(self, hostnames: list[str], timeout: float = 60) -> None:
        app = self.celery()
        _wait_until(lambda: len(app.control.ping(destination=hostnames, timeout=1.0))
                    == len(hostnames), timeout, f"workers {hostnames}")

    def celery(self):
        from farm.celery_app import make_celery
        from farm.settings import get_settings

        return make_celery(get_settings().model_copy(update={
            "broker_url": self.redis.url, "result_backend": self.redis.url}))

    def service_named(self, hostname: str) -> tuple[str, Service]:
        return next((n, s) for n, s in self.services.items()
                    if hostname.startswith(f"fault-{n}@"))

    # ---- the API ------------------------------------------------------------------------
    def client(self, project: str = "default") -> httpx.Client:
        from farm.jobs import keys

        if project not in self.keys:
            self.keys[project] = keys.create_key(self.pg.url, project, "faults")[1]
        return httpx.Client(base_url=self.api_url, timeout=30,
                            headers={"Authorization": f"Bearer {self.keys[project]}"})

    def submit(self, project: str = "default", **overrides) -> str:
        with self.client(project) as http:
            resp = http.post("/v1/jobs", json={**REQUEST, "project": project, **overrides})
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def job(self, job_id: str, project: str = "default") -> dict:
        with self.client(project) as http:
            resp = http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_rendering(self, job_id: str, project: str = "default", progress: float = 0.1,
                       timeout: float = 120) -> dict:
        """The job once a segment has passed ``progress``: the moment to strike."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id, project)
            if any(s["state"] == "running" and s["progress"] >= progress for s in job["segments"]):
                return job
            assert job["state"] not in FINAL, job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never rendered: {job}")

    def wait_final(self, job_id: str, project: str = "default", timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id, project)
            if job["state"] in FINAL:
                return job
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} did not end in {timeout}s: {job}")

    def events(self, job_id: str, project: str = "default") -> list[dict]:
        with self.client(project) as http:
            return http.get(f"/v1/jobs/{job_id}/events").json()

    def video_sha256(self, job: dict, project: str = "default") -> str:
        with self.client(project) as http, http.stream("GET", job["output_url"]) as resp:
            assert resp.status_code == 200
            digest = hashlib.sha256()
            for block in resp.iter_bytes():
                digest.update(block)
        return digest.hexdigest()

    # ---- a trial ------------------------------------------------------------------------
    def finish_trial(self, fault: str, job_id: str, started: float, expected: str = "succeeded",
                     project: str = "default") -> Trial:
        """Wait for the job's end; check it against the fault-free render; record it."""
        job = self.wait_final(job_id, project)
        evs = self.events(job_id, project)
        trial = Trial(fault, job_id, expected, job["state"], job["resends"],
                      sum(e["kind"] in ("segment_failed", "segment_lost") for e in evs),
                      time.monotonic() - started)
        if job["state"] == "succeeded" and job["frames"] == REQUEST["frames"]:
            trial.same_video = self.video_sha256(job, project) == self.reference_sha256
        if job["state"] != expected:
            trial.notes.append(job.get("error") or "")
        TRIALS.append(trial)
        return trial


@pytest.fixture(scope="package")
def fault_stack(ray_head, tiny_model):
    """Start the fault farm; render the reference video with no fault."""
    from farm.db.migrate import upgrade

    pg, redis = ThrowawayPostgres(), ThrowawayRedis()
    upgrade(pg.url)
    broken = TMP / "broken-scratch"
    broken.write_text("a file where a folder should be")
    env = {"FARM_DATABASE_URL": pg.url, "FARM_BROKER_URL": redis.url,
           "FARM_RESULT_BACKEND": redis.url, "FARM_STORAGE_URL": f"file://{TMP}/fault-storage",
           "FARM_WORK_DIR": str(TMP / "fault-work"), "FARM_RETRY_COUNTDOWN_S": "0.5",
           "FARM_HOME": str(TMP / "fault-home")}
    stack = FaultStack(pg, redis, env)
    stack.broken_scratch = {"FARM_WORK_DIR": str(broken / "work")}
    port = free_port()
    stack.start("api", ["api", "--port", str(port)])
    stack.api_url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: httpx.get(f"{stack.api_url}/healthz").status_code == 200, 60, "fault api")
    stack.start("beat", ["beat"])
    stack.wait_for_workers([stack.worker("stitch", "stitch", wait=False),
                            stack.worker("r1", "render.cpu", wait=False),
                            stack.worker("r2", "render.cpu", wait=False)])
    reference = stack.wait_final(stack.submit())
    assert reference["state"] == "succeeded", reference
    stack.reference_sha256 = stack.video_sha256(reference)
    yield stack
    stack.stop(*stack.services)
    pg.destroy()
    redis.destroy()


def pytest_terminal_summary(terminalreporter):
    if not TRIALS:
        return
    lines = fault_table(TRIALS)
    terminalreporter.section("fault suite (issue #6)")
    for line in lines:
        terminalreporter.write_line(line)
    Path(TMP / "fault-table.md").write_text("\n".join(lines) + "\n")


def fault_table(trials: list[Trial]) -> list[str]:
    faults = list(dict.fromkeys(t.fault for t in trials))
    lines = ["| fault | trials | expected | as expected | same video | re-sent | failures "
             "recorded | mean s |", "|---|---|---|---|---|---|---|---|"]
    for fault in faults:
        rows = [t for t in trials if t.fault == fault]
        videos = [t.same_video for t in rows if t.same_video is not None]
        lines.append(
            f"| {fault} | {len(rows)} | {rows[0].expected} | {sum(t.ok for t in rows)}/{len(rows)}"
            f" | {sum(videos)}/{len(videos) if videos else '-'} | {sum(t.resends for t in rows)}"
            f" | {sum(t.failures for t in rows)} | {sum(t.seconds for t in rows) / len(rows):.1f} |")
    return lines
