"""Retention (issue #13, item 3) on the real PostgreSQL: what the database names stays, what
it no longer names goes; expiry by project and job; DELETE's service; idempotency keys;
scratch folders; the integrity check."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from farm.db.session import session_scope
from farm.db.tables import CacheEntry, IdempotencyRecord, Job, Segment, utcnow
from farm.jobs import events, integrity, retention
from farm.jobs.pictures import PICTURES
from farm.jobs import service as jobs
from farm.storage import Storage

DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def db_url(own_pg):
    """This module's own database: the session farm's housekeeping beat sweeps the session's
    database with its own storage and settings, and would settle these jobs first."""
    return own_pg


@pytest.fixture()
def env(settings, db_url, tmp_path):
    """Settings on the session's database with this test's own storage and scratch folder."""
    local = settings.model_copy(update={"database_url": db_url,
                                        "storage_url": f"file://{tmp_path}/store",
                                        "work_dir": tmp_path / "work", "retain_days": 30,
                                        "retain_days_by_project": {}, "keep_chunks": False,
                                        # re-hashed only where a test asks: the session's
                                        # other jobs' files are not in this storage
                                        "verify_per_tick": 0})
    return local, Storage(local.storage_url)


def put(storage: Storage, tmp, *keys: str) -> None:
    for key in keys:
        src = tmp / "src.bin"
        src.write_bytes(key.encode())
        storage.put_file(src, key)


def make_job(db: str, state: str, ago: timedelta | None, segments: list[dict],
             project: str = "retention", **fields) -> str:
    """A job row as the farm leaves it; ``ago``: how long since it finished."""
    job_id = uuid.uuid4().hex
    now = utcnow()
    finished = None if ago is None else now - ago
    with session_scope(db) as session:
        session.add(Job(id=job_id, state=state, prompt="p", model="wan-tiny", width=64,
                        height=64, frames=5, fps=16, steps=2, guidance_high=4.0,
                        guidance_low=3.0, seed=1, project=project, route={},
                        created_at=(finished or now) - timedelta(minutes=1),
                        finished_at=finished, **fields))
        for i, seg in enumerate(segments):
            session.add(Segment(job_id=job_id, index=i, frame_start=0, render_frames=5,
                                skip_frames=0, seed=1, **seg))
    return job_id


def chunk(job_id: str, i: int, attempt: int = 1) -> str:
    return f"jobs/{job_id}/chunks/s{i:04d}_a{attempt:02d}_c0000.mp4"


def seam(job_id: str, i: int, attempt: int = 1) -> str:
    return f"jobs/{job_id}/seams/s{i:04d}_a{attempt:02d}_last.npy"


def test_what_the_database_names_stays_and_nothing_else(env, db_url, tmp_path):
    settings, storage = env
    j = {}
    # Succeeded 40 days ago: expires; its stray attempt goes with it.
    j["old"] = make_job(db_url, "succeeded", 40 * DAY, [{"state": "done", "attempts": 1}])
    # Succeeded an hour ago: keeps video and thumbnail; its chunks, seam, .part go.
    j["new"] = make_job(db_url, "succeeded", timedelta(hours=1),
                        [{"state": "done", "attempts": 1}, {"state": "done", "attempts": 1}])
    # Failed: its done segment's chunk and seam stay (a retry continues); the failed one's go.
    j["failed"] = make_job(db_url, "failed", timedelta(hours=1),
                           [{"state": "done", "attempts": 1}, {"state": "failed", "attempts": 2}])
    # Deleted earlier, files left behind by a crash mid-removal: all go.
    j["deleted"] = make_job(db_url, "deleted", 2 * DAY, [{"state": "done", "attempts": 1}],
                            deleted_at=utcnow() - DAY)
    # Settled now, but a segment is a cache entry: its chunk and last frame stay.
    j["cached"] = make_job(db_url, "succeeded", timedelta(hours=1),
                           [{"state": "done", "attempts": 1}, {"state": "done", "attempts": 1}])
    # Expired 40 days ago; a newer job was answered with its video (cached_from): it stays.
    j["lender"] = make_job(db_url, "succeeded", 40 * DAY, [{"state": "done", "attempts": 1}])
    # Still rendering: everything under it stays.
    j["live"] = make_job(db_url, "running", None, [{"state": "running", "attempts": 1}])
    video = {k: f"jobs/{v}/video.mp4" for k, v in j.items()}
    j["borrower"] = make_job(db_url, "succeeded", timedelta(hours=1),
                             [{"state": "done", "attempts": 0, "cached_from": j["lender"]}],
                             cached_from=j["lender"], output_key=video["lender"])
    with session_scope(db_url) as session:
        for name in ("old", "new", "cached", "lender"):
            job = session.get(Job, j[name])
            job.output_key, job.output_sha256 = video[name], "0" * 64
            for seg in job.segments:
                seg.chunk_keys = [chunk(job.id, seg.index)]
        for name in ("failed", "deleted", "live"):
            for seg in session.get(Job, j[name]).segments:
                seg.chunk_keys = [chunk(j[name], seg.index, seg.attempts)]
        session.add(CacheEntry(key=uuid.uuid4().hex, kind="video", project="retention",
                               job_id=j["cached"], keys=[video["cached"]], bytes=1))
        session.add(CacheEntry(key=uuid.uuid4().hex, kind="segment", project="retention",
                               job_id=j["cached"], segment_index=0,
                               keys=[chunk(j["cached"], 0)], seam_key=seam(j["cached"], 0),
                               bytes=1))
    expected = {video["new"], f"jobs/{j['new']}/thumbnail.jpg",
                chunk(j["failed"], 0), seam(j["failed"], 0),
                video["cached"], chunk(j["cached"], 0), seam(j["cached"], 0),
                video["lender"],
                chunk(j["live"], 0), seam(j["live"], 0), f"jobs/{j['live']}/x.part-1234"}
    orphans = {chunk(j["old"], 0, 2), f"jobs/{j['old']}/thumbnail.jpg", video["old"],
               chunk(j["old"], 0), chunk(j["new"], 0), chunk(j["new"], 1), seam(j["new"], 0),
               f"jobs/{j['new']}/video.mp4.part-abcd1234", chunk(j["failed"], 1, 2),
               chunk(j["failed"], 1, 1), video["deleted"], chunk(j["deleted"], 0),
               chunk(j["cached"], 1), f"jobs/{j['cached']}/x.part-1",
               chunk(j["lender"], 0)}
    put(storage, tmp_path, *expected, *orphans)

    swept = retention.sweep(settings)

    assert swept["webhooks_pruned"] >= 0 and -1 not in swept.values()
    assert set(storage.list_keys("jobs")) == expected
    states = {name: jobs.get_job(db_url, job_id) for name, job_id in j.items()}
    assert {n for n, job in states.items() if job.state == "deleted"} == \
        {"old", "deleted", "lender"}
    assert states["old"].output_key == video["old"] and states["old"].deleted_at is not None
    assert [s.chunk_keys for s in states["new"].segments] == [[], []]  # stitched: dropped
    assert states["failed"].segments[0].chunk_keys == [chunk(j["failed"], 0)]
    assert [e.kind for e in events.list_events(db_url, j["old"])] == [retention.DELETED]
    retention.sweep(settings)  # a second pass changes nothing
    assert set(storage.list_keys("jobs")) == expected


def test_expiry_follows_the_project_and_the_job(env, db_url):
    settings, storage = env
    settings = settings.model_copy(update={"retain_days_by_project": {"short-lived": 1}})
    short = make_job(db_url, "succeeded", 2 * DAY, [], project="short-lived")
    default = make_job(db_url, "succeeded", 2 * DAY, [])
    forever = make_job(db_url, "failed", 400 * DAY, [], retain_days=0)
    own = make_job(db_url, "canceled", 3 * DAY, [], project="short-lived", retain_days=5)
    retention.sweep(settings)
    after = {k: jobs.get_job(db_url, v) for k, v in
             dict(short=short, default=default, forever=forever, own=own).items()}
    assert {k: j.state for k, j in after.items()} == {
        "short": "deleted", "default": "succeeded", "forever": "failed", "own": "canceled"}
    assert after["forever"].expires_at == retention.FOREVER
    assert after["own"].expires_at == after["own"].finished_at + 5 * DAY
    assert after["default"].expires_at == after["default"].finished_at + 30 * DAY


def test_delete_refuses_live_jobs_and_keeps_the_record(env, db_url, tmp_path):
    settings, storage = env
    live = make_job(db_url, "queued", None, [])
    assert not retention.delete_job_files(settings, live, "test")
    assert jobs.get_job(db_url, live).state == "queued"
    done = make_job(db_url, "succeeded", timedelta(hours=1), [], output_key="x")
    with session_scope(db_url) as session:
        session.get(Job, done).output_key = f"jobs/{done}/video.mp4"
    put(storage, tmp_path, f"jobs/{done}/video.mp4", f"jobs/{done}/thumbnail.jpg")
    assert retention.delete_job_files(settings, done, "by request")
    assert storage.list_keys(f"jobs/{done}") == []
    job = jobs.get_job(db_url, done)
    assert (job.state, job.prompt, job.output_key) == ("deleted", "p", f"jobs/{done}/video.mp4")
    assert retention.delete_job_files(settings, done, "again")  # harmless, no second event
    assert [e.message for e in events.list_events(db_url, done)] == ["by request"]


def test_old_idempotency_keys_go(env, db_url):
    settings, _ = env
    job = make_job(db_url, "queued", None, [])
    with session_scope(db_url) as session:
        session.add(IdempotencyRecord(project="retention", key="old", body_sha256="x",
                                      job_id=job, created_at=utcnow() - 8 * DAY))
        session.add(IdempotencyRecord(project="retention", key="new", body_sha256="x",
                                      job_id=job, created_at=utcnow() - 6 * DAY))
    assert retention.prune_idempotency(settings, utcnow()) >= 1
    with session_scope(db_url) as session:
        left = {r.key for r in session.query(IdempotencyRecord)
                .filter(IdempotencyRecord.project == "retention")}
    assert left == {"new"}


def test_scratch_folders_no_task_can_own_go(env, db_url):
    settings, _ = env
    live, ended = make_job(db_url, "running", None, []), \
        make_job(db_url, "failed", timedelta(hours=1), [])
    names = {"live": f"{live}-s0-abc", "live-stitch": f"stitch-{live}-xyz",
             "ended": f"{ended}-s1-def", "ended-fresh": f"stitch-{ended}-new",
             "ancient": f"{live}-s2-old", "unknown": "notes"}
    for name in names.values():
        (settings.work_dir / name).mkdir(parents=True)
    now = time.time()
    for key in ("live", "live-stitch", "ended", "unknown"):
        os.utime(settings.work_dir / names[key], (now - 2 * settings.lease_s,) * 2)
    os.utime(settings.work_dir / names["ancient"], (now - settings.task_time_limit_s - 1,) * 2)
    removed = retention.sweep_scratch(settings, now)
    assert sorted(removed) == sorted([names["ended"], names["ancient"]])
    assert sorted(p.name for p in settings.work_dir.iterdir()) == sorted(
        [names["live"], names["live-stitch"], names["ended-fresh"], names["unknown"]])


def test_the_integrity_check_finds_a_changed_video(env, db_url, tmp_path):
    settings, storage = env
    job_id = make_job(db_url, "succeeded", timedelta(hours=1), [])
    key = f"jobs/{job_id}/video.mp4"
    src = tmp_path / "v.mp4"
    src.write_bytes(b"video" * 100)
    digest, _ = storage.put_file(src, key)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        job.output_key, job.output_sha256 = key, digest
        job.verified_at = utcnow() - 1000 * DAY  # first in the rotation
    assert integrity.verify_outputs(settings, limit=1) == []
    assert jobs.get_job(db_url, job_id).verified_at > utcnow() - DAY
    storage.local_path(key).write_bytes(b"tampered")
    with session_scope(db_url) as session:
        session.get(Job, job_id).verified_at = utcnow() - 1000 * DAY
    assert integrity.verify_outputs(settings, limit=1) == [job_id]
    job = jobs.get_job(db_url, job_id)
    assert integrity.is_corrupt(job) and "does not match its recorded sha256" in job.error
    assert [e.kind for e in events.list_events(db_url, job_id)] == [integrity.OUTPUT_CORRUPT]


def entries_of(db: str, job_id: str) -> list[CacheEntry]:
    with session_scope(db) as session:
        return list(session.scalars(select(CacheEntry).where(CacheEntry.job_id == job_id)))


def test_a_deleted_source_keeps_only_what_live_jobs_borrowed(env, db_url, tmp_path):
    """Issue #13 review: deleting a job drops its cache entries in the same transaction, so
    its files go unless a live job borrowed them; the borrower's deletion sweeps the
    source's prefix again."""
    settings, storage = env
    hour = timedelta(hours=1)
    source = make_job(db_url, "succeeded", hour, [{"state": "done", "attempts": 1},
                                                  {"state": "done", "attempts": 1}])
    video = f"jobs/{source}/video.mp4"
    cached = make_job(db_url, "succeeded", hour, [{"state": "done", "cached_from": source}],
                      cached_from=source, output_key=video)
    reuser = make_job(db_url, "failed", hour, [{"state": "done", "cached_from": source}])
    with session_scope(db_url) as session:
        job = session.get(Job, source)
        job.output_key = video
        for seg in job.segments:
            seg.chunk_keys = [chunk(source, seg.index)]
        session.get(Job, reuser).segments[0].chunk_keys = [chunk(source, 0)]
        session.add(CacheEntry(key=uuid.uuid4().hex, kind="video", project="retention",
                               job_id=source, keys=[video], bytes=1))
        session.add(CacheEntry(key=uuid.uuid4().hex, kind="segment", project="retention",
                               job_id=source, segment_index=1, keys=[chunk(source, 1)],
                               bytes=0))
    own_thumb = f"jobs/{cached}/thumbnail.jpg"  # made by the picture route from the video
    put(storage, tmp_path, video, chunk(source, 0), chunk(source, 1),
        f"jobs/{source}/thumbnail.jpg", own_thumb)

    assert retention.delete_job_files(settings, source, "by request")
    assert entries_of(db_url, source) == []
    # The cached job's video and the reused chunk stay; the rest of the source's goes.
    assert set(storage.list_keys("jobs")) == {video, chunk(source, 0), own_thumb}

    assert retention.delete_job_files(settings, cached, "by request")
    assert set(storage.list_keys("jobs")) == {chunk(source, 0)}
    assert retention.delete_job_files(settings, reuser, "by request")
    assert storage.list_keys("jobs") == []


def test_prune_files_is_safe_for_a_job_in_any_state(env, db_url, tmp_path):
    """The cache's eviction calls prune_files with any jobs: a live one loses nothing, a
    succeeded one keeps its video, pictures and listed chunks, a deleted or unknown one
    keeps only what another job names."""
    settings, storage = env
    live = make_job(db_url, "running", None, [{"state": "running", "attempts": 1}])
    done = make_job(db_url, "succeeded", timedelta(minutes=1),  # not settled yet
                    [{"state": "done", "attempts": 1}])
    gone = make_job(db_url, "deleted", DAY, [], deleted_at=utcnow())
    unknown = uuid.uuid4().hex
    make_job(db_url, "succeeded", timedelta(hours=1), [], cached_from=gone,
             output_key=f"jobs/{gone}/video.mp4")
    with session_scope(db_url) as session:
        job = session.get(Job, done)
        job.output_key = f"jobs/{done}/video.mp4"
        job.segments[0].chunk_keys = [chunk(done, 0)]
    kept = {f"jobs/{live}/x.part-1234", chunk(live, 0), f"jobs/{done}/video.mp4",
            *(f"jobs/{done}/{name}" for name in PICTURES), chunk(done, 0),
            f"jobs/{gone}/video.mp4"}
    stray = {chunk(done, 0, 2), f"jobs/{done}/video.mp4.part-abcd", chunk(gone, 0),
             f"jobs/{gone}/thumbnail.jpg", f"jobs/{unknown}/video.mp4"}
    put(storage, tmp_path, *kept, *stray)
    assert retention.prune_files(settings, storage, {live, done, gone, unknown}) == len(stray)
    assert set(storage.list_keys("jobs")) == kept


def test_a_corrupt_file_marks_every_job_that_shares_it(env, db_url, tmp_path):
    settings, storage = env
    source = make_job(db_url, "succeeded", timedelta(hours=1), [])
    key = f"jobs/{source}/video.mp4"
    src = tmp_path / "v.mp4"
    src.write_bytes(b"video" * 100)
    digest, _ = storage.put_file(src, key)
    cached = make_job(db_url, "succeeded", timedelta(hours=1), [], cached_from=source,
                      output_key=key, output_sha256=digest)
    with session_scope(db_url) as session:
        job = session.get(Job, source)
        job.output_key, job.output_sha256 = key, digest
        for job_id in (source, cached):  # first in the rotation
            session.get(Job, job_id).verified_at = utcnow() - 2000 * DAY
    storage.local_path(key).write_bytes(b"tampered")
    assert not integrity.verify_job(settings, cached)  # checked through the cached job
    both = [jobs.get_job(db_url, j) for j in (source, cached)]
    assert all(integrity.is_corrupt(j) and not integrity.servable(j) for j in both)
    assert all(j.error.startswith(integrity.CORRUPT_PREFIX) for j in both)
    assert [e.kind for e in events.list_events(db_url, source)] == [integrity.OUTPUT_CORRUPT]
    storage.put_file(src, key)  # restored
    with session_scope(db_url) as session:
        for job_id in (source, cached):
            session.get(Job, job_id).verified_at = utcnow() - 2000 * DAY
    assert integrity.verify_outputs(settings, limit=2) == []  # one hash for both
    both = [jobs.get_job(db_url, j) for j in (source, cached)]
    assert all(integrity.servable(j) and j.error is None for j in both)
    assert all(j.verified_at > utcnow() - DAY for j in both)


def test_a_job_error_that_is_not_the_checks_is_no_corruption():
    job = Job(state="succeeded", error="stored video is fine; a note from elsewhere")
    assert integrity.servable(job) and not integrity.is_corrupt(job)
    job.error = integrity.corrupt_message("jobs/x/video.mp4", "a" * 64, None)
    assert integrity.is_corrupt(job) and not integrity.servable(job)
