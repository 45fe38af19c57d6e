"""The result cache on the live farm (issue #13, item 1): a repeat is `succeeded` in its
202 with no task sent, `"cache": false` renders again, and a longer job renders only the
segments an earlier one did not."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e
ENDED = {"succeeded", "failed", "canceled"}
TINY = {"model": "wan-tiny", "width": 64, "height": 64, "steps": 2, "seed": 4242}


@pytest.fixture
def client(api_url):
    with api_client(api_url) as c:
        yield c


def test_a_repeat_is_answered_at_once_from_the_stored_video(client):
    body = {"prompt": "a cached orange square", "frames": 5, **TINY}
    first = wait_for(client, client.post("/v1/jobs", json=body).json()["id"], ENDED)
    assert first["state"] == "succeeded" and not first["cached"]

    resp = client.post("/v1/jobs", json={**body, "prompt": "a cached  orange square "})
    assert resp.status_code == 202 and resp.json()["state"] == "succeeded"
    again = client.get(f"/v1/jobs/{resp.json()['id']}").json()
    assert (again["cached"], again["cached_from"]) == (True, first["id"])
    assert again["dispatched_at"] is not None and again["segments"][0]["celery_id"] is None
    video = client.get(again["output_url"])
    assert video.status_code == 200
    assert hashlib.sha256(video.content).hexdigest() == first["output_sha256"]
    log = client.get(f"/v1/jobs/{again['id']}/events").json()
    assert [e["kind"] for e in log] == ["cache_hit"] and first["id"] in log[0]["message"]

    fresh = client.post("/v1/jobs", json={**body, "cache": False})
    assert fresh.json()["state"] == "queued"
    rendered = wait_for(client, fresh.json()["id"], ENDED)
    assert rendered["state"] == "succeeded" and not rendered["cached"]
    assert rendered["segments"][0]["celery_id"] is not None


@pytest.mark.parametrize("continuous, reused", [(False, [0, 1]), (True, [0])])
def test_a_longer_job_renders_only_the_segments_it_does_not_share(client, continuous, reused):
    """Independent clips reuse every shared segment. A continuous job reuses segment 0 and
    its last frame (segment 1 ended the short job, which kept no last frame for it), and
    segment 1 continues from that frame."""
    body = {"prompt": f"a cached long take {continuous}", "continuous": continuous, **TINY}
    short = wait_for(client, client.post("/v1/jobs", json={**body, "frames": 33}).json()["id"],
                     ENDED)
    assert short["state"] == "succeeded"
    longer_id = client.post("/v1/jobs", json={**body, "frames": 49}).json()["id"]
    longer = wait_for(client, longer_id, ENDED)
    assert longer["state"] == "succeeded", longer["error"]
    assert not longer["cached"]
    assert [s["attempts"] for s in longer["segments"]] == \
        [0 if i in reused else 1 for i in range(3)]
    kinds = [(e["kind"], e["segment_index"])
             for e in client.get(f"/v1/jobs/{longer_id}/events").json()]
    assert [i for kind, i in kinds if kind == "cache_hit"] == reused
    assert not any(kind == "segment_started" and i in reused for kind, i in kinds)
