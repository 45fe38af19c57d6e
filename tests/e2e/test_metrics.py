"""/metrics on the API and `farm exporter`, scraped around a real render (issue #13, item 7):
the held job shows as waiting on its tier, the numbers move as it renders and ends."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _http_service, api_client
from tests.e2e.test_render_flow import wait_for

TINY = {"prompt": "a green triangle", "model": "wan-tiny", "width": 64, "height": 64,
        "frames": 5, "steps": 2}


@pytest.fixture(scope="module")
def exporter_url(celery_workers):
    yield from _http_service("exporter", "/metrics")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The exporter needs no token; the API only the metrics token (never a project key)."""
    token = os.environ["FARM_METRICS_TOKEN"]
    resp = httpx.get(f"{url}/metrics", timeout=10, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def until(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_the_api_serves_metrics_only_with_the_metrics_token(api_url, api_key):
    assert httpx.get(f"{api_url}/metrics").status_code == 401
    project_key = httpx.get(f"{api_url}/metrics", headers={"Authorization": f"Bearer {api_key}"})
    assert project_key.status_code == 401 and "FARM_METRICS_TOKEN" in project_key.text


def test_metrics_move_while_a_job_waits_renders_and_ends(api_url, exporter_url):
    before = {url: scrape(url) for url in (api_url, exporter_url)}
    with api_client(api_url) as client:
        job = client.post("/v1/jobs", json=TINY | {"hold": True}).json()
        tier = client.get(f"/v1/jobs/{job['id']}").json()["route"]["tier"]
        waiting = ("farm_jobs_waiting", (("tier", tier), ("track", "draft")))
        for url in (api_url, exporter_url):  # both processes tell the database's numbers
            assert scrape(url)[waiting] == before[url].get(waiting, 0) + 1, url
        assert client.patch(f"/v1/jobs/{job['id']}", json={"hold": False}).status_code == 200
        assert wait_for(client, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert scrape(api_url)[waiting] == before[api_url].get(waiting, 0)
    moved = {
        ("farm_job_render_seconds_count", (("track", "draft"),)): 1,
        ("farm_job_queue_wait_seconds_count", (("track", "draft"),)): 1,
        ("farm_jobs_finished_total", (("state", "succeeded"), ("track", "draft"))): 1,
    }
    for url in (api_url, exporter_url):
        got = until(lambda: (lambda now: now if all(
            now.get(k, 0) >= before[url].get(k, 0) + n for k, n in moved.items()) else None)(
            scrape(url)))
        assert got, (url, {k: scrape(url).get(k) for k in moved})
        gpu = ("farm_gpu_seconds_total", (("project", "default"), ("tier", tier)))
        assert got[gpu] > before[url].get(gpu, 0), url
        groups = sum(v for (name, labels), v in got.items()
                     if name == "farm_actor_groups" and ("tier", tier) in labels)
        assert groups >= 1  # the group that rendered it, busy or idle now
