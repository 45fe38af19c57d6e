"""Preemption through the live farm (issue #15, item 1): an urgent job waiting for a full
tier makes the low-priority job rendering there yield its group at a denoising step; the
urgent job renders and finishes first; the low job resumes from its saved step and still
succeeds, its log showing the preemption and the resume.

The test policy's rule for project `tier-b` (tests/conftest.py) preempts from priority 90
(preempt_at 90, margin 20) on tier cpu-b, whose pool is one group."""

from __future__ import annotations

import time

from tests.e2e.test_render_flow import wait_for

BODY = {"prompt": "a red circle", "model": "wan-tiny", "frames": 5}


def kinds(client, job_id: str) -> list[str]:
    return [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events").json()]


def test_an_urgent_job_preempts_a_low_one_which_resumes_and_succeeds(project_client, celery_beat,
                                                                    tiny_model):
    with project_client("tier-b") as client:
        # 200 steps of 17 frames: after the first step (seconds: the group warms up) the
        # rest takes ~2 s, well past the ~0.3 s a preemption takes to land. At 120 steps of
        # 5 frames (~0.8 s) a loaded CI machine finished the low job first.
        low = client.post("/v1/jobs", json=BODY | {"priority": 10, "steps": 200, "frames": 17,
                                                   "seed": 1})
        assert low.status_code == 202, low.text
        low_id = low.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # rendering: its first step done, most to come
            job = client.get(f"/v1/jobs/{low_id}").json()
            if job["segments"][0]["progress"] > 0:
                break
            time.sleep(0.1)
        assert job["state"] == "running", job
        urgent = client.post("/v1/jobs", json=BODY | {"priority": 95, "steps": 2, "seed": 2})
        assert urgent.status_code == 202, urgent.text
        urgent_id = urgent.json()["id"]
        assert client.get(f"/v1/jobs/{urgent_id}").json()["route"]["preempt_at"] == 90
        done = wait_for(client, urgent_id, {"succeeded", "failed"})
        low_done = wait_for(client, low_id, {"succeeded", "failed"})
        log = kinds(client, low_id)
        messages = [e["message"] for e in client.get(f"/v1/jobs/{low_id}/events").json()]
    assert done["state"] == "succeeded", done["error"]
    assert low_done["state"] == "succeeded", low_done["error"]
    assert done["finished_at"] < low_done["finished_at"]
    assert "preempt_requested" in log and "preempted" in log and "resumed" in log, messages
    assert log.index("preempt_requested") < log.index("preempted") < log.index("resumed")
    assert low_done["segments"][0]["preemptions"] == 1
