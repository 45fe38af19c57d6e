"""Batches and windows against the real services: a batch waits for its window, is released
by a real Celery beat, completes, and leaves its report; windows closing park or cancel."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urljoin

import pytest

from tests.conftest import api_client


TINY = {"model": "wan-tiny", "frames": 5, "steps": 2}


@pytest.fixture()
def client(api_url, celery_beat):
    with api_client(api_url) as c:
        yield c


def wait_batch(client, batch_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["state"] == "done":
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} not done: {batch}")


def hhmmss(t: datetime) -> str:
    return t.strftime("%H:%M:%S")


def test_batch_waits_for_its_window_then_beat_releases_it(client):
    opens = datetime.now(timezone.utc) + timedelta(seconds=8)
    window = f"{hhmmss(opens)}-{hhmmss(opens + timedelta(minutes=30))}"
    content = "\n".join(json.dumps(line) for line in [
        {"prompt": "a red circle", "seeds": [11, 12]},  # fan-out: two jobs
        {"prompt": "a blue square", "priority": 90, "seed": 3},
    ])
    resp = client.post("/v1/batches", json={"content": content, "format": "jsonl",
                                            "window": window, "name": "night",
                                            "defaults": TINY})
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    assert resp.json()["jobs"] == 3
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["window_open"] is False and batch["counts"] == {"waiting": 3}
    jobs = [client.get(f"/v1/jobs/{j}").json() for j in batch["job_ids"]]
    assert sorted(j["seed"] for j in jobs) == [3, 11, 12]
    assert all(j["batch_id"] == batch_id and j["route"]["window"] == window for j in jobs)

    done = wait_batch(client, batch_id)
    assert done["counts"] == {"succeeded": 3}
    jobs = [client.get(f"/v1/jobs/{j}").json() for j in done["job_ids"]]
    for job in jobs:  # nothing ran before the window opened
        assert datetime.fromisoformat(job["dispatched_at"]) >= opens - timedelta(seconds=1)
    html = client.get(done["report_urls"]["html"])
    assert html.status_code == 200 and "base64" not in html.text
    # Each job's pictures are linked relative to the report's own URL (issue #13, item 9).
    thumbs = re.findall(r'<img src="([^"]+)"', html.text)
    assert len(thumbs) == 3
    for src in thumbs:
        picture = client.get(urljoin(done["report_urls"]["html"], src))
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        assert picture.content[:2] == b"\xff\xd8"
    assert "a blue square" in html.text and "night" in html.text
    rows = list(csv.DictReader(io.StringIO(client.get(done["report_urls"]["csv"]).text)))
    assert sorted(r["job_id"] for r in rows) == sorted(done["job_ids"])
    assert {r["state"] for r in rows} == {"succeeded"} and all(len(r["sha256"]) == 64 for r in rows)


def test_csv_batch_starts_now_without_a_window(client):
    content = "prompt,seeds,steps\na green triangle,2,1\n"
    resp = client.post("/v1/batches", json={"content": content, "format": "csv",
                                            "defaults": TINY})
    assert resp.status_code == 202, resp.text
    done = wait_batch(client, resp.json()["id"])
    assert done["window_open"] is None and done["counts"] == {"succeeded": 2}


@pytest.mark.parametrize("body,field,words", [
    ({"content": '{"prompt": "x", "frames": 10}\n'}, "content.line1.frames", "4k+1"),
    ({"content": '{"prompt": "x"}\n{"prompt": "y", "seeds": 0}\n'}, "content.line2.seeds", "seeds"),
    ({"content": "prompt\nx\n", "format": "csv", "defaults": {"colour": "red"}},
     "content.line2.colour", "Extra inputs"),
    ({"content": '{"prompt": "x"}\n', "window": "22:00-30:00"}, "window", "hour 30"),
    ({"content": '{"prompt": "x"}\n', "timezone": "Mars/Base"}, "timezone", "Mars/Base"),
])
def test_bad_batches_get_422_naming_line_and_field(client, body, field, words):
    resp = client.post("/v1/batches", json={"defaults": TINY} | body)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["field"] == field and words in detail["message"]


def test_route_explain_over_http(client):
    resp = client.get("/v1/routes/explain", params={"track": "final", "batch": "true"})
    assert resp.status_code == 200
    out = resp.json()
    assert out["route"]["rule"] == "overnight-final-batches"
    assert out["route"]["window"] == "22:00-06:00"
    assert "GB per GPU" in out["memory"] and len(out["rules_sha256"]) == 64
    bad = client.get("/v1/routes/explain", params={"model": "wan9"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "model"
