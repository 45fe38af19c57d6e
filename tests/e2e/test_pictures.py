"""A finished job's pictures (issue #13, item 9): thumbnail, contact sheet and animated
preview, made with ffmpeg from the stored video and stored beside it."""

from __future__ import annotations

import subprocess

import pytest

from farm.storage import Storage
from tests.conftest import api_client
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e

BODY = {"prompt": "a red circle moving right on a black background", "model": "wan-toy",
        "track": "final", "frames": 17, "steps": 2, "seed": 3, "width": 320, "height": 240}


@pytest.fixture(scope="module")
def finished(api_url):
    with api_client(api_url) as client:
        job = wait_for(client, client.post("/v1/jobs", json=BODY).json()["id"],
                       {"succeeded", "failed"})
    assert job["state"] == "succeeded", job["error"]
    return job


def size_of(path) -> tuple[int, int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    width, height = out.strip().split(",")[:2]
    return int(width), int(height)


def test_thumbnail_contact_sheet_and_preview(api_url, finished, settings, tmp_path):
    storage = Storage(settings.storage_url)
    sheet_key = f"jobs/{finished['id']}/contact-sheet.jpg"
    assert not storage.exists(sheet_key)  # made when first asked for, not at stitch time
    with api_client(api_url) as client:
        got = {}
        for name, kind in (("thumbnail.jpg", "image/jpeg"), ("contact-sheet.jpg", "image/jpeg"),
                           ("preview.webp", "image/webp")):
            resp = client.get(f"/v1/jobs/{finished['id']}/{name}")
            assert resp.status_code == 200, (name, resp.text)
            assert resp.headers["content-type"] == kind
            (tmp_path / name).write_bytes(resp.content)
            got[name] = resp.content
        again = client.get(f"/v1/jobs/{finished['id']}/contact-sheet.jpg")
    assert got["thumbnail.jpg"][:2] == got["contact-sheet.jpg"][:2] == b"\xff\xd8"
    assert size_of(tmp_path / "thumbnail.jpg") == (320, 240)
    # 12 of the 17 frames, 4 to a row, 160 pixels wide each (320x240 scales to 160x120).
    assert size_of(tmp_path / "contact-sheet.jpg") == (4 * 160, 3 * 120)
    webp = got["preview.webp"]
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP" and b"ANIM" in webp
    assert webp.count(b"ANMF") >= 8  # an animation: a frame chunk per frame kept
    assert storage.exists(sheet_key) and again.content == got["contact-sheet.jpg"]


def test_a_job_without_a_video_has_no_pictures(api_url):
    with api_client(api_url) as client:
        queued = client.post("/v1/jobs", json={**BODY, "model": "wan2.2-t2v-a14b"}).json()
        try:
            resp = client.get(f"/v1/jobs/{queued['id']}/contact-sheet.jpg")
            assert resp.status_code == 409 and "has no video to picture" in resp.text
            assert client.get("/v1/jobs/nope/preview.webp").status_code == 404
        finally:
            client.post(f"/v1/jobs/{queued['id']}/cancel")


def test_a_job_answered_from_the_cache_gets_pictures_of_its_own(api_url, finished, settings):
    """The same request again is answered with the first job's video (no stitch, so no
    thumbnail of its own): the route makes its pictures under its own prefix, where
    retention names them (issue #13 review)."""
    storage = Storage(settings.storage_url)
    with api_client(api_url) as client:
        created = client.post("/v1/jobs", json=BODY).json()
        cached = client.get(f"/v1/jobs/{created['id']}").json()
        assert cached["cached_from"] == finished["id"] and cached["state"] == "succeeded"
        resp = client.get(f"/v1/jobs/{cached['id']}/thumbnail.jpg")
    assert resp.status_code == 200 and resp.content[:2] == b"\xff\xd8"
    assert storage.exists(f"jobs/{cached['id']}/thumbnail.jpg")
