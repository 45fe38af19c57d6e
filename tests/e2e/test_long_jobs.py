"""Long jobs end to end (issue #11, item 7): a continuous job's segments render one after
another (a Celery chain inside the chord), each starting only when the one before is done."""

from __future__ import annotations

import pytest

from tests.conftest import api_client
from tests.e2e.test_pools import rendered
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e


def test_continuous_segments_render_in_order_one_at_a_time(api_url, db_url):
    # 49 frames = three segments of the tiny model (17 + 16 + 16), continued by default.
    with api_client(api_url) as client:
        job_id = client.post("/v1/jobs", json={
            "prompt": "a red circle moving right", "model": "wan-tiny", "frames": 49,
            "steps": 6, "seed": 8}).json()["id"]
        job = wait_for(client, job_id, {"succeeded", "failed"})
    assert job["state"] == "succeeded", job["error"]
    renders = sorted(rendered(db_url, job_id), key=lambda r: r[2])  # by start time
    assert [r[0] for r in renders] == [0, 1, 2]
    for before, after in zip(renders, renders[1:]):
        assert after[2] >= before[3], renders  # k+1 began after k ended
