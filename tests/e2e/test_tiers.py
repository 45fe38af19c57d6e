"""Two tiers, two queues, two actors; admission by priority and project quota."""

from __future__ import annotations

import httpx
import pytest
import ray

from tests.e2e.test_render_flow import wait_for
from workers.group import actor_name
from workers.ray_cluster import NAMESPACE


@pytest.fixture()
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=30) as c:
        yield c


def test_jobs_of_two_tiers_land_on_their_own_queues_and_actors(client):
    body = {"prompt": "a red circle", "model": "wan-tiny", "frames": 5, "steps": 2}
    a = client.post("/v1/jobs", json=body).json()["id"]
    b = client.post("/v1/jobs", json=body | {"project": "tier-b"}).json()["id"]
    a, b = (wait_for(client, j, {"succeeded", "failed"}) for j in (a, b))
    assert a["state"] == b["state"] == "succeeded", (a["error"], b["error"])
    assert (a["route"]["tier"], a["route"]["queue"]) == ("cpu", "render.cpu")
    assert (b["route"]["tier"], b["route"]["queue"], b["route"]["rule"]) == \
        ("cpu-b", "render.cpu-b", "tier-b-project")
    assert a["segments"][0]["worker"].startswith("render-") and \
        not a["segments"][0]["worker"].startswith("render-b-")
    assert b["segments"][0]["worker"].startswith("render-b-")
    for tier in ("cpu", "cpu-b"):
        ray.get_actor(actor_name("wan-tiny", tier, 0), namespace=NAMESPACE)


def test_admission_orders_by_priority_within_project_quotas(client):
    """The a100 tier has no worker here: what admission sends stays in its queue, so the
    database shows exactly what was let through. 16 GPUs, 8 per project, 2 per job."""
    body = {"prompt": "a red square", "model": "wan2.2-t2v-a14b", "frames": 5}
    quota_a = [client.post("/v1/jobs", json=body | {"project": "quota-a", "priority": 10})
               .json()["id"] for _ in range(5)]
    jobs = {j: client.get(f"/v1/jobs/{j}").json() for j in quota_a}
    sent = [j for j in quota_a if jobs[j]["dispatched_at"]]
    assert sent == quota_a[:4]  # project quota: 8 GPUs = 4 jobs; the fifth waits
    assert jobs[quota_a[4]]["state"] == "queued"
    urgent = client.post("/v1/jobs", json=body | {"project": "quota-b", "priority": 99}).json()
    assert client.get(f"/v1/jobs/{urgent['id']}").json()["dispatched_at"] is not None
    # Canceling one of quota-a's jobs frees 2 of its GPUs: its waiting job goes next.
    client.post(f"/v1/jobs/{sent[0]}/cancel")
    assert client.get(f"/v1/jobs/{quota_a[4]}").json()["dispatched_at"] is not None
    for job_id in quota_a[1:] + [urgent["id"]]:
        client.post(f"/v1/jobs/{job_id}/cancel")
