"""The two tracks end to end (issue #12): a draft of the toy model renders its shipped light
variant (4-step student, half-width decoder, int8) and a final the toy itself, through the API on the live farm."""

from __future__ import annotations

import pytest

from tests.conftest import api_client
from tests.e2e.test_pools import rendered
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e


def test_a_draft_renders_the_light_variant_and_a_final_the_base(api_url, db_url):
    body = {"prompt": "a red circle moving right on a black background", "model": "wan-toy",
            "frames": 17, "width": 64, "height": 64, "seed": 5}
    with api_client(api_url) as client:
        ids = {track: client.post("/v1/jobs", json={**body, "track": track}).json()["id"]
               for track in ("draft", "final")}
        jobs = {track: wait_for(client, job_id, {"succeeded", "failed"})
                for track, job_id in ids.items()}
    draft, final = jobs["draft"], jobs["final"]
    assert draft["state"] == final["state"] == "succeeded", (draft["error"], final["error"])
    assert (draft["model"], draft["route"]["track_of"], draft["steps"]) == \
        ("wan-toy-draft", "wan-toy", 4)
    assert (final["model"], final["route"]["track_of"], final["steps"]) == ("wan-toy", None, 20)
    assert draft["output_sha256"] != final["output_sha256"]
    # What `farm status` prints: the variant that ran, the rule's own choice, and the times.
    for job in (draft, final):
        assert job["run_seconds"] > 0 and job["queued_seconds"] >= 0
        assert job["route"]["est_seconds"] > 0
    assert draft["route"]["est_seconds"] < final["route"]["est_seconds"]
    # Each rendered on the cpu tier's pool of its own variant, the draft in less time.
    (d_index, d_group, d_began, d_ended), = rendered(db_url, ids["draft"])
    (f_index, f_group, f_began, f_ended), = rendered(db_url, ids["final"])
    assert "wan-toy-draft" in d_group and "wan-toy-draft" not in f_group, (d_group, f_group)
    assert d_ended - d_began < f_ended - f_began
