"""Property-based fuzzing of the API (hypothesis), against a real database and broker:
1,200 generated requests, no 5xx, and every 422 names the field it is about."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from farm.jobs import keys
from farm.db.migrate import upgrade
from tests.conftest import REDIS_SCRATCH_DB

FIELDS = ["prompt", "negative_prompt", "model", "track", "project", "width", "height", "frames",
          "fps", "steps", "guidance", "seed", "priority", "deadline_s"]
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=60),
    st.sampled_from(["wan-toy", "wan-tiny", "wan2.2-t2v-a14b", "final", "draft", "default",
                     "a red circle", "\x00", "1280", "17", "22:00-06:00"]),
    st.lists(st.integers(), max_size=3),
)
VALID = {"prompt": "a red circle moving left", "model": "wan-tiny", "frames": 5, "steps": 1}
BODIES = (st.dictionaries(st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8), ANY,
                          max_size=8)
          # a valid body with one or two fields changed: the edges of every field's range
          | st.dictionaries(st.sampled_from(FIELDS), ANY | st.integers(-5, 5000), min_size=1,
                            max_size=2).map(lambda change: VALID | change))
QUERIES = st.dictionaries(st.sampled_from(["track", "width", "height", "frames", "fps",
                                           "priority", "batch", "project", "model", "steps",
                                           "deadline_s", "zoom"]),
                          st.text(max_size=12) | st.integers(-10, 5000).map(str), max_size=6)
BATCHES = st.fixed_dictionaries({"content": st.text(max_size=200)}, optional={
    "format": st.sampled_from(["jsonl", "csv", "xml"]), "window": ANY, "timezone": ANY,
    "defaults": st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=4)})
FUZZ = hyp_settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def client(settings, tmp_path_factory, redis_db):
    """The app on its own SQLite file and its own Redis database (no worker listens there):
    what the fuzzer gets accepted is queued and never rendered."""
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/farm.db"
    upgrade(url)
    _, key = keys.create_key(url, "fuzz", "hypothesis")
    # The suite's scratch database: no worker listens there, so nothing accepted renders.
    broker = f"redis://127.0.0.1:6379/{REDIS_SCRATCH_DB}"
    app_settings = settings.model_copy(update={"database_url": url, "rate_limit_per_minute": 0,
                                               "broker_url": broker, "result_backend": broker})
    from farm.api.app import create_app

    with TestClient(create_app(app_settings),
                    headers={"Authorization": f"Bearer {key}"}) as c:
        yield c
    import redis

    redis.Redis(db=REDIS_SCRATCH_DB).flushdb()


SENT = {"requests": 0, "by_status": {}}


def check(resp) -> None:
    SENT["requests"] += 1
    SENT["by_status"][resp.status_code] = SENT["by_status"].get(resp.status_code, 0) + 1
    assert resp.status_code < 500, resp.text
    if resp.status_code == 422:
        for item in resp.json()["detail"]:
            assert item["field"] and item["message"].startswith(f"{item['field']}:"), item


@FUZZ
@given(body=BODIES)
def test_fuzz_job_submissions(client, body):
    check(client.post("/v1/jobs", json=body))


@FUZZ
@given(query=QUERIES)
def test_fuzz_route_explain(client, query):
    check(client.get("/v1/routes/explain", params=query))


@FUZZ
@given(body=BATCHES)
def test_fuzz_batch_submissions(client, body):
    check(client.post("/v1/batches", json=body))


@hyp_settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(job_id=st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t and t not in
                                                      (".", "..")),
       picture=st.sampled_from(["thumbnail.jpg", "contact-sheet.jpg", "preview.webp"]))
def test_fuzz_picture_paths(client, job_id, picture):
    """The picture routes (issue #13, item 9) with any job id: never a 5xx."""
    resp = client.get(f"/v1/jobs/{quote(job_id, safe='')}/{picture}")
    check(resp)
    assert resp.status_code in (404, 409), (job_id, resp.status_code)


@hyp_settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(job_id=st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t and t not in
                                                      (".", "..")))
def test_fuzz_job_deletion(client, job_id):
    """DELETE /v1/jobs/{id} (issue #13, item 3) with any job id: never a 5xx."""
    resp = client.delete(f"/v1/jobs/{quote(job_id, safe='')}")
    check(resp)
    assert resp.status_code == 404, (job_id, resp.status_code)


@pytest.fixture(scope="module")
def held_job(client) -> str:
    return client.post("/v1/jobs", json=VALID | {"hold": True}).json()["id"]


@hyp_settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(body=st.one_of(
    st.none(), ANY, st.dictionaries(st.text(min_size=1, max_size=8), ANY, max_size=3),
    st.fixed_dictionaries({}, optional={"priority": ANY | st.integers(-5, 120),
                                        "hold": ANY | st.booleans()})))
def test_fuzz_job_patches(client, held_job, body):
    """PATCH /v1/jobs/{id} (issue #13, job controls) with any body: never a 5xx."""
    resp = client.patch(f"/v1/jobs/{held_job}", json=body)
    check(resp)
    assert resp.status_code in (200, 409, 422), (body, resp.text)


@hyp_settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(some_id=st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t and t not in
                                                       (".", "..")),
       kind=st.sampled_from(["jobs", "batches"]))
def test_fuzz_stream_paths(client, some_id, kind):
    """The event streams (issue #13, item 4) with any id: a 404 before any stream starts."""
    resp = client.get(f"/v1/{kind}/{quote(some_id, safe='')}/stream")
    check(resp)
    assert resp.status_code == 404, (some_id, resp.status_code)


@hyp_settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(webhook=ANY | st.sampled_from(["http://127.0.0.1:9/h", "ftp://127.0.0.1/h", "http://",
                                      "https://127.0.0.1/" + "p" * 2048]),
       events=ANY | st.lists(st.sampled_from(["start", "progress", "completed", "done"]),
                             max_size=4))
def test_fuzz_webhook_fields(client, webhook, events):
    """A job's webhook and webhook_events (issue #13, item 5): accepted or a named 422."""
    resp = client.post("/v1/jobs", json=VALID | {"webhook": webhook, "webhook_events": events})
    check(resp)
    assert resp.status_code in (202, 422), resp.text
    if resp.status_code == 422:
        assert {d["field"] for d in resp.json()["detail"]} <= {"webhook", "webhook_events"} | \
            {f"webhook_events.{i}" for i in range(4)}, resp.text


VIDEO_FIELDS = ["prompt", "model", "seconds", "size", "input_reference", "negative_prompt",
                "fps", "num_inference_steps", "guidance_scale", "guidance_scale_2", "seed",
                "priority", "track"]
VIDEO = {"prompt": "a red circle", "model": "wan-tiny", "size": "64x64", "seconds": "0.3"}


@hyp_settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
@given(change=st.dictionaries(st.sampled_from(VIDEO_FIELDS) | st.text(min_size=1, max_size=8),
                              ANY | st.sampled_from(["64x64", "1280x720", "0x0", "64", "12"]),
                              max_size=3))
def test_fuzz_video_submissions(client, change):
    """POST /v1/videos (issue #13, item 8), JSON or multipart as the openai package sends:
    never a 5xx, and a 422 names the field."""
    check(client.post("/v1/videos", json=VIDEO | change))
    form = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (VIDEO | change).items()}
    check(client.post("/v1/videos", data=form, files={"_": ("", b"")}))


def test_the_fuzzers_sent_over_a_thousand_requests_and_some_were_accepted():
    """Runs after the four above (file order): the sample is as large as promised, and not
    all of it bounced off validation."""
    print(f"fuzzed: {SENT}")
    assert SENT["requests"] >= 1000, SENT
    assert SENT["by_status"].get(202, 0) > 0 and SENT["by_status"].get(422, 0) > 0, SENT
