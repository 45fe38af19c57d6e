"""Two tiers, two queues, two actors; admission by priority and project quota."""

from __future__ import annotations

import pytest
import ray

from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for
from workers.group import actor_name
from workers.ray_cluster import NAMESPACE


@pytest.fixture()
def client(api_url):
    with api_client(api_url) as c:
        yield c


def test_jobs_of_two_tiers_land_on_their_own_queues_and_actors(client, project_client):
    body = {"prompt": "a red circle", "model": "wan-tiny", "frames": 5, "steps": 2}
    with project_client("tier-b") as tier_b:
        a = wait_for(client, client.post("/v1/jobs", json=body).json()["id"],
                     {"succeeded", "failed"})
        b = wait_for(tier_b, tier_b.post("/v1/jobs", json=body).json()["id"],
                     {"succeeded", "failed"})
    assert a["state"] == b["state"] == "succeeded", (a["error"], b["error"])
    assert (a["route"]["tier"], a["route"]["queue"]) == ("cpu", "render.cpu")
    assert (b["route"]["tier"], b["route"]["queue"], b["route"]["rule"]) == \
        ("cpu-b", "render.cpu-b", "tier-b-project")
    assert a["segments"][0]["worker"].startswith("render-") and \
        not a["segments"][0]["worker"].startswith("render-b-")
    assert b["segments"][0]["worker"].startswith("render-b-")
    for tier in ("cpu", "cpu-b"):
        ray.get_actor(actor_name("wan-tiny", tier, 0), namespace=NAMESPACE)


def test_a_tensor_parallel_route_renders_through_a_group_of_two_ranks(project_client):
    body = {"prompt": "a blue square", "model": "wan-tiny", "frames": 5, "steps": 2,
            "seed": 5}
    with project_client("parallel") as client:
        job = wait_for(client, client.post("/v1/jobs", json=body).json()["id"],
                       {"succeeded", "failed"})
    assert job["state"] == "succeeded", job["error"]
    assert (job["route"]["degree"], job["route"]["parallel"]) == (2, "tp2")
    ranks = [ray.get_actor(actor_name("wan-tiny", "cpu", r, "tp2"), namespace=NAMESPACE)
             for r in (0, 1)]
    info = ray.get([a.info.remote() for a in ranks])
    assert [i["heads_here"] for i in info] == [1, 1] and info[0]["renders"] >= 1
    assert [s["worker"] for s in job["segments"]][0].startswith("render-")


def test_admission_orders_by_priority_within_project_quotas(project_client):
    """The a100 tier (2 nodes x 8 GPUs) has no worker here: what admission sends stays in its
    queue, so the database shows exactly what was let through. 8 GPUs per project, 2 a job."""
    body = {"prompt": "a red square", "model": "wan2.2-t2v-a14b", "frames": 5, "priority": 10}

    clients = {p: project_client(p) for p in ("quota-a", "quota-b", "quota-c", "quota-d")}
    owner = {}

    def submit(project, **extra):
        job_id = clients[project].post("/v1/jobs", json=body | extra).json()["id"]
        owner[job_id] = clients[project]
        return job_id

    def sent(job_id):
        return owner[job_id].get(f"/v1/jobs/{job_id}").json()["dispatched_at"] is not None

    def cancel(job_id):
        owner[job_id].post(f"/v1/jobs/{job_id}/cancel")

    qa = [submit("quota-a") for _ in range(5)]
    assert [sent(j) for j in qa] == [True] * 4 + [False]  # its quota: 4 jobs of 2 GPUs
    qb = [submit("quota-b") for _ in range(4)]
    assert all(sent(j) for j in qb)  # the tier is now full: 16 of 16 GPUs
    low, high = submit("quota-c"), submit("quota-d", priority=99)
    assert not sent(low) and not sent(high)
    cancel(qa[0])  # 2 GPUs free: the highest priority goes
    assert sent(high) and not sent(low) and not sent(qa[4])
    cancel(qb[0])  # then the oldest of equal priority
    assert sent(qa[4]) and not sent(low)
    for job_id in qa[1:] + qb[1:] + [low, high]:
        cancel(job_id)
    for c in clients.values():
        c.close()
