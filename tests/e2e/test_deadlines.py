"""Deadlines on the live farm (issue #15, item 3): a job's status and its event stream show
its deadline_at (created_at + deadline_s) and deadline_risk, and each segment's
preemptions, resume step and batched render; the beat tick's deadline watch marks a passed
deadline once. Held jobs: nothing renders."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from farm.cli.watch import parse_sse
from tests.conftest import api_client

pytestmark = pytest.mark.e2e
TINY = {"prompt": "a red circle", "model": "wan-tiny", "frames": 21, "steps": 2,
        "width": 64, "height": 64}


def events_until(client, path: str, last: str) -> list[tuple[str, dict]]:
    """The stream's events up to the first ``last`` (a held job's stream stays open)."""
    got = []
    with client.stream("GET", path, timeout=30) as resp:
        assert resp.status_code == 200
        for event, data in parse_sse(resp.iter_lines()):
            got.append((event, data))
            if event == last:
                break
    return got


def test_status_and_stream_show_the_deadline_and_the_segments_preemption_fields(api_url):
    with api_client(api_url) as client:
        due = client.post("/v1/jobs", json=TINY | {"hold": True, "deadline_s": 3600}).json()
        plain = client.post("/v1/jobs", json=TINY | {"hold": True}).json()
        try:
            job = client.get(f"/v1/jobs/{due['id']}").json()
            created, deadline = (datetime.fromisoformat(job[k].replace("Z", "+00:00"))
                                 for k in ("created_at", "deadline_at"))
            assert deadline == created + timedelta(hours=1)
            assert (job["deadline_risk"], job["deadline_missed_at"]) == (False, None)
            assert [(s["preemptions"], s["resume_step"], s["render_batch"])
                    for s in job["segments"]] == [(0, None, None)] * 2  # 17 + 4 frames
            got = dict(events_until(client, f"/v1/jobs/{due['id']}/stream", "deadline"))
            assert datetime.fromisoformat(got["deadline"]["deadline_at"]) == deadline
            assert (got["deadline"]["deadline_risk"], got["deadline"]["deadline_missed_at"]) \
                == (False, None)
            assert client.get(f"/v1/jobs/{plain['id']}").json()["deadline_at"] is None
        finally:
            for job_id in (due["id"], plain["id"]):
                client.post(f"/v1/jobs/{job_id}/cancel")
        bad = client.post("/v1/jobs", json=TINY | {"deadline_s": -5})
        assert bad.status_code == 422 and "deadline_s" in bad.text


def test_the_tick_marks_a_passed_deadline_once_in_the_status_and_the_log(api_url,
                                                                         celery_beat):
    """Needs the deadline watch in the beat tick (farm/tasks/celery_tasks.py ``tick``): a
    held job due in 1 s is seen missed on a tick after, once."""
    with api_client(api_url) as client:
        job_id = client.post("/v1/jobs", json=TINY | {"hold": True, "deadline_s": 1}
                             ).json()["id"]
        try:
            give_up = time.monotonic() + 30
            while (job := client.get(f"/v1/jobs/{job_id}").json())["deadline_missed_at"] \
                    is None and time.monotonic() < give_up:
                time.sleep(0.3)
            assert job["deadline_missed_at"] is not None and job["deadline_risk"]
            time.sleep(2.5)  # two more ticks: nothing more
            kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events").json()]
            assert kinds.count("deadline_missed") == 1
        finally:
            client.post(f"/v1/jobs/{job_id}/cancel")
