"""Storage on a real S3 server (SeaweedFS, tests/s3_server.py): round trip, listing,
batched removal, presigned URLs, and multipart uploads from an explicit threshold."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from farm.storage import Storage

PART = 5 * 1024**2  # S3's smallest part


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.make_bucket("farm-storage-tests")
    return Storage("s3://farm-storage-tests/unit", s3_server.options(), part_bytes=PART)


def test_files_round_trip_list_and_go(s3, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"chunk bytes" * 100)
    digest, size = s3.put_file(src, "jobs/j1/chunks/a.mp4")
    s3.put_file(src, "jobs/j1/video.mp4")
    assert (digest, size) == (hashlib.sha256(src.read_bytes()).hexdigest(), 1100)
    assert s3.list_keys("jobs/j1") == ["jobs/j1/chunks/a.mp4", "jobs/j1/video.mp4"]
    assert s3.sha256("jobs/j1/video.mp4") == digest and s3.local_path("jobs/j1/video.mp4") is None
    assert s3.get_file("jobs/j1/video.mp4", tmp_path / "back").read_bytes() == src.read_bytes()
    s3.remove_many(["jobs/j1/chunks/a.mp4", "jobs/j1/video.mp4", "jobs/j1/never"])
    assert s3.list_keys("jobs/j1") == [] and not s3.exists("jobs/j1/video.mp4")


def test_a_presigned_url_serves_the_file_without_keys_until_it_expires(s3, tmp_path):
    src = tmp_path / "v.mp4"
    src.write_bytes(os.urandom(4096))
    s3.put_file(src, "jobs/j2/video.mp4")
    url, expires = s3.signed_url("jobs/j2/video.mp4", 60)
    assert url.startswith("http://127.0.0.1:") and "Signature=" in url
    assert httpx.get(url).content == src.read_bytes()
    assert httpx.get(url.split("?")[0]).status_code == 403  # unsigned: refused
    with pytest.raises(ValueError, match="not S3"):
        Storage(f"file://{tmp_path}/local").signed_url("x", 60)


@pytest.mark.parametrize("size, multipart", [(2 * PART - 1, False), (2 * PART + 1024, True)])
def test_large_files_go_up_in_parts_from_the_threshold(s3, tmp_path, size, multipart):
    src = tmp_path / "big.mp4"
    src.write_bytes(os.urandom(size))
    assert s3.multipart_threshold == 2 * PART
    digest, _ = s3.put_file(src, f"jobs/j3/big-{size}.mp4")
    etag = s3.fs.info(f"{s3.root}/jobs/j3/big-{size}.mp4")["ETag"].strip('"')
    # A multipart object's ETag is "<md5 of the parts' md5s>-<parts>": here 3 parts.
    assert etag.endswith("-3") if multipart else "-" not in etag
    assert s3.sha256(f"jobs/j3/big-{size}.mp4") == digest
