"""The real `openai` package's `client.videos` drives the farm unchanged (issue #13, item 8),
and a rendered job tells its stage times and peak memory (body and Server-Timing)."""

from __future__ import annotations

import hashlib

import openai
import pytest

from farm.jobs import service as jobs
from tests.conftest import api_client

WAN_KNOBS = {"num_inference_steps": 2, "guidance_scale": 4.5, "guidance_scale_2": 2.5,
             "seed": 7, "fps": 16, "negative_prompt": "blurry"}


@pytest.fixture(scope="module")
def client(api_url, api_key):
    with openai.OpenAI(base_url=api_url + "/v1", api_key=api_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def rendered(client):
    """A tiny video made through the openai package: 0.3 s at 16 fps is 5 frames."""
    video = client.videos.create(prompt="a red circle drifting left", model="wan-tiny",
                                 size="64x64", seconds="0.3", extra_body=WAN_KNOBS)
    assert video.object == "video" and video.status in ("queued", "in_progress")
    return client.videos.poll(video.id, poll_interval_ms=250)


def test_create_poll_and_download_through_the_openai_package(client, rendered, db_url,
                                                             api_url):
    assert rendered.status == "completed" and rendered.progress == 100, rendered
    assert (rendered.size, rendered.seconds, rendered.model) == ("64x64", "0.3125", "wan-tiny")
    assert rendered.completed_at >= rendered.created_at
    content = client.videos.download_content(rendered.id).read()
    assert content[4:8] == b"ftyp"  # an MP4
    with api_client(api_url) as farm:
        job = farm.get(f"/v1/jobs/{rendered.id}").json()
    assert hashlib.sha256(content).hexdigest() == job["output_sha256"]
    assert (job["frames"], job["steps"], job["seed"]) == (5, 2, 7)
    saved = jobs.get_job(db_url, rendered.id)  # Wan2.2's two guidance scales, passed through
    assert (saved.guidance_high, saved.guidance_low, saved.negative_prompt) == \
        (4.5, 2.5, "blurry")
    listed = client.videos.list(limit=50)
    assert rendered.id in [v.id for v in listed.data]


def test_a_bad_request_names_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.videos.create(prompt="a red circle", model="wan-tiny", size="64by64")
    # OpenAI's error object (what the package prints and keeps as .body) names the field.
    assert "size: size must be WIDTHxHEIGHT" in str(bad.value) and "64by64" in str(bad.value)
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.UnprocessableEntityError) as odd:  # width not a multiple of 16
        client.videos.create(prompt="a red circle", model="wan-tiny", size="72x64")
    assert odd.value.body["param"] == "size" and "multiple of 16" in str(odd.value)
    with pytest.raises(openai.UnprocessableEntityError) as small:
        client.videos.create(prompt="a red circle", model="wan-tiny", size="32x64")
    assert "size: width: Input should be greater than or equal to 64" in str(small.value)
    with pytest.raises(openai.UnprocessableEntityError) as knob:
        client.videos.create(prompt="a red circle", model="wan-tiny", size="64x64",
                             extra_body={"num_inference_steps": 0})
    assert knob.value.body["param"] == "num_inference_steps"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("0" * 32)


def test_every_job_tells_its_stage_times(rendered, api_url):
    with api_client(api_url) as farm:
        resp = farm.get(f"/v1/jobs/{rendered.id}")
    times = resp.json()["stage_times"]
    assert set(times) == {"queue_wait", "load", "denoise", "decode", "encode", "stitch"}
    assert all(times[s] > 0 for s in ("queue_wait", "load", "denoise", "decode", "encode"))
    assert times["stitch"] >= 0
    assert resp.json()["peak_memory_bytes"] > 1 << 20  # the actor's peak: over a MiB
    timing = {}
    for entry in resp.headers["server-timing"].split(","):
        name, dur = entry.strip().split(";dur=")
        timing[name] = float(dur)
    assert timing == pytest.approx({s: v * 1000 for s, v in times.items()}, abs=0.06)


def test_delete_removes_the_video(client, api_url):
    video = client.videos.create(prompt="a blue square", model="wan-tiny", size="64x64",
                                 seconds="0.3", extra_body={"num_inference_steps": 1})
    done = client.videos.delete(video.id)  # live or finished: canceled, then deleted
    assert (done.id, done.deleted, done.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with api_client(api_url) as farm:
        assert farm.get(f"/v1/jobs/{video.id}").json()["state"] == "deleted"
    assert video.id not in [v.id for v in client.videos.list(limit=100).data]
