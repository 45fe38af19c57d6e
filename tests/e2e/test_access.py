"""Access to the farm: every route but /healthz needs a key; a project never sees another's
jobs; idempotent submission; rate limits and body limits."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from farm.jobs import keys
from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for

TINY = {"prompt": "a red circle", "model": "wan-tiny", "frames": 5, "steps": 1}


@pytest.fixture(scope="module")
def owned(api_url, db_url):
    """A finished job and batch of the project `default`, and keys to try them with."""
    with api_client(api_url) as client:
        job = wait_for(client, client.post("/v1/jobs", json=TINY).json()["id"],
                       {"succeeded", "failed"})
        batch = client.post("/v1/batches", json={"content": '{"prompt": "a blue square"}\n',
                                                 "defaults": TINY}).json()["id"]
    _, other = keys.create_key(db_url, "other-project", "access tests")
    record, revoked = keys.create_key(db_url, "default", "to revoke")
    assert keys.revoke_key(db_url, record.id)
    return {"job": job["id"], "batch": batch, "other": other, "revoked": revoked}


def routes(o):
    job, batch = o["job"], o["batch"]
    return [("POST", "/v1/jobs", TINY), ("GET", "/v1/jobs", None),
            ("GET", f"/v1/jobs/{job}", None), ("GET", f"/v1/jobs/{job}/events", None),
            ("POST", f"/v1/jobs/{job}/cancel", None), ("GET", f"/v1/jobs/{job}/video", None),
            ("GET", f"/v1/jobs/{job}/thumbnail.jpg", None),
            ("GET", f"/v1/jobs/{job}/contact-sheet.jpg", None),
            ("GET", f"/v1/jobs/{job}/preview.webp", None),
            ("DELETE", f"/v1/jobs/{job}", None),
            ("POST", "/v1/batches", {"content": '{"prompt": "x"}\n', "defaults": TINY}),
            ("GET", f"/v1/batches/{batch}", None), ("GET", f"/v1/batches/{batch}/report.csv", None),
            ("GET", f"/v1/batches/{batch}/report.html", None),
            ("POST", f"/v1/jobs/{job}/retry", None), ("PATCH", f"/v1/jobs/{job}", {"hold": True}),
            ("POST", f"/v1/batches/{batch}/cancel", None),
            ("POST", f"/v1/batches/{batch}/retry-failed", None),
            ("GET", f"/v1/jobs/{job}/stream", None), ("GET", f"/v1/batches/{batch}/stream", None),
            ("POST", "/v1/webhook-secret", None),
            ("POST", "/v1/videos", {"prompt": "x", "model": "wan-tiny", "size": "64x64"}),
            ("GET", "/v1/videos", None), ("GET", f"/v1/videos/{job}", None),
            ("GET", f"/v1/videos/{job}/content", None), ("DELETE", f"/v1/videos/{job}", None),
            ("GET", "/v1/routes/explain", None), ("GET", "/v1/farm", None)]


def test_the_access_tests_try_every_route_of_the_api(owned):
    """A route added to the API without being added above fails here."""
    from farm.api.app import create_app

    paths = create_app().openapi()["paths"]
    served = {(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1")
              for method in ops}
    tried = {(method, path.replace(owned["job"], "{job_id}").replace(owned["batch"], "{batch_id}")
              .replace("report.csv", "report.{kind}").replace("report.html", "report.{kind}"))
             for method, path, _ in routes(owned)}
    assert served == tried


@pytest.mark.parametrize("who", ["none", "revoked", "garbage"])
def test_every_route_needs_a_valid_key(api_url, owned, who):
    key = {"none": "", "revoked": owned["revoked"], "garbage": "farm_0000_nope"}[who]
    with api_client(api_url, key) as client:
        for method, path, body in routes(owned):
            resp = client.request(method, path, json=body)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
        assert client.get("/healthz").status_code == 200


def test_another_projects_key_never_reaches_the_jobs(api_url, owned):
    with api_client(api_url, owned["other"]) as client:
        for method, path, _ in routes(owned):
            if owned["job"] in path or owned["batch"] in path:
                assert client.request(method, path).status_code == 403, path
        listed = client.get("/v1/jobs", params={"limit": 200}).json()
        assert owned["job"] not in [j["id"] for j in listed["items"]]
        resp = client.post("/v1/jobs", json=TINY | {"project": "default"})
        assert resp.status_code == 403 and "belongs to project 'other-project'" in resp.text
    with api_client(api_url) as mine:  # the owner still can, and the job is untouched
        job = mine.get(f"/v1/jobs/{owned['job']}").json()
        assert job["state"] == "succeeded" and mine.get(job["output_url"]).status_code == 200


def test_idempotency_key_returns_the_same_job(api_url, owned):
    body = TINY | {"seed": 11}
    with api_client(api_url) as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        changed = client.post("/v1/jobs", json=body | {"seed": 12},
                              headers={"Idempotency-Key": "retry-1"})
        assert changed.status_code == 409 and first.json()["id"] in changed.text
    with api_client(api_url, owned["other"]) as other:  # keys are per project
        theirs = other.post("/v1/jobs", json=body | {"project": "other-project"},
                            headers={"Idempotency-Key": "retry-1"})
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_rate_limit_and_body_limit(settings, db_url):
    from farm.api.app import create_app

    _, key = keys.create_key(db_url, "rate-limited", "access tests")
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 2,
                                                 "max_body_bytes": 4000}))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        body = TINY | {"model": "wan2.2-t2v-a14b"}  # stays queued: nothing renders it here
        ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
        third = client.post("/v1/jobs", json=body)
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        huge = client.post("/v1/jobs", json=TINY | {"negative_prompt": "x" * 5000})
        assert huge.status_code == 413
        assert huge.json()["detail"][0]["field"] == "body"
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_a_stored_video_that_changed_is_not_served(api_url, owned, settings):
    from farm.jobs import integrity
    from farm.storage import Storage

    with api_client(api_url) as client:
        job = client.get(f"/v1/jobs/{owned['job']}").json()
        assert client.get(job["output_url"]).status_code == 200
        from farm.jobs import service as jobs

        key = jobs.get_job(settings.database_url, owned["job"]).output_key
        path = Storage(settings.storage_url).local_path(key)
        original = path.read_bytes()
        try:
            path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one bit flipped
            # Not re-hashed per download (issue #13): the scheduled integrity check finds it.
            assert not integrity.verify_job(settings, owned["job"])
            resp = client.get(job["output_url"])
            assert resp.status_code == 500 and "does not match its recorded sha256" in resp.text
        finally:
            path.write_bytes(original)
        assert integrity.verify_job(settings, owned["job"])
        assert client.get(job["output_url"]).status_code == 200


def test_database_unreachable_is_503_with_retry_after(settings, api_key):
    from farm.api.app import create_app

    down = settings.model_copy(update={
        "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    client = TestClient(create_app(down), headers={"Authorization": f"Bearer {api_key}"})
    for path in ("/v1/jobs", "/v1/jobs/0123456789abcdef"):
        resp = client.get(path)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text


def test_prompts_over_the_models_token_limit_are_refused(api_url):
    """wan-toy's text encoder reads 32 tokens: a longer prompt would be cut without a word."""
    long = " ".join(["red circle moving left"] * 12)
    with api_client(api_url) as client:
        resp = client.post("/v1/jobs", json={"prompt": long, "model": "wan-toy"})
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"][0]
        # A draft of wan-toy routes to wan-toy-draft (issue #12), whose encoder is the toy's.
        assert detail["field"] == "prompt" and \
            "wan-toy-draft reads at most 32" in detail["message"]
        resp = client.post("/v1/batches", json={"content": '{"prompt": "%s"}\n' % long,
                                                "defaults": {"model": "wan-toy"}})
        assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == \
            "content.line1.prompt"
        ok = client.post("/v1/jobs", json={"prompt": "a red circle moving left",
                                           "model": "wan-toy", "frames": 5, "steps": 1})
        assert ok.status_code == 202
