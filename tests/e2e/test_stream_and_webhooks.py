"""Watching jobs against the live farm (issue #13, items 4 and 5): the job and batch event
streams, `farm wait` and `farm batch wait` reading them, and signed webhooks that survive
their receiver going away mid-way: every event arrives once it is back, and once only."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from farm.cli.watch import parse_sse
from farm.jobs import webhooks
from tests.conftest import api_client
from tests.e2e.test_cli import FARM
from tests.farm.test_webhooks import Receiver

pytestmark = pytest.mark.e2e
TINY = {"prompt": "a red circle moving left", "model": "wan-tiny", "width": 64, "height": 64,
        "frames": 5, "steps": 2}


def read_stream(client, path: str, timeout: float = 60) -> list[tuple[str, dict]]:
    got = []
    with client.stream("GET", path, timeout=timeout) as resp:
        assert resp.status_code == 200 and \
            resp.headers["content-type"].startswith("text/event-stream")
        for event, data in parse_sse(resp.iter_lines()):
            got.append((event, data))
    return got


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_job_stream_and_farm_wait_show_each_segment(api_url, project_client, celery_beat):
    env = dict(os.environ, FARM_API_URL=api_url)
    with api_client(api_url) as client:
        job_id = client.post("/v1/jobs", json=TINY | {"frames": 21, "seed": 5}).json()["id"]
        waiter = subprocess.Popen([FARM, "wait", job_id], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        got = read_stream(client, f"/v1/jobs/{job_id}/stream")
        out, err = waiter.communicate(timeout=60)
        assert client.get(f"/v1/jobs/{job_id}/stream").status_code == 200  # ended: at once
        assert client.get("/v1/jobs/0123456789abcdef/stream").status_code == 404
        assert client.get("/v1/batches/0123456789abcdef/stream").status_code == 404
    assert waiter.returncode == 0 and f"job {job_id} succeeded" in out, err
    kinds = [event for event, _ in got]
    assert kinds[0] == "state" and kinds[-1] == "done" and kinds.count("done") == 1
    last_step = {d["index"]: (d["step"], d["steps"]) for e, d in got if e == "progress"}
    assert last_step == {0: (2, 2), 1: (2, 2)}  # two segments (17 + 4 frames), 2 steps each
    states = [d["state"] for e, d in got if e == "state"]
    assert states[-1] == "succeeded" and len(states) == len(set(states))  # changes only
    assert got[-1][1]["output_url"].endswith(f"/v1/jobs/{job_id}/video")
    with project_client("stream-other") as other:
        assert other.get(f"/v1/jobs/{job_id}/stream").status_code == 403


def test_batch_stream_farm_batch_wait_and_the_batch_webhook(api_url, celery_beat):
    receiver = Receiver().start()
    env = dict(os.environ, FARM_API_URL=api_url)
    try:
        with api_client(api_url) as client:
            resp = client.post("/v1/batches", json={
                "content": '{"prompt": "a blue square"}\n{"prompt": "a green circle"}\n',
                "defaults": TINY, "webhook": receiver.url, "webhook_events": ["completed"]})
            assert resp.status_code == 202, resp.text
            batch_id = resp.json()["id"]
            waited = subprocess.run([FARM, "batch", "wait", batch_id], env=env, text=True,
                                    capture_output=True, timeout=90)
            got = read_stream(client, f"/v1/batches/{batch_id}/stream")  # done: ends at once
        assert waited.returncode == 0 and "done: succeeded 2" in waited.stdout, waited.stderr
        assert got[0] == ("counts", {"id": batch_id, "jobs": 2, "counts": {"succeeded": 2}})
        assert got[-1][0] == "done" and set(got[-1][1]["report_urls"]) == {"html", "csv"}
        until(lambda: receiver.got, 15, "the batch's completed event")
        [(headers, body)] = receiver.got
        assert json.loads(body)["batch_id"] == batch_id and headers["Farm-Event"] == "completed"
        assert json.loads(body)["counts"] == {"succeeded": 2}
    finally:
        receiver.stop()


def test_webhooks_arrive_signed_and_once_after_the_receiver_comes_back(
        api_url, project_client, celery_beat):
    receiver = Receiver().start()
    with project_client("hooks") as client:
        secret = client.post("/v1/webhook-secret").json()["webhook_secret"]
        hooked = TINY | {"webhook": receiver.url, "webhook_events": ["start", "completed"]}
        first = client.post("/v1/jobs", json=hooked | {"seed": 1}).json()["id"]
        until(lambda: len(receiver.got) == 2, 30, "the first job's start and completed")
        receiver.stop()  # the receiver goes away mid-way
        second = client.post("/v1/jobs", json=hooked | {"seed": 2}).json()["id"]
        assert read_stream(client, f"/v1/jobs/{second}/stream")[-1][1]["state"] == "succeeded"

        def failed_kinds() -> set[str]:
            log = client.get(f"/v1/jobs/{second}/events").json()
            return {e["message"].split(": ")[1].split()[0] for e in log
                    if e["kind"] == "webhook_failed"}

        until(lambda: failed_kinds() == {"start", "completed"}, 15, "both deliveries failing")
        receiver.start()  # back on the same port
        until(lambda: len(receiver.got) == 4, 30, "the second job's events after the outage")
        time.sleep(2.5)  # two more ticks: nothing is sent twice
        log = client.get(f"/v1/jobs/{second}/events").json()
    assert sorted(receiver.events()) == sorted([("start", first), ("completed", first),
                                               ("start", second), ("completed", second)])
    for headers, body in receiver.got:
        assert webhooks.verify(secret, headers["Farm-Signature"], body)
        assert json.loads(body)["project"] == "hooks"
    done = [json.loads(b) for _, b in receiver.got if json.loads(b)["event"] == "completed"]
    assert {d["state"] for d in done} == {"succeeded"} and \
        {d["output_url"] for d in done} == {f"/v1/jobs/{first}/video", f"/v1/jobs/{second}/video"}
    assert [e["kind"] for e in log].count("webhook_delivered") == 2
    receiver.stop()
