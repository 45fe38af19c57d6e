"""A batch of like segments of several jobs rendered in one group call (issue #15, item 2).

`farm.render_batch` (farm/tasks/celery_tasks.py) runs `run_batch`: it starts each member
segment (fenced by the batch task's id, recorded on each by farm/jobs/dispatch.py
`enqueue_batch`), leases ONE group of the pool, renders every member through the transformer
together (workers/batch_render.py), encodes each member's frames with its own ChunkEncoder,
finishes each segment and sends each job's stitch task. Every member's segment heartbeats.

Decisions (where the issue is silent):
- A canceled member is dropped from the batch at the next step (the actor stops computing
  it) and nothing of it is stored; the batch goes on for the others.
- A failed batch fails no job: each member still owned by the batch task records the
  failure (against the group, as a solo render's would count) and its job is re-sent ALONE
  with its normal chord, whose retries and failure policy take over. A member whose failure
  is final as a solo one's would be (a FarmError that is not retryable, a segment started
  too often) fails as it would alone. A batch task killed outright leaves its members to its
  errback (`fail_batch`), or to the reconciler, which re-sends each job on its own.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import RayError
from sqlalchemy import update

from farm.celery_app import app
from farm.db.session import DATABASE_OUTAGE, retry_through_outage, session_scope
from farm.db.tables import Segment, SegmentState
from farm.errors import FarmError, SegmentExhausted, WorkerLost
from farm.jobs import admit, events, service as jobs
from farm.jobs.dispatch import STITCH_TASK, celery_priority, enqueue_job
from farm.settings import Settings
from farm.storage import Storage
from farm.tasks import segment_lease
from farm.tasks.failure_handling import record_final
from farm.tasks.heartbeat import Heartbeat
from farm.tasks.segment_lease import LeaseLost, blame
from farm.tasks.segment_runner import (
    WRITE_DUE_S, ChunkEncoder, RenderWindow, actor_group, node_ips, record_stages,
    render_request,
)
from farm.tasks.stage_clock import StageClock
from scheduler.routing import STITCH_QUEUE
from workers.actor import RenderCanceled
from workers.group import ACTOR_LOST

log = logging.getLogger(__name__)

OPEN_STATES = (SegmentState.pending.value, SegmentState.running.value)


@dataclass(eq=False)  # members are compared by identity
class Member:
    """One job's segment in the batch."""
    job_id: str
    seg_id: int
    stitch_id: str  # the job's stitch task, sent once this member is done
    job: object = None
    segment: object = None
    encoder: ChunkEncoder | None = None
    clock: StageClock = field(default_factory=StageClock)
    out: bool = False  # dropped: its job ended, or another task owns its segment now
    superseded: bool = False


def run_batch(settings: Settings, members: list[list], worker: str | None = None,
              task_id: str | None = None, on_progress=None) -> dict:
    """``members``: [job id, segment id, stitch task id] per member, as enqueue_batch sent
    them. Returns {"rendered": [segment ids], "dropped": [segment ids]}."""
    db, worker = settings.database_url, worker or socket.gethostname()
    batch = [m for m in (Member(*fields) for fields in members)
             if _start(settings, m, worker, task_id)]
    if not batch:
        return {"rendered": [], "dropped": [s for _, s, _ in members]}
    for m in batch:
        m.job = jobs.get_job(db, m.job_id)
        m.segment = next(s for s in m.job.segments if s.id == m.seg_id)
    held = segment_lease.Held()

    def beat() -> None:
        for m in batch:
            if not m.superseded and not jobs.beat_segment(db, m.seg_id, task_id):
                m.superseded = True
        held.renew()

    def stop_waiting() -> bool:
        return all(m.superseded or jobs.job_state(db, m.job_id) not in jobs.LIVE_JOB_STATES
                   for m in batch)

    first, leased = batch[0], False
    window, where = RenderWindow(), ""
    with Heartbeat(beat, settings.heartbeat_s, f"batch {task_id} of {len(batch)}"):
        with segment_lease.lease_for_segment(settings, first.job, first.segment, held,
                                             stop_waiting):
            leased = held.lease is not None
            if leased:
                for m in batch:
                    events.record(db, m.job_id, events.SEGMENT_STARTED,
                                  f"attempt {m.segment.attempts} on {held.name} in batch "
                                  f"{task_id}", m.segment.index, worker)
                window, where = _render(settings, batch, task_id, held, on_progress)
    if not leased:  # stopped while waiting for a group: every job ended, or was re-sent
        for m in batch:
            m.out = True
    done = [m for m in batch if not m.out and _finish(settings, m, batch, task_id, worker,
                                                      held.name, window, where)]
    for m in batch:
        if m not in done and not m.superseded:
            jobs.fail_segment(db, m.seg_id, "job ended while rendering in a batch", task_id)
    return {"rendered": [m.seg_id for m in done],
            "dropped": [m.seg_id for m in batch if m not in done]}


def _start(settings: Settings, m: Member, worker: str, task_id: str | None) -> bool:
    """The member's segment started under the batch task; a member started too often fails
    for good, as it would alone."""
    try:
        return jobs.start_segment(settings.database_url, m.seg_id, worker=worker,
                                  task_id=task_id, max_attempts=settings.segment_max_attempts)
    except SegmentExhausted as exc:
        record_final(m.job_id, m.seg_id, exc, task_id)
        return False


def _render(settings: Settings, batch: list[Member], task_id: str | None,
            held: segment_lease.Held, on_progress) -> tuple[RenderWindow, str]:
    """Render every member on the leased group, each member's frames into its encoder. An
    error of the group is blamed on it (the failure policy avoids it next time)."""
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"batch-{task_id}-", dir=settings.work_dir))
    storage = Storage(settings.storage_url)
    window = RenderWindow()
    try:
        requests = []
        for m in batch:
            member_work = work / m.job_id  # chunk files are named per segment, not per job
            member_work.mkdir()
            m.encoder = ChunkEncoder(m.job, m.segment, settings, storage, member_work, m.clock)
            requests.append(render_request(m.job, m.segment, storage))
        group = actor_group(settings, batch[0].job, held.lease.replica)
        where = node_ips(group)
        stream = group.render_batch(requests, request_ids=[f"{task_id}:{m.seg_id}"
                                                           for m in batch])
        _consume(settings, stream, batch, task_id, held, window, on_progress)
        for m in batch:
            if not m.out:
                m.encoder.finish()
        return window, where
    except RenderCanceled:  # every member dropped
        log.info("batch %s: every member dropped", task_id)
        for m in batch:
            m.out = True
        return window, ""
    except ACTOR_LOST as exc:
        raise blame(WorkerLost(f"actor died rendering batch {task_id} on {held.name}: {exc}"),
                    held) from exc
    except RayError as exc:
        raise blame(exc, held)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _consume(settings: Settings, stream, batch: list[Member], task_id: str | None,
             held: segment_lease.Held, window: RenderWindow, on_progress) -> None:
    """Progress written for every live member about every PROGRESS_EVERY_S (a member
    whose job ended, or whose segment another task took, is dropped from the batch); each
    member's frames to its own encoder; the lease given back once the last frame left."""
    written, completed = 0.0, False
    try:
        for event in stream:
            kind = event["kind"]
            if kind == "progress":
                window.track(event)
                for m in batch:
                    m.clock.track(event)
                now = time.monotonic()
                if now - written >= WRITE_DUE_S or event["step"] == event["steps"]:
                    written = now
                    _report(settings, stream, batch, task_id, event)
                    if on_progress is not None:
                        on_progress(event["step"], event["steps"])
                if held.lost:
                    stream.cancel()
            elif kind == "dropped":
                batch[event["member"]].out = True
            elif not batch[event["member"]].out:
                m = batch[event["member"]]
                m.clock.track(event)
                m.encoder.add(event["frames"])
        window.end()
        held.release()
        admit.release_soon(settings)
        completed = True
    finally:
        if not completed:  # an error here must not leave the actor rendering for nobody
            stream.cancel()
    if held.lost:
        raise LeaseLost(f"lost the lease on {held.name}")


def _report(settings: Settings, stream, batch: list[Member], task_id: str | None,
            event: dict) -> None:
    for i, m in enumerate(batch):
        if m.out:
            continue
        state = _report_member(settings.database_url, m.seg_id, task_id, event)
        if m.superseded or (state and state not in jobs.LIVE_JOB_STATES):
            log.info("batch %s: job %s dropped (job %s%s)", task_id, m.job_id, state,
                     ", segment re-sent" if m.superseded else "")
            m.out = True  # canceled, timed out, failed, or re-sent: the others go on
            stream.cancel_member(i)


def _report_member(db: str, seg_id: int, task_id: str | None, event: dict) -> str | None:
    """The member's progress (by its current task only) -> its job's state; None while the
    database is down (advisory, as a solo render's: the next step reports again). Batch
    members are never asked to yield (issue #15): only the job's state is read."""
    try:
        return jobs.report_segment_progress(db, seg_id, event["step"] / event["steps"],
                                            task_id)
    except DATABASE_OUTAGE as exc:
        log.warning("segment %d: progress not recorded, database unavailable: %s", seg_id,
                    type(exc).__name__)
        return None


def _finish(settings: Settings, m: Member, batch: list[Member], task_id: str | None,
            worker: str, group: str, window: RenderWindow, where: str) -> bool:
    """The member's segment done (fenced), its log told about the batch, its stitch sent."""
    db = settings.database_url
    keys = m.encoder.keys
    if not retry_through_outage(lambda: jobs.finish_segment(db, m.seg_id, keys, task_id),
                                attempts=settings.db_outage_retries):
        log.info("job %s: batch member rendered after the job ended or by a superseded task",
                 m.job_id)
        return False
    others = [o.job_id for o in batch if o is not m]
    events.record(db, m.job_id, events.SEGMENT_RENDERED,
                  f"rendered in a batch of {len(batch)} with jobs {', '.join(others) or '-'} "
                  f"(task {task_id}); {window.describe(group)} on Ray node {where}",
                  m.segment.index)
    events.record(db, m.job_id, events.SEGMENT_DONE, f"{len(keys)} chunk(s)", m.segment.index,
                  worker)
    record_stages(db, m.job_id, m.clock)
    try:  # a stitch not sent (the broker is down) is the reconciler's: the job re-sends
        app.signature(STITCH_TASK, args=([{"segment_id": m.seg_id, "chunks": keys}],
                                         m.job_id)) \
            .set(queue=STITCH_QUEUE, priority=celery_priority(m.job.priority),
                 task_id=m.stitch_id).apply_async()
    except Exception as exc:
        log.warning("job %s: stitch not sent (%s); the reconciler re-sends the job", m.job_id,
                    exc)
    return True


def fail_batch(settings: Settings, members: list[list], task_id: str | None,
               exc: BaseException, worker: str | None) -> list[str]:
    """Every member the batch task still owns goes on alone: its failure recorded (against
    the group when the group failed), its job re-sent with its own chord; a failure final
    for a solo render (a FarmError that is not retryable) fails the member's job as it would
    alone. Returns the ids of the jobs re-sent."""
    db = settings.database_url
    where = getattr(exc, "where", None) or worker or "batch"
    resent = []
    for job_id, seg_id, _stitch in members:
        seg = next(s for s in jobs.get_job(db, job_id).segments if s.id == seg_id)
        if seg.celery_id != task_id or seg.state not in OPEN_STATES:
            continue  # finished, or another task's now (this errback after the task's own)
        if isinstance(exc, FarmError) and not exc.retryable:
            record_final(job_id, seg_id, exc, task_id)
            continue
        events.record(db, job_id, events.SEGMENT_FAILED,
                      f"in batch {task_id}: {type(exc).__name__}: {exc}; re-sent alone",
                      seg.index, where)
        if not _back_to_pending(db, seg_id, task_id):
            continue
        try:
            enqueue_job(jobs.get_job(db, job_id))
            resent.append(job_id)
        except Exception as send_exc:  # its segment is pending, unbeaten: the reconciler's
            log.warning("job %s: not re-sent after its batch failed (%s)", job_id, send_exc)
    admit.release_soon(settings)
    return resent


def _back_to_pending(db: str, seg_id: int, task_id: str | None) -> bool:
    """The member's segment out of the batch (fenced on the batch task): pending, no task,
    no batch; its job's own send records the next task."""
    with session_scope(db) as session:
        return session.execute(
            update(Segment).where(Segment.id == seg_id, Segment.celery_id == task_id,
                                  Segment.state.in_(OPEN_STATES))
            .values(state=SegmentState.pending.value, celery_id=None, render_batch=None)
        ).rowcount == 1

