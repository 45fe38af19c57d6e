"""The last step of a job: join its chunks, check the result with ffprobe, store it."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from farm.jobs import events, result_cache, service as jobs, stage_times
from farm.jobs.pictures import THUMBNAIL, picture_key
from farm.db.tables import SegmentState
from farm.db.session import DATABASE_OUTAGE
from farm.errors import OutputInvalid
from farm.tasks.heartbeat import Heartbeat
from farm.settings import Settings
from farm.storage import Storage
from workers.video import concat, probe, thumbnail

log = logging.getLogger(__name__)


def video_key(job_id: str, chord_id: str | None = None) -> str:
    """Each stitch task writes its own file: a replaced one still running never overwrites
    or removes the video another has made the job's result."""
    return f"jobs/{job_id}/video.mp4" if chord_id is None else f"jobs/{job_id}/video-{chord_id}.mp4"


def stitch(settings: Settings, job_id: str, chord_id: str | None = None) -> dict:
    """``chord_id``: the stitch task's id; one the reconciler has replaced does nothing."""
    db = settings.database_url
    if not jobs.begin_stitch(db, job_id, chord_id):  # ended meanwhile, or superseded
        return {"job_id": job_id, "stitched": False}
    with Heartbeat(lambda: jobs.beat_job(db, job_id, chord_id), settings.heartbeat_s,
                   f"stitch {job_id}"):
        return _stitch(settings, job_id, chord_id)


def fail(settings: Settings, job_id: str, exc: BaseException, chord_id: str | None) -> bool:
    """The stitch failure path: the job fails by compare-and-set on its current stitch task
    (farm.jobs.service.fail_stitch); False, and nothing changed, for any other."""
    error = f"stitch: {type(exc).__name__}: {exc}"
    if jobs.fail_stitch(settings.database_url, job_id, error, chord_id):
        events.record(settings.database_url, job_id, events.JOB_FAILED, error)
        return True
    log.info("job %s: a stitch that is no longer the job's (%s) failed; job left as it is",
             job_id, chord_id)
    return False


def _stitch(settings: Settings, job_id: str, chord_id: str | None) -> dict:
    db = settings.database_url
    job = jobs.get_job(db, job_id)
    not_done = [s.index for s in job.segments if s.state != SegmentState.done.value]
    if not_done:  # their tasks were lost (a Redis restart): the reconciler re-sends the job
        jobs.end_stitch_early(db, job_id, chord_id)
        log.warning("job %s: stitch found segments %s not done; left to the reconciler",
                    job_id, not_done)
        return {"job_id": job_id, "stitched": False, "not_done": not_done}
    storage = Storage(settings.storage_url)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()  # the stitch stage's time (issue #13)
    with tempfile.TemporaryDirectory(dir=settings.work_dir, prefix=f"stitch-{job_id}-") as tmp:
        tmp = Path(tmp)
        chunks = [storage.get_file(key, tmp / Path(key).name)
                  for seg in job.segments for key in seg.chunk_keys]
        # One chunk is already the whole video (same encode, +faststart): no ffmpeg run.
        video = chunks[0] if len(chunks) == 1 else concat(chunks, tmp / "video.mp4")
        info = probe(video)
        expected = (job.width, job.height, job.frames, "h264")
        got = (info.width, info.height, info.frames, info.codec)
        if got != expected:
            raise OutputInvalid(f"stitched video is (width, height, frames, codec) = {got}, "
                                f"expected {expected}")
        thumb = thumbnail(video, tmp / "thumbnail.jpg", duration_s=info.duration_s)
        storage.put_file(thumb, picture_key(job_id, THUMBNAIL))
        key = video_key(job_id, chord_id)
        sha256, size = storage.put_file(video, key)
    try:  # advisory (issue #13): an outage here must not undo a stitched video
        stage_times.add_stages(db, job_id, {"stitch": time.monotonic() - began})
    except DATABASE_OUTAGE as exc:
        log.warning("job %s: stitch time not recorded, database unavailable: %s", job_id,
                    type(exc).__name__)
    if not jobs.succeed_job(db, job_id, key, sha256, size, chord_id):
        # Canceled while stitching, or replaced: this file must not stand as a result.
        storage.remove(key)
        return {"job_id": job_id, "stitched": False}
    log.info("job %s succeeded: %d frames, %d bytes, sha256 %s", job_id, info.frames, size,
             sha256)
    try:  # the cache is an optimisation: a failure here must not fail a rendered job
        result_cache.remember(settings, job_id)
    except Exception:
        log.exception("job %s: could not record it in the result cache", job_id)
    return {"job_id": job_id, "stitched": True, "sha256": sha256}
