"""Actor pools (issue #11): a tier renders on as many groups as its GPUs hold, a job's
independent segments fan out over idle groups, and one group driven by several Celery tasks
at once serves them one after another and survives.

The session's cpu tier has 2 GPUs on 1 node: the wan-tiny pool has two groups (g0, g1) and
the tensor-parallel route (project `parallel`, degree 2) one. A second render worker joins
the session's so that two render tasks run at once.
"""

from __future__ import annotations

import re
import time

import pytest
import ray

from farm.db.tables import utcnow
from farm.jobs import events, service as jobs
from farm.jobs.dispatch import enqueue_job
from tests.conftest import RUN_ID, Service, _wait_until, api_client
from tests.e2e.test_render_flow import wait_for
from workers.group import actor_name
from workers.ray_cluster import NAMESPACE

pytestmark = pytest.mark.e2e
RENDERED = re.compile(r"rendered on (\S+) from ([\d.]+) to ([\d.]+)")


@pytest.fixture(scope="module")
def second_render_worker(celery_workers):
    from farm.celery_app import app

    worker = Service("worker-render-2", ["worker", "-Q", "render.cpu", "-c", "1",
                                         "-n", f"render-2-{RUN_ID}@%h"])
    _wait_until(lambda: len(app.control.ping(timeout=1.0)) >= len(celery_workers) + 1, 60,
                "second render worker", worker.log)
    yield worker
    worker.stop()


@pytest.fixture()
def client(api_url, second_render_worker):
    with api_client(api_url) as c:
        yield c


def rendered(db_url: str, job_id: str) -> list[tuple[int, str, float, float]]:
    """(segment, group, began, ended) of each render, from the job's log."""
    out = []
    for e in events.list_events(db_url, job_id):
        if e.kind == events.SEGMENT_RENDERED:
            group, began, ended = RENDERED.match(e.message).groups()
            out.append((e.segment_index, group, float(began), float(ended)))
    return out


def overlap(a: tuple, b: tuple) -> float:
    return min(a[3], b[3]) - max(a[2], b[2])


def test_two_jobs_render_at_once_on_two_groups_of_the_pool(client, db_url):
    body = {"prompt": "a red circle moving left", "model": "wan-tiny", "frames": 17,
            "steps": 30, "seed": 11}
    ids = [client.post("/v1/jobs", json={**body, "seed": 11 + i}).json()["id"] for i in (0, 1)]
    done = [wait_for(client, job_id, {"succeeded", "failed"}) for job_id in ids]
    assert [j["state"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    (a,), (b,) = rendered(db_url, ids[0]), rendered(db_url, ids[1])
    assert {a[1], b[1]} == {"render:wan-tiny:cpu:g0", "render:wan-tiny:cpu:g1"}
    # Admission let both in, and each held its group while the other rendered (a group
    # made for the occasion may load after the other's render ended: leases, not renders).
    leased = [_started_at(db_url, job_id) for job_id in ids]
    assert leased[1] < a[3] and leased[0] < b[3], (leased, a, b)


def test_a_jobs_independent_segments_fan_out_over_idle_groups(client, db_url):
    # 49 frames = three segments of the tiny model (17 + 16 + 16), not continued: the
    # job holds both groups of the pool, and its segments render two at a time.
    job_id = client.post("/v1/jobs", json={
        "prompt": "a blue square", "model": "wan-tiny", "frames": 49, "steps": 30,
        "seed": 4, "continuous": False}).json()["id"]
    job = wait_for(client, job_id, {"succeeded", "failed"})
    assert job["state"] == "succeeded", job["error"]
    renders = sorted(rendered(db_url, job_id))
    log = [(e.kind, e.segment_index, e.worker, e.message, e.created_at.time())
           for e in events.list_events(db_url, job_id)]
    assert [r[0] for r in renders] == [0, 1, 2]
    assert {r[1] for r in renders} == {"render:wan-tiny:cpu:g0", "render:wan-tiny:cpu:g1"}, log
    assert max(overlap(x, y) for x in renders for y in renders if x is not y) > 0


def test_one_group_driven_by_several_tasks_at_once_serves_them_in_turn(
        project_client, db_url, settings):
    """The tensor-parallel pool has one group. Three jobs are sent straight to Celery,
    past admission, so that two render tasks want the group at the same moment: the lease
    lets one drive it at a time, the group is never broken or rebuilt, and each job's video
    is the same as when it renders alone."""
    body = {"prompt": "a green triangle", "model": "wan-tiny", "frames": 9, "steps": 20,
            "seed": 21}
    with project_client("parallel") as client:
        alone = wait_for(client, client.post("/v1/jobs", json=body).json()["id"],
                         {"succeeded", "failed"})
        assert alone["state"] == "succeeded", alone["error"]
        ranks = [ray.get_actor(actor_name("wan-tiny", "cpu", r, "tp2"), namespace=NAMESPACE)
                 for r in (0, 1)]
        pids = [i["pid"] for i in ray.get([a.info.remote() for a in ranks])]
        made = [jobs.new_job(_create(body, "parallel"), _route("parallel", body), "sha")
                for _ in range(3)]
        for job in made:  # marked as sent when saved, so admission leaves them alone
            job.dispatched_at = utcnow()
        jobs.add_jobs(db_url, made)
        for job in made:  # the bypass: what admission would never do
            enqueue_job(jobs.get_job(db_url, job.id))
        done = [wait_for(client, job.id, {"succeeded", "failed"}) for job in made]
    assert [j["state"] for j in done] == ["succeeded"] * 3, [j["error"] for j in done]
    assert {j["output_sha256"] for j in done} == {alone["output_sha256"]}
    assert [i["pid"] for i in ray.get([a.info.remote() for a in ranks])] == pids
    windows = sorted(w for job in made for w in rendered(db_url, job.id))
    assert len(windows) == 3 and {w[1] for w in windows} == {"render:wan-tiny:cpu:tp2:g0"}
    for first, second in zip(windows, windows[1:]):
        assert second[2] >= first[3] - 0.05, windows  # one driver at a time


def _create(body: dict, project: str):
    from farm.schemas import JobCreate

    return JobCreate(**body, project=project)


def _route(project: str, body: dict):
    from farm.jobs.submit import route_request

    return route_request(_create(body, project), {})


def test_a_segment_whose_group_fails_is_retried_on_another_group(client, db_url):
    """The actor of the group rendering a segment is killed: the failure is the group's (the
    job's log names it, not the Celery worker), and the retry leases the pool's other group."""
    job_id = client.post("/v1/jobs", json={"prompt": "a red circle moving left",
                                           "model": "wan-tiny", "frames": 17, "steps": 200,
                                           "seed": 8}).json()["id"]
    started = _wait_for_event(db_url, job_id, events.SEGMENT_STARTED)
    first = started.message.rsplit(" on ", 1)[1]
    time.sleep(1.0)  # mid-render
    ray.kill(ray.get_actor(f"{first}:r0", namespace=NAMESPACE))
    job = wait_for(client, job_id, {"succeeded", "failed"})
    assert job["state"] == "succeeded", job["error"]
    log = events.list_events(db_url, job_id)
    failed = [e for e in log if e.kind == events.SEGMENT_FAILED]
    assert [e.worker for e in failed] == [first], [(e.kind, e.worker, e.message) for e in log]
    again = [e.message for e in log if e.kind == events.SEGMENT_STARTED][1:]
    other = ({"render:wan-tiny:cpu:g0", "render:wan-tiny:cpu:g1"} - {first}).pop()
    assert again and again[-1].endswith(f" on {other}"), again


def _started_at(db_url: str, job_id: str) -> float:
    """When the job's first segment had leased its group (its start event), epoch seconds."""
    return next(e.created_at.timestamp() for e in events.list_events(db_url, job_id)
                if e.kind == events.SEGMENT_STARTED)


def test_a_tier_shared_by_two_pools_takes_idle_groups_down_to_make_room(project_client):
    """Tier cpu-b has one GPU (one Ray slot) and the project tier-b sends both wan-tiny and
    wan-toy there: each pool's group is made only once the other pool's idle group is taken
    down, so neither waits forever for a slot an idle group holds."""
    def actor(model: str):
        try:
            return ray.get_actor(f"render:{model}:cpu-b:g0:r0", namespace=NAMESPACE)
        except ValueError:
            return None

    # Finals: a draft of wan-toy would render its draft variant, a third pool (issue #12).
    body = {"prompt": "a red circle moving left", "frames": 5, "steps": 2, "track": "final"}
    pids = []
    with project_client("tier-b") as client:
        for model in ("wan-tiny", "wan-toy", "wan-tiny"):
            job = wait_for(client, client.post("/v1/jobs", json={**body, "model": model})
                           .json()["id"], {"succeeded", "failed"})
            assert job["state"] == "succeeded", job["error"]
            assert job["route"]["tier"] == "cpu-b"
            other = actor("wan-toy" if model == "wan-tiny" else "wan-tiny")
            assert other is None or _dead(other), f"{model}: the other pool's group is up"
            pids.append(ray.get(actor(model).info.remote())["pid"])
    assert pids[0] != pids[2]  # wan-tiny's group was taken down for wan-toy, then made again


def _dead(handle) -> bool:
    try:
        ray.get(handle.info.remote(), timeout=5)
        return False
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True


def _wait_for_event(db_url: str, job_id: str, kind: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events.list_events(db_url, job_id) if e.kind == kind]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event for job {job_id} in {timeout}s")
