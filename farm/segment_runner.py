"""One segment of a job: render on the tier's actor, encode its frames in chunks, store them.

The actor streams progress events and then decoded frames; frames are encoded here, on the
Celery worker's CPU, so the GPU is free for the next segment while ffmpeg runs.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from farm import jobs
from farm.db.models import Segment
from farm.errors import WorkerLost
from farm.models import resolve_model_dir
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
        name = f"s{self.segment.index:04d}_c{len(self.keys):04d}.mp4"
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


def run_segment(settings: Settings, job_id: str, seg_id: int,
                on_progress: ProgressFn | None = None, worker: str | None = None) -> dict:
    """``worker``: who runs it (the Celery worker's name), recorded on the segment."""
    db = settings.database_url
    if not jobs.start_segment(db, seg_id, worker=worker or socket.gethostname(),
                              max_attempts=settings.segment_max_retries + 1):
        return {"segment_id": seg_id, "skipped": True}
    job = jobs.get_job(db, job_id)
    segment = next(s for s in job.segments if s.id == seg_id)
    variant = get_policy().catalog.model(job.model)
    group = _actor_group(settings, job)
    request = dict(prompt=job.prompt, negative_prompt=job.negative_prompt,
                   frames=segment.render_frames, height=variant.native_height,
                   width=variant.native_width, steps=job.steps, guidance_high=job.guidance_high,
                   guidance_low=job.guidance_low, seed=segment.seed)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}-s{segment.index}-", dir=settings.work_dir))
    encoder = ChunkEncoder(job, segment, settings, Storage(settings.storage_url), work)
    stream = group.render(request)
    completed = False
    try:
        for event in stream:
            if event["kind"] == "progress":
                state = jobs.report_segment_progress(db, seg_id, event["step"] / event["steps"])
                if on_progress is not None:
                    on_progress(event["step"], event["steps"])
                if state not in jobs.LIVE_JOB_STATES:  # canceled, or failed by a sibling
                    stream.cancel()  # the actor stops before its next step
            else:
                encoder.add(event["frames"])
        keys = encoder.finish()
        completed = True
    except RenderCanceled:
        jobs.fail_segment(db, seg_id, "job ended while rendering: "
                          f"{jobs.get_job(db, job_id).state}")
        log.info("job %s segment %d stopped: the job ended", job_id, segment.index)
        return {"segment_id": seg_id, "canceled": True}
    except ACTOR_LOST as exc:
        raise WorkerLost(f"actor died rendering job {job_id} segment {segment.index}: {exc}") from exc
    finally:
        if not completed:  # an error here must not leave the actor rendering for nobody
            stream.cancel()
        shutil.rmtree(work, ignore_errors=True)
    if not jobs.finish_segment(db, seg_id, keys):
        log.info("job %s segment %d rendered after the job ended; chunks kept", job_id,
                 segment.index)
        return {"segment_id": seg_id, "finished": False}
    return {"segment_id": seg_id, "chunks": keys}
