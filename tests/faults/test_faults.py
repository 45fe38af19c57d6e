"""The fault suite (issue #6): each fault injected 5 times during real jobs.

Every job must end as expected (succeeded after a transient fault, failed with a clear
error after a permanent one), with a video byte-identical to the fault-free render of the
same request, and with the database and the stored files in agreement. Runs against the
fault farm of conftest.py: its own PostgreSQL and Redis, which the tests stop and kill.
"""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from tests.faults.conftest import TRIALS as TRIALS_RECORDED
from tests.faults.conftest import FaultStack
from workers.group import actor_name

pytestmark = pytest.mark.e2e
TRIALS = 5


def assert_storage_agrees(stack: FaultStack, job: dict) -> None:
    """Every file the database names is there, the video's sha256 is the recorded one, and
    no half-written file was left behind."""
    from farm.storage import Storage, sha256_of

    storage = Storage(stack.env["FARM_STORAGE_URL"])
    from farm.jobs import service as jobs

    record = jobs.get_job(stack.pg.url, job["id"])
    for seg in record.segments:
        if seg.state == "done":
            assert seg.chunk_keys and all(storage.exists(k) for k in seg.chunk_keys), seg.index
    if record.state == "succeeded":
        assert sha256_of(storage.local_path(record.output_key)) == record.output_sha256
    leftovers = list(storage.local_path(f"jobs/{job['id']}").rglob("*.part-*"))
    assert leftovers == []


def test_celery_worker_killed_mid_segment(fault_stack: FaultStack):
    """SIGKILL to the worker rendering a segment (no goodbye, its message stuck in Redis'
    unacked set for hours); a supervisor restarts it. The reconciler sees the heartbeat stop
    and sends the job again."""
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit()
        job = fault_stack.wait_rendering(job_id)
        victim = next(s["worker"] for s in job["segments"] if s["state"] == "running")
        name, service = fault_stack.service_named(victim)
        service.kill()
        fault_stack.worker(name, "render.cpu", wait=False)  # restarted, as systemd would
        trial = fault_stack.finish_trial("Celery worker SIGKILL mid-segment", job_id, started)
        fault_stack.wait_for_workers([victim])
        assert trial.ok, trial
        assert trial.resends >= 1
        assert any(e["kind"] == "segment_lost" and e["worker"] == victim
                   for e in fault_stack.events(job_id))
        assert_storage_agrees(fault_stack, fault_stack.job(job_id))


def test_ray_actor_killed_mid_segment(fault_stack: FaultStack):
    """The actor holding the model dies mid-render: the segment fails with WorkerLost, is
    retried on a fresh actor, and the job succeeds."""
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit()
        fault_stack.wait_rendering(job_id)
        ray.kill(ray.get_actor(actor_name("wan-tiny", "cpu", 0), namespace="farm"))
        trial = fault_stack.finish_trial("Ray actor killed mid-segment", job_id, started)
        assert trial.ok, trial
        assert any(e["kind"] == "segment_failed" and "WorkerLost" in e["message"]
                   for e in fault_stack.events(job_id))
        assert_storage_agrees(fault_stack, fault_stack.job(job_id))


def test_redis_restarted_mid_run(fault_stack: FaultStack):
    """Redis dies and comes back empty (no persistence): queued tasks, results and the
    chord's counter are gone. Workers reconnect; the reconciler sends what was lost."""
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit()
        fault_stack.wait_rendering(job_id)
        fault_stack.redis.kill()
        time.sleep(1.0)
        fault_stack.redis.start()
        trial = fault_stack.finish_trial("Redis restarted mid-run", job_id, started)
        assert trial.ok, trial
        assert trial.resends >= 1  # the restart took its queue and its chord's count
        assert_storage_agrees(fault_stack, fault_stack.job(job_id))


def test_postgresql_down_for_10_seconds(fault_stack: FaultStack):
    """The database stops mid-render for 10 s. The API answers 503 with Retry-After (never
    a 500) and recovers by itself; the render goes on and the job succeeds."""
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit()
        fault_stack.wait_rendering(job_id)
        fault_stack.pg.stop()
        down_until, answers = time.monotonic() + 10, []
        with fault_stack.client() as http:
            while time.monotonic() < down_until:
                resp = http.get(f"/v1/jobs/{job_id}")
                answers.append((resp.status_code, resp.headers.get("retry-after")))
                time.sleep(0.5)
        fault_stack.pg.start()
        assert answers and set(answers) == {(503, "5")}, answers
        trial = fault_stack.finish_trial("PostgreSQL down 10 s", job_id, started)
        assert trial.ok, trial
        assert_storage_agrees(fault_stack, fault_stack.job(job_id))


@pytest.fixture()
def tier_b(fault_stack: FaultStack):
    """tier_b(*names, broken=...): start workers of queue render.cpu-b (the test policy
    sends project `tier-b` there); returns their names. All are stopped after the test."""
    started: list[str] = []

    def start(*names: str, broken: bool) -> list[str]:
        env = fault_stack.broken_scratch if broken else None
        hostnames = [fault_stack.worker(n, "render.cpu-b", env, wait=False) for n in names]
        started.extend(names)
        fault_stack.wait_for_workers(hostnames)
        return hostnames

    yield start
    fault_stack.stop(*(name for name in set(started) if name in fault_stack.services))


def test_a_worker_failing_a_job_three_times_is_blocklisted(fault_stack, tier_b):
    """One worker whose scratch disk is broken: it fails the job's segment 3 times, is
    blocklisted for the job, and with no other worker left the job fails saying so."""
    [b1] = tier_b("b1", broken=True)
    started = time.monotonic()
    job_id = fault_stack.submit("tier-b", frames=5)
    trial = fault_stack.finish_trial("only worker's scratch disk broken", job_id, started,
                                     expected="failed", project="tier-b")
    assert trial.ok, trial
    job = fault_stack.job(job_id, "tier-b")
    assert job["error"].startswith(f"segment 0 cannot run: no worker of queue render.cpu-b is "
                                   f"left for this job: blocklisted ['{b1}']")
    assert job["error"].count("NotADirectoryError") == 3
    kinds = [e["kind"] for e in fault_stack.events(job_id, "tier-b")]
    assert kinds.count("segment_failed") == 3 and "blocklisted" in kinds
    assert kinds[-1] == "job_failed"


def test_two_broken_workers_take_turns_until_both_are_blocklisted(fault_stack, tier_b):
    """Only two workers, both broken: a segment cannot fail on three different workers, so
    it goes back and forth (more retries than Celery's default limit of 3) until each has
    failed the job 3 times; then none is left and the job fails saying so."""
    workers = tier_b("b1", "b2", broken=True)
    started = time.monotonic()
    job_id = fault_stack.submit("tier-b", frames=5)
    trial = fault_stack.finish_trial("the only 2 workers' scratch disks broken", job_id,
                                     started, expected="failed", project="tier-b")
    assert trial.ok, trial
    assert trial.failures == 6
    error = fault_stack.job(job_id, "tier-b")["error"]
    assert error.startswith(f"segment 0 cannot run: no worker of queue render.cpu-b is left for "
                            f"this job: blocklisted {sorted(workers)}")


def test_scratch_disk_broken_on_two_of_three_workers(fault_stack, tier_b):
    """Failures on two workers, then the third renders it: the job succeeds."""
    broken = set(tier_b("b1", "b2", broken=True))
    [healthy] = tier_b("b3", broken=False)
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit("tier-b")
        trial = fault_stack.finish_trial("scratch disk broken on 2 of 3 workers", job_id,
                                         started, project="tier-b")
        assert trial.ok, trial
        evs = fault_stack.events(job_id, "tier-b")
        assert {e["worker"] for e in evs if e["kind"] == "segment_failed"} <= broken
        assert {e["worker"] for e in evs if e["kind"] == "segment_done"} == {healthy}


def test_scratch_disk_broken_on_every_worker_fails_after_three(fault_stack, tier_b):
    """A permanent fault: every worker fails. Each segment fails for good on its third
    different worker, and the job fails with every failure, keeping its record and log."""
    workers = tier_b("b1", "b2", "b4", broken=True)
    for _ in range(TRIALS):
        started = time.monotonic()
        job_id = fault_stack.submit("tier-b", frames=5)
        trial = fault_stack.finish_trial("scratch disk broken on every worker (permanent)",
                                         job_id, started, expected="failed", project="tier-b")
        assert trial.ok, trial
        job = fault_stack.job(job_id, "tier-b")
        assert job["error"].startswith("segment 0 failed on 3 different workers:\n")
        assert all(f"[{w}] NotADirectoryError" in job["error"] for w in workers)
        assert job["segments"][0]["state"] == "failed"
        assert [e["kind"] for e in fault_stack.events(job_id, "tier-b")][-1] == "job_failed"


def test_a_failed_job_keeps_its_finished_segments(fault_stack, tier_b):
    """Segment 0 renders on a healthy worker, which then dies; the workers left have broken
    disks, so segment 1 fails for good. The job fails and keeps segment 0's chunks."""
    tier_b("b3", broken=False)
    job_id = fault_stack.submit("tier-b", steps=200)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = fault_stack.job(job_id, "tier-b")
        if job["segments"][0]["state"] == "done" and job["segments"][1]["state"] == "running":
            break
        time.sleep(0.05)
    fault_stack.services["b3"].kill()
    fault_stack.services.pop("b3")
    tier_b("b1", "b2", broken=True)
    job = fault_stack.wait_final(job_id, "tier-b")
    assert job["state"] == "failed", job
    assert job["error"].startswith("segment 1 failed on 3 different workers")
    assert job["segments"][0]["state"] == "done"
    assert_storage_agrees(fault_stack, job)
    from farm.storage import Storage

    storage = Storage(fault_stack.env["FARM_STORAGE_URL"])
    keys = __import__("farm.jobs.service", fromlist=["get_job"]).get_job(
        fault_stack.pg.url, job_id).segments[0].chunk_keys
    assert keys and all(storage.exists(k) for k in keys)


def test_the_farm_is_healthy_after_the_faults_and_logged_no_key(fault_stack):
    from tests.conftest import TMP
    from tests.e2e.test_secrets import assert_logs_hold_none_of

    with httpx.Client(base_url=fault_stack.api_url) as http:
        assert http.get("/healthz").json() == {"database": "ok", "broker": "ok"}
    # Every trial's job is accounted for: none lost, none left running.
    from farm.jobs import service as jobs

    assert len(TRIALS_RECORDED) >= 30
    for trial in TRIALS_RECORDED:
        assert jobs.get_job(fault_stack.pg.url, trial.job_id).state == trial.expected, trial
    assert_logs_hold_none_of(list(fault_stack.keys.values()), sorted(TMP.glob("fault-*.log")))
