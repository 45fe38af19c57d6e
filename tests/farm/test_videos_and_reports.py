"""Issue #13 review fixes in the OpenAI-style videos mapping (expires_at, the ``after``
cursor scoped to the caller's project) and in batch reports (a job answered from the
result cache links its source's pictures). Real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta

from farm.db.session import session_scope
from farm.db.tables import Job, utcnow
from farm.jobs import reports, retention, videos
from farm.jobs.pictures import THUMBNAIL, picture_key
from farm.storage import Storage
from tests.farm.test_retention import make_job, put


def test_expires_at_is_the_jobs_in_unix_seconds(db_url):
    job_id = make_job(db_url, "succeeded", timedelta(hours=1), [])
    due = utcnow().replace(microsecond=0) + timedelta(days=30)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert videos.to_video(job)["expires_at"] is None  # not stamped yet
        job.expires_at = due
        assert videos.to_video(job)["expires_at"] == int(due.timestamp())
        job.expires_at = retention.FOREVER  # retain_days 0: kept forever
        assert videos.to_video(job)["expires_at"] is None


def test_an_after_cursor_from_another_project_is_no_cursor(db_url):
    mine, theirs = f"vid-{uuid.uuid4().hex[:8]}", f"vid-{uuid.uuid4().hex[:8]}"
    ids = [make_job(db_url, "succeeded", timedelta(minutes=m), [], project=mine)
           for m in (30, 20, 10)]  # created oldest first
    foreign = make_job(db_url, "succeeded", timedelta(minutes=15), [], project=theirs)
    page, more = videos.list_page(db_url, mine, foreign, 10, "asc")
    assert [j.id for j in page] == ids and not more  # nothing learned from their job
    page, more = videos.list_page(db_url, mine, ids[0], 1, "asc")
    assert [j.id for j in page] == [ids[1]] and more  # its own cursor still pages


def test_a_cached_jobs_report_links_its_sources_pictures(tmp_path):
    storage = Storage(f"file://{tmp_path}/store")
    source, cached = uuid.uuid4().hex, uuid.uuid4().hex
    put(storage, tmp_path, picture_key(source, THUMBNAIL))
    assert reports._pictures(storage, source, None) == f"../../jobs/{source}"
    assert reports._pictures(storage, cached, source) == f"../../jobs/{source}"
    assert reports._pictures(storage, cached, None) is None
    put(storage, tmp_path, picture_key(cached, THUMBNAIL))  # its own, made since
    assert reports._pictures(storage, cached, source) == f"../../jobs/{cached}"
