"""The result cache (issue #13, item 1) on PostgreSQL: what its key covers, whole-video and
segment hits, and eviction. The live farm's hit path is in tests/e2e/test_result_cache.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from farm.db.session import session_scope
from farm.db.tables import CacheEntry, Job, Segment
from farm.jobs import cache_upkeep, result_cache, service as jobs
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from farm.storage import Storage
from farm.tasks.seams import last_frame_key


@pytest.fixture
def cache_settings(settings, own_pg, tmp_path):
    return settings.model_copy(update={"database_url": own_pg,
                                       "storage_url": f"file://{tmp_path}/storage"})


def unsaved(**fields) -> Job:
    request = JobCreate(**({"prompt": "a red circle", "frames": 17, "model": "wan-tiny",
                            "seed": 7, "width": 64, "height": 64} | fields))
    return jobs.new_job(request, route_request(request, {}), "sha")


def key(settings, **fields) -> str:
    return result_cache.job_keys(settings, unsaved(**fields))[0]


def test_key_covers_what_changes_the_video_and_ignores_spelling(cache_settings):
    base = key(cache_settings)
    assert key(cache_settings, prompt="  a  red\tcircle ") == base  # whitespace normalised
    changed = [key(cache_settings, **f) for f in (
        {"seed": 8}, {"prompt": "a blue circle"}, {"negative_prompt": "blur"}, {"steps": 3},
        {"width": 128}, {"frames": 21}, {"fps": 8}, {"guidance": 2.0}, {"project": "other"},
        {"model": "wan-toy"}, {"continuous": False})]
    assert base not in changed and len(set(changed)) == len(changed)
    encoder = cache_settings.model_copy(update={"x264_crf": 23})
    assert key(encoder) != base


def test_key_follows_the_weights(cache_settings, tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "w.safetensors").write_bytes(b"\0" * 64)
    first = result_cache.folder_fingerprint(folder)
    assert result_cache.folder_fingerprint(folder) == first
    (folder / "transformer" / "w.safetensors").write_bytes(b"\1" * 64)
    assert result_cache.folder_fingerprint(folder) == first  # not listed again at once
    result_cache._recent.clear()  # RELIST_S later
    assert result_cache.folder_fingerprint(folder) != first


def store_succeeded(settings, job: Job, video: bytes = b"mp4 bytes") -> Job:
    """``job`` saved and succeeded with a stored video and chunks, as the stitcher leaves it."""
    storage = Storage(settings.storage_url)
    src = Path(settings.storage_url.removeprefix("file://")).parent / f"{job.id}.bin"
    src.write_bytes(video)
    sha, size = storage.put_file(src, f"jobs/{job.id}/video.mp4")
    for seg in job.segments:
        seg.chunk_keys = [f"jobs/{job.id}/chunks/s{seg.index}.ts"]
        storage.put_file(src, seg.chunk_keys[0])
        seg.state, seg.progress = "done", 1.0
        seam = Path(src.parent / f"{job.id}-{seg.index}.npy")
        np.save(seam, np.full((4, 4, 3), seg.index, np.uint8))
        storage.put_file(seam, last_frame_key(job.id, seg.index, seg.attempts))
    job.state, job.output_key, job.output_sha256, job.output_bytes = \
        "succeeded", f"jobs/{job.id}/video.mp4", sha, size
    jobs.add_jobs(settings.database_url, [job])
    return job


def test_a_repeat_is_answered_whole_and_counted(cache_settings):
    first = unsaved(prompt="whole video")
    first.cache_key = result_cache.job_keys(cache_settings, first)[0]
    store_succeeded(cache_settings, first)
    assert result_cache.remember(cache_settings, first.id) == 1  # one segment: video only
    assert result_cache.remember(cache_settings, first.id) == 0  # already there

    again = unsaved(prompt="whole  video")
    answer = result_cache.answer_from_cache(cache_settings, again)
    assert answer.whole and [e.kind for e in answer.log] == ["cache_hit"]
    assert (again.state, again.cached_from, again.output_sha256) == \
        ("succeeded", first.id, first.output_sha256)
    assert [s.state for s in again.segments] == ["done"]
    jobs.add_jobs(cache_settings.database_url, [again], extra=tuple(answer.log),
                  statements=answer.updates)  # as submission saves it
    with session_scope(cache_settings.database_url) as session:
        assert session.get(CacheEntry, first.cache_key).hits == 1

    other_seed = unsaved(prompt="whole video", seed=99)
    assert not result_cache.answer_from_cache(cache_settings, other_seed).whole
    assert other_seed.state == "queued" and other_seed.cached_from is None


def test_no_answer_once_the_source_video_is_gone(cache_settings):
    first = unsaved(prompt="gone soon")
    first.cache_key = result_cache.job_keys(cache_settings, first)[0]
    store_succeeded(cache_settings, first)
    result_cache.remember(cache_settings, first.id)
    Storage(cache_settings.storage_url).remove(first.output_key)
    assert not result_cache.answer_from_cache(cache_settings, unsaved(prompt="gone soon")).whole
    with session_scope(cache_settings.database_url) as session:  # or the job was deleted
        session.execute(update(Job).where(Job.id == first.id).values(state="deleted"))
    assert not result_cache.answer_from_cache(cache_settings, unsaved(prompt="gone soon")).whole


def test_a_longer_job_reuses_the_segments_it_shares(cache_settings):
    short = unsaved(prompt="long take", frames=33)  # two segments of the tiny model
    short.cache_key, seg_keys = result_cache.job_keys(cache_settings, short)
    for seg, k in zip(short.segments, seg_keys):
        seg.cache_key = k
    store_succeeded(cache_settings, short)
    assert result_cache.remember(cache_settings, short.id) == 3  # video + 2 segments

    longer = unsaved(prompt="long take", frames=49)  # three segments; the first two match
    answer = result_cache.answer_from_cache(cache_settings, longer)
    assert not answer.whole and [e.segment_index for e in answer.log] == [0]
    assert [(s.state, s.cached_from) for s in longer.segments] == \
        [("done", short.id), ("pending", None), ("pending", None)]
    assert longer.segments[0].chunk_keys == short.segments[0].chunk_keys
    # Segment 1 was the short job's last: no last frame kept, so it renders again, and the
    # next one continues from segment 0's frame, copied where segment 1 looks for it.
    storage = Storage(cache_settings.storage_url)
    assert storage.exists(last_frame_key(longer.id, 0, 0))

    independent = unsaved(prompt="long take", frames=49, continuous=False)
    assert not result_cache.answer_from_cache(cache_settings, independent).hit_keys
    assert all(s.cached_from is None for s in independent.segments)  # other keys


def test_eviction_by_age_and_size(cache_settings):
    settings = cache_settings
    cache_upkeep.purge(settings, older_than_days=None)
    now = jobs.utcnow()
    with session_scope(settings.database_url) as session:
        for i, age in enumerate((0, 1, 40, 50)):
            session.add(CacheEntry(key=f"k{i}".ljust(64, "0"), kind="video", project="default",
                                   job_id=f"j{i}", keys=[f"v{i}"], sha256="0" * 64,
                                   bytes=100, hits=0, created_at=now,
                                   last_hit_at=now - timedelta(days=age)))
    assert cache_upkeep.evict(settings.model_copy(
        update={"cache_max_age_days": 30, "cache_max_bytes": 0})) == 2
    cache_upkeep._size_checked_at = float("-inf")
    assert cache_upkeep.evict(settings.model_copy(
        update={"cache_max_age_days": 0, "cache_max_bytes": 150})) == 1
    with session_scope(settings.database_url) as session:  # the least recently hit went first
        assert session.scalars(select(CacheEntry.key)).all() == ["k0".ljust(64, "0")]
    assert cache_upkeep.stats(settings.database_url) == \
        {"video": {"entries": 1, "bytes": 100, "hits": 0}}
    assert cache_upkeep.purge(settings, project="default") == 1


def test_a_source_no_longer_standing_answers_nothing_and_gives_way(cache_settings):
    """Deleted or found corrupt: no hit, and the next render of the request replaces the
    entry; a purge removes the files only the entry named."""
    first = unsaved(prompt="stands no more", frames=33)
    first.cache_key, keys = result_cache.job_keys(cache_settings, first)
    for seg, k in zip(first.segments, keys):
        seg.cache_key = k
    store_succeeded(cache_settings, first)
    assert result_cache.remember(cache_settings, first.id) == 3
    with session_scope(cache_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == first.id).values(state="deleted"))
    repeat = unsaved(prompt="stands no more", frames=33)
    answer = result_cache.answer_from_cache(cache_settings, repeat)
    assert not answer.whole and not answer.hit_keys  # segments of a deleted job: none

    second = unsaved(prompt="stands no more", frames=33)
    second.cache_key, keys = result_cache.job_keys(cache_settings, second)
    for seg, k in zip(second.segments, keys):
        seg.cache_key = k
    store_succeeded(cache_settings, second)
    assert result_cache.remember(cache_settings, second.id) == 3  # replaced all three
    with session_scope(cache_settings.database_url) as session:
        assert {e.job_id for e in session.scalars(
            select(CacheEntry).where(CacheEntry.key.in_([second.cache_key, *keys])))} == \
            {second.id}


def test_a_failed_save_leaves_no_copied_frame(cache_settings):
    short = unsaved(prompt="copied then undone", frames=49)
    short.cache_key, keys = result_cache.job_keys(cache_settings, short)
    for seg, k in zip(short.segments, keys):
        seg.cache_key = k
    store_succeeded(cache_settings, short)
    result_cache.remember(cache_settings, short.id)
    longer = unsaved(prompt="copied then undone", frames=49)
    answer = result_cache.answer_from_cache(cache_settings, longer)
    assert answer.whole  # same length: the video itself
    longer = unsaved(prompt="copied then undone", frames=65)
    answer = result_cache.answer_from_cache(cache_settings, longer)
    storage = Storage(cache_settings.storage_url)
    assert answer.copied and all(storage.exists(k) for k in answer.copied)
    answer.undo(cache_settings)
    assert not any(storage.exists(k) for k in answer.copied)
