"""One segment of a job: lease a group of its route's pool, render on it, encode the frames
in chunks, store them.

The group streams progress events and then decoded frames; frames are encoded here, on the
Celery worker's CPU, and the lease is given back as soon as the last frame has left the
group, so the GPU starts the next segment while ffmpeg finishes this one. Only the lease's
holder calls the group (farm/tasks/segment_lease.py, issue #11).
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from ray.exceptions import RayError

from farm.jobs import admit, events, preemption_service as preempting, service as jobs, stage_times
from farm.db.tables import Segment
from farm.db.session import DATABASE_OUTAGE, retry_through_outage
from farm.errors import WorkerLost
from farm.tasks.heartbeat import Heartbeat
from farm.tasks.stage_clock import StageClock
from farm.model_dirs import resolve_model_dir
from farm.settings import Settings
from farm.storage import Storage
from farm.policy import get_policy
from workers import ray_cluster
from workers.actor import RenderCanceled
from farm.tasks import preemption, seams, segment_lease
from farm.tasks.preemption import Yielded
from farm.tasks.segment_lease import LeaseLost, blame
from workers.group import ACTOR_LOST, ActorGroup
from workers.video import encode_chunk

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PROGRESS_EVERY_S = 0.25  # how often a render's progress is written (and a cancel seen)
# How often the group sends a progress event at all (workers/progress_pace.py): fewer
# objects through Ray for a fast model's steps, still five per progress write.
PROGRESS_EVENT_S = 0.05
# A write is due this long after the last one: events come at most PROGRESS_EVENT_S apart,
# so writes stay about PROGRESS_EVERY_S apart (never more than it plus a step).
WRITE_DUE_S = PROGRESS_EVERY_S - PROGRESS_EVENT_S


# A chunk is encoded once this many frames wait beyond it, so a short remainder joins the
# last chunk instead of costing an ffmpeg run of its own: Wan's decoder gives 4 frames per
# latent frame and clips are 4k + 1 frames long, which left a 1-frame chunk at every end.
TAIL_FRAMES = 4


def chunk_due(waiting: int, chunk_frames: int) -> bool:
    """Whether a chunk of ``chunk_frames`` is encoded now, with ``waiting`` frames buffered."""
    return waiting >= chunk_frames + TAIL_FRAMES


class ChunkEncoder:
    """Buffers frames, drops the segment's leading skip frames, encodes every N to H.264
    (the last chunk takes up to N + TAIL_FRAMES - 1)."""

    def __init__(self, job, segment: Segment, settings: Settings, storage: Storage, work: Path,
                 clock: StageClock | None = None):
        self.job, self.segment, self.settings = job, segment, settings
        self.clock = clock or StageClock()  # its encode time (issue #13)
        self.storage, self.work = storage, work
        self.to_skip = segment.skip_frames
        self.buffer: list[np.ndarray] = []
        self.last_frame: np.ndarray | None = None
        self.keys: list[str] = []

    def add(self, frames: np.ndarray) -> None:
        if len(frames):
            self.last_frame = frames[-1]  # what a continuing segment starts from
        if self.to_skip:
            dropped = min(self.to_skip, len(frames))
            frames, self.to_skip = frames[dropped:], self.to_skip - dropped
        self.buffer.extend(frames)
        while chunk_due(len(self.buffer), self.settings.encode_chunk_frames):
            self._encode(self.settings.encode_chunk_frames)

    def finish(self) -> list[str]:
        if self.buffer:
            self._encode(len(self.buffer))
        return self.keys

    def _encode(self, count: int) -> None:
        with self.clock.timing("encode"):
            self._encode_and_store(count)

    def _encode_and_store(self, count: int) -> None:
        frames, self.buffer = np.stack(self.buffer[:count]), self.buffer[count:]
        # Named by attempt: a superseded attempt still writing never overwrites this one's.
        name = f"s{self.segment.index:04d}_a{self.segment.attempts:02d}_c{len(self.keys):04d}.mp4"
        local = encode_chunk(frames, self.work / name, self.job.width, self.job.height,
                             self.job.fps, self.settings.x264_preset, self.settings.x264_crf)
        key = f"jobs/{self.job.id}/chunks/{name}"
        self.storage.put_file(local, key)
        local.unlink()
        self.keys.append(key)


def actor_group(settings: Settings, job, replica: int) -> ActorGroup:
    variant = get_policy().catalog.model(job.model)
    model_dir = resolve_model_dir(settings, variant)
    ray_cluster.connect(settings.ray_address, tier_slots=settings.ray_tier_slots,
                        temp_dir=str(settings.ray_temp_dir),
                        object_store_bytes=settings.ray_object_store_bytes,
                        node_ip=settings.ray_node_ip, token_file=settings.ray_auth_token_file)
    segment_lease.make_room(settings, job, replica)
    try:
        tier = get_policy().catalog.tier(job.route["tier"])
        return ActorGroup.get_or_create(variant.name, tier, str(model_dir),
                                        detached=settings.ray_address != "local",
                                        plan=job.route.get("parallel", "single"),
                                        placement=job.route.get("placement", "resident"),
                                        replica=replica, cpus=settings.actor_cpus,
                                        quantize=variant.quantize_on_load)
    except ACTOR_LOST as exc:
        raise WorkerLost(f"actor for {variant.name} on {job.route['tier']} is gone: {exc}") from exc


def render_request(job, segment: Segment, storage: Storage) -> dict:
    """What the group renders; a continued segment starts from the last frame of the one
    before it (farm/tasks/seams.py, issue #11 item 7)."""
    variant = get_policy().catalog.model(job.model)
    return dict(first_frame=seams.first_frame(storage, job, segment),
                prompt=job.prompt, negative_prompt=job.negative_prompt,
                frames=segment.render_frames, height=variant.native_height,
                width=variant.native_width, steps=job.steps, guidance_high=job.guidance_high,
                guidance_low=job.guidance_low, seed=segment.seed,
                cache=job.route.get("cache"),  # the route's step caching (issue #12)
                progress_every_s=PROGRESS_EVENT_S)


def _report_progress(db: str, seg_id: int, task_id: str | None,
                     event: dict) -> tuple[str | None, bool]:
    """The job's state after recording progress (by the segment's current task only), and
    whether the segment was asked to yield its group (issue #15); (None, False) while the
    database is down (progress is advisory: the render goes on, and the next step reports
    again). A request seen after the last step is dropped: the denoising is done, there
    is nothing left to save, and the segment finishes."""
    try:
        state, asked = jobs.report_progress_and_requests(db, seg_id,
                                                         event["step"] / event["steps"], task_id)
        if asked and event["step"] >= event["steps"]:
            preempting.clear_preemption_request(db, seg_id, task_id)
            asked = False
        return state, asked
    except DATABASE_OUTAGE as exc:
        log.warning("segment %d: progress not recorded, database unavailable: %s", seg_id,
                    type(exc).__name__)
        return None, False


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
    superseded = threading.Event()  # the reconciler gave the segment to another task
    held = segment_lease.Held()  # the group's lease, renewed with the heartbeat

    def stop_waiting() -> bool:
        """While waiting for a group: the segment went to another task, or its job ended."""
        return superseded.is_set() or jobs.job_state(db, job_id) not in jobs.LIVE_JOB_STATES

    def beat() -> None:
        if not jobs.beat_segment(db, seg_id, task_id):
            superseded.set()
        held.renew()

    # From here to the end the segment is alive: loading a model may take minutes.
    with Heartbeat(beat, settings.heartbeat_s, f"job {job_id} segment {segment.index}"):
        with segment_lease.lease_for_segment(settings, job, segment, held, stop_waiting):
            if held.lease is None:  # stopped while waiting for a group
                return _stopped(db, job_id, seg_id, segment.index, superseded.is_set(), task_id)
            events.record(db, job_id, events.SEGMENT_STARTED,
                          f"attempt {segment.attempts} on {held.name}", segment.index, worker)
            clock = StageClock()
            keys = _render_and_encode(settings, job, segment, task_id, superseded, on_progress,
                                      held, clock)
    if keys is None:
        return _stopped(db, job_id, seg_id, segment.index, superseded.is_set(), task_id)
    if isinstance(keys, Yielded):
        return {"segment_id": seg_id, "preempted": True, "step": keys.event["step"]}
    if not retry_through_outage(lambda: jobs.finish_segment(db, seg_id, keys, task_id),
                                attempts=settings.db_outage_retries):
        log.info("job %s segment %d rendered after the job ended or by a superseded task; "
                 "chunks kept", job_id, segment.index)
        # The job ended (canceled, timed out): the segment must not stay running, or a retry
        # waits a lease for it (issue #13). Fenced: a superseded task's is left to its successor.
        jobs.fail_segment(db, seg_id, f"job ended while rendering: {jobs.job_state(db, job_id)}",
                          task_id)
        return {"segment_id": seg_id, "finished": False}
    events.record(db, job_id, events.SEGMENT_DONE, f"{len(keys)} chunk(s)", segment.index, worker)
    preemption.after_finish(settings, job, segment)
    record_stages(db, job_id, clock)
    return {"segment_id": seg_id, "chunks": keys}


def record_stages(db: str, job_id: str, clock: StageClock) -> None:
    """The segment's stage times into the job's (advisory: a database outage loses them)."""
    try:
        stage_times.add_stages(db, job_id, clock.seconds(), clock.peak_memory_bytes)
    except DATABASE_OUTAGE as exc:
        log.warning("job %s: stage times not recorded, database unavailable: %s", job_id,
                    type(exc).__name__)


def _render_and_encode(settings: Settings, job, segment: Segment, task_id: str | None,
                       superseded: threading.Event, on_progress: ProgressFn | None,
                       held: segment_lease.Held, clock: StageClock
                       ) -> list[str] | Yielded | None:
    """The segment's chunk keys; None when the render was stopped (job ended, superseded);
    Yielded when it gave its group up to a more urgent job (issue #15), its state stored and
    the segment pending again. A preempted segment resumes from its stored state.
    An error of the group (an actor dying, a rank failing) names the group in ``where``: the
    failure policy then avoids that group, not this Celery worker (issue #11)."""
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{job.id}-s{segment.index}-", dir=settings.work_dir))
    try:
        storage = Storage(settings.storage_url)
        encoder = ChunkEncoder(job, segment, settings, storage, work, clock)
        request = render_request(job, segment, storage)
        resume = preemption.saved_state(settings, storage, job, segment)
        try:
            with clock.timing("group"):
                group = actor_group(settings, job, held.lease.replica)
            where = node_ips(group)  # asked here, where a lost actor is handled
            stream = preemption.start_render(settings, storage, group, request, job, segment,
                                             task_id, resume)
            window = RenderWindow()
            report = partial(_report_progress, settings.database_url, segment.id, task_id)
            keys = _consume(stream, encoder, report, lambda: superseded.is_set() or held.lost,
                            on_progress, _tracker(window, clock),
                            lambda: (window.end(), held.release(), admit.release_soon(settings)))
        except RenderCanceled:
            keys = None
        except ACTOR_LOST as exc:
            raise blame(WorkerLost(
                f"actor died rendering job {job.id} segment {segment.index} on {held.name}: "
                f"{exc}"), held) from exc
        except RayError as exc:
            raise blame(exc, held)
        if held.lost and not superseded.is_set():
            raise LeaseLost(f"lost the lease on {held.name}")
        if keys is None:
            return None
        if isinstance(keys, Yielded):
            return _give_way(settings, storage, job, segment, task_id, keys, work, held)
        events.record(settings.database_url, job.id, events.SEGMENT_RENDERED,
                      f"{window.describe(held.name)} on Ray node {where}",
                      segment.index)
        if job.continuous and segment.index < len(job.segments) - 1:
            seams.save_last_frame(storage, job, segment, encoder.last_frame)
        return keys
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _give_way(settings: Settings, storage: Storage, job, segment: Segment,
              task_id: str | None, yielded: Yielded, work: Path,
              held: segment_lease.Held) -> Yielded | None:
    """The state stored and the segment pending again, then the group's lease given back and
    admission run: the urgent job takes the group (issue #15). None: the segment was no
    longer this task's (the reconciler re-sent it), or its job ended, meanwhile: the caller
    then stops it as any stopped render (`_stopped`, fenced by the task id)."""
    stored = preemption.store_and_yield(settings, storage, job, segment, task_id, yielded, work)
    held.release()
    admit.release_soon(settings)
    return yielded if stored else None


def node_ips(group) -> str:
    """The addresses of the Ray nodes holding the group's actors: the job's log names the
    host that rendered each segment (issue #14, farms across hosts)."""
    return ", ".join(sorted({info.get("node_ip", "?") for info in group.info()}))


def _tracker(window: "RenderWindow", clock: StageClock) -> Callable[[dict], None]:
    """Every event to the stage clock; progress events to the render window too."""
    def track(event: dict) -> None:
        clock.track(event)
        if event["kind"] == "progress":
            window.track(event)
    return track


class RenderWindow:
    """When the group rendered the segment: from the render's start on the actor (its own
    clock, the progress events' ``began``) to the last frame leaving it. The farm's
    throughput benchmark reads these from the job's log to measure each group's duty."""

    def __init__(self):
        self.began: float | None = None
        self.ended: float | None = None

    def track(self, event: dict) -> None:
        if self.began is None:
            self.began = event.get("began", event["at"])

    def end(self) -> None:
        self.ended = time.time()

    def describe(self, group: str) -> str:
        began = self.began if self.began is not None else self.ended
        return (f"rendered on {group} from {began:.3f} to {self.ended:.3f} "
                f"({self.ended - began:.2f} s)")


def _consume(stream, encoder: ChunkEncoder, report: Callable[[dict], tuple[str | None, bool]],
             stop: Callable[[], bool], on_progress: ProgressFn | None,
             on_event: Callable[[dict], None], on_stream_end: Callable[[], None]
             ) -> list[str] | Yielded:
    """Progress events recorded, frames encoded; the stream canceled if anything stops it.
    ``on_stream_end`` runs once the group has sent its last frame (the lease goes back).
    A request to yield (issue #15), seen at a progress write, asks the group to stop after
    its next step; the stream then ends with its saved state: returned as Yielded.

    Progress is written about every PROGRESS_EVERY_S (and at the last step): the group
    runs at most two events ahead of this loop, so a database write per step of a fast
    model would hold the GPU back (issue #11: the farm's duty cycle). The group sends an
    event at most every PROGRESS_EVENT_S, or every step when steps are slower. A cancel
    is seen at the next write: within PROGRESS_EVERY_S, or a step when steps are slower."""
    completed, written = False, 0.0
    try:
        for event in stream:
            if event["kind"] == "progress":
                on_event(event)
                state, now = None, time.monotonic()
                if now - written >= WRITE_DUE_S or event["step"] == event["steps"]:
                    written, (state, yield_asked) = now, report(event)
                    if on_progress is not None:
                        on_progress(event["step"], event["steps"])
                    if yield_asked:  # asked at each write while it stands (idempotent): a
                        stream.preempt()  # split placement's low group may start after
                if stop() or (state and state not in jobs.LIVE_JOB_STATES):
                    stream.cancel()  # canceled, failed by a sibling, superseded, lease lost
            elif event["kind"] == "preempted":
                completed = True  # the group stopped by itself, its state in the event
                return Yielded(event)
            else:
                on_event(event)  # the stage clock reads decode time and peak memory
                encoder.add(event["frames"])
        on_stream_end()
        keys = encoder.finish()
        completed = True
        return keys
    finally:
        if not completed:  # an error here must not leave the actor rendering for nobody
            stream.cancel()


def _stopped(db: str, job_id: str, seg_id: int, index: int, superseded: bool,
             task_id: str | None) -> dict:
    """A render that stopped: its job ended, or the segment went to another task. The
    segment is failed only while it is still this task's (``task_id``): the heartbeat may
    not have seen a re-send yet (a refused yield is one), and the new task's segment must
    not fail for this one's stop."""
    if not superseded and jobs.fail_segment(
            db, seg_id, f"job ended while rendering: {jobs.job_state(db, job_id)}", task_id):
        log.info("job %s segment %d stopped: the job ended", job_id, index)
        return {"segment_id": seg_id, "canceled": True}
    log.info("job %s segment %d stopped: no longer this task's (re-sent to another)", job_id,
             index)
    return {"segment_id": seg_id, "superseded": True}
