"""One segment of a job: render on the tier's actor, encode its frames in chunks, store them.

The actor streams progress events and then decoded frames; frames are encoded here, on the
Celery worker's CPU, so the GPU is free for the next segment while ffmpeg runs.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from farm.jobs import events, service as jobs
from farm.db.tables import Segment
from farm.db.session import DATABASE_OUTAGE, retry_through_outage
from farm.errors import WorkerLost
from farm.tasks.heartbeat import Heartbeat
from farm.model_dirs import resolve_model_dir
from farm.settings import Settings
from farm.storage import Storage
from farm.policy import get_policy
from workers import ray_cluster
from workers.actor import RenderCanceled
from workers.group import ACTOR_LOST, ActorGroup
from workers.video import encode_chunk

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class ChunkEncoder:
    """Buffers frames, drops the segment's leading skip frames, encodes every N to H.264."""

    def __init__(self, job, segment: Segment, settings: Settings, storage: Storage, work: Path):
        self.job, self.segment, self.settings = job, segment, settings
        self.storage, self.work = storage, work
        self.to_skip = segment.skip_frames
        self.buffer: list[np.ndarray] = []
        self.keys: list[str] = []

    def add(self, frames: np.ndarray) -> None:
        if self.to_skip:
            dropped = min(self.to_skip, len(frames))
            frames, self.to_skip = frames[dropped:], self.to_skip - dropped
        self.buffer.extend(frames)
        while len(self.buffer) >= self.settings.encode_chunk_frames:
            self._encode(self.settings.encode_chunk_frames)

    def finish(self) -> list[str]:
        if self.buffer:
            self._encode(len(self.buffer))
        return self.keys

    def _encode(self, count: int) -> None:
        frames, self.buffer = np.stack(self.buffer[:count]), self.buffer[count:]
        # Named by attempt: a superseded attempt still writing never overwrites this one's.
        name = f"s{self.segment.index:04d}_a{self.segment.attempts:02d}_c{len(self.keys):04d}.mp4"
        local = encode_chunk(frames, self.work / name, self.job.width, self.job.height,
                             self.job.fps, self.settings.x264_preset, self.settings.x264_crf)
        key = f"jobs/{self.job.id}/chunks/{name}"
        self.storage.put_file(local, key)
        local.unlink()
        self.keys.append(key)


def _actor_group(settings: Settings, job) -> ActorGroup:
    variant = get_policy().catalog.model(job.model)
    model_dir = resolve_model_dir(settings, variant)
    ray_cluster.connect(settings.ray_address, tier_slots=settings.ray_tier_slots,
                        temp_dir=str(settings.ray_temp_dir),
                        object_store_bytes=settings.ray_object_store_bytes,
                        node_ip=settings.ray_node_ip)
    try:
        tier = get_policy().catalog.tier(job.route["tier"])
        return ActorGroup.get_or_create(variant.name, tier, str(model_dir),
                                        detached=settings.ray_address != "local",
                                        plan=job.route.get("parallel", "single"),
                                        placement=job.route.get("placement", "resident"))
    except ACTOR_LOST as exc:
        raise WorkerLost(f"actor for {variant.name} on {job.route['tier']} is gone: {exc}") from exc


def _request(job, segment: Segment) -> dict:
    variant = get_policy().catalog.model(job.model)
    return dict(prompt=job.prompt, negative_prompt=job.negative_prompt,
                frames=segment.render_frames, height=variant.native_height,
                width=variant.native_width, steps=job.steps, guidance_high=job.guidance_high,
                guidance_low=job.guidance_low, seed=segment.seed)


def _report_progress(db: str, seg_id: int, event: dict) -> str | None:
    """The job's state after recording progress; None while the database is down (progress
    is advisory: the render goes on, and the next step reports again)."""
    try:
        return jobs.report_segment_progress(db, seg_id, event["step"] / event["steps"])
    except DATABASE_OUTAGE as exc:
        log.warning("segment %d: progress not recorded, database unavailable: %s", seg_id,
                    type(exc).__name__)
        return None


def run_segment(settings: Settings, job_id: str, seg_id: int,
                on_progress: ProgressFn | None = None, worker: str | None = None,
                task_id: str | None = None) -> dict:
    """``worker``: who runs it (the Celery worker's name), recorded on the segment.
    ``task_id``: the Celery task running it, its fencing token (farm.jobs.service)."""
    db = settings.database_url
    worker = worker or socket.gethostname()
    if not jobs.start_segment(db, seg_id, worker=worker, task_id=task_id,
                              max_attempts=settings.segment_max_attempts):
        return {"segment_id": seg_id, "skipped": True}
    job = jobs.get_job(db, job_id)
    segment = next(s for s in job.segments if s.id == seg_id)
    events.record(db, job_id, events.SEGMENT_STARTED, f"attempt {segment.attempts}",
                  segment.index, worker)
    superseded = threading.Event()  # the reconciler gave the segment to another task

    def beat() -> None:
        if not jobs.beat_segment(db, seg_id, task_id):
            superseded.set()

    # From here to the end the segment is alive: loading a model may take minutes.
    with Heartbeat(beat, settings.heartbeat_s, f"job {job_id} segment {segment.index}"):
        keys = _render_and_encode(settings, job, segment, superseded, on_progress)
    if keys is None:
        return _stopped(db, job_id, seg_id, segment.index, superseded.is_set())
    if not retry_through_outage(lambda: jobs.finish_segment(db, seg_id, keys, task_id),
                                attempts=settings.db_outage_retries):
        log.info("job %s segment %d rendered after the job ended or by a superseded task; "
                 "chunks kept", job_id, segment.index)
        return {"segment_id": seg_id, "finished": False}
    events.record(db, job_id, events.SEGMENT_DONE, f"{len(keys)} chunk(s)", segment.index, worker)
    return {"segment_id": seg_id, "chunks": keys}


def _render_and_encode(settings: Settings, job, segment: Segment, superseded: threading.Event,
                       on_progress: ProgressFn | None) -> list[str] | None:
    """The segment's chunk keys; None when the render was stopped (job ended, superseded).
    An actor dying at any point of it is a WorkerLost."""
    group = _actor_group(settings, job)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{job.id}-s{segment.index}-", dir=settings.work_dir))
    try:
        encoder = ChunkEncoder(job, segment, settings, Storage(settings.storage_url), work)
        stream = group.render(_request(job, segment))
        return _consume(stream, encoder, settings.database_url, segment.id, superseded,
                        on_progress)
    except RenderCanceled:
        return None
    except ACTOR_LOST as exc:
        raise WorkerLost(f"actor died rendering job {job.id} segment {segment.index}: "
                         f"{exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _consume(stream, encoder: ChunkEncoder, db: str, seg_id: int, superseded: threading.Event,
             on_progress: ProgressFn | None) -> list[str]:
    """Progress events recorded, frames encoded; the stream canceled if anything stops it."""
    completed = False
    try:
        for event in stream:
            if event["kind"] == "progress":
                state = _report_progress(db, seg_id, event)
                if on_progress is not None:
                    on_progress(event["step"], event["steps"])
                if superseded.is_set() or (state and state not in jobs.LIVE_JOB_STATES):
                    stream.cancel()  # canceled, failed by a sibling, or superseded
            else:
                encoder.add(event["frames"])
        keys = encoder.finish()
        completed = True
        return keys
    finally:
        if not completed:  # an error here must not leave the actor rendering for nobody
            stream.cancel()


def _stopped(db: str, job_id: str, seg_id: int, index: int, superseded: bool) -> dict:
    if superseded:
        log.info("job %s segment %d stopped: re-sent to another task", job_id, index)
        return {"segment_id": seg_id, "superseded": True}
    jobs.fail_segment(db, seg_id, f"job ended while rendering: {jobs.get_job(db, job_id).state}")
    log.info("job %s segment %d stopped: the job ended", job_id, index)
    return {"segment_id": seg_id, "canceled": True}
