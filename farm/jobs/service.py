"""The job service: the one module that creates jobs and changes job and segment states.

Every state change is a compare-and-set UPDATE (``WHERE state IN (...)``): of two workers
that race to finish or fail the same segment, exactly one sees its row count be 1.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from farm.db.tables import FINAL_JOB_STATES, Job, JobState, Segment, SegmentState, utcnow
from farm.db.session import session_scope
from farm.errors import JobNotFound, SegmentExhausted
from farm.jobs import webhooks
from farm.policy import get_policy
from farm.schemas import MAX_SEED, JobCreate
from scheduler.planner import plan_segments
from scheduler.routing import Route

log = logging.getLogger(__name__)

RENDER_SHARE = 0.95  # job progress while rendering runs to 0.95; stitching takes the rest
LIVE_JOB_STATES = tuple(s.value for s in JobState if s not in FINAL_JOB_STATES)


def new_job(request: JobCreate, route: Route, rules_sha256: str, batch_id: str | None = None,
            waiting: bool = False) -> Job:
    """A job and its planned segments, not yet saved. ``waiting``: for a batch window."""
    variant = get_policy().catalog.model(route.variant)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
    guidance_high = request.guidance if request.guidance is not None else variant.guidance_high
    guidance_low = next((g for g in (request.guidance_low, request.guidance) if g is not None),
                        variant.guidance_low)
    job = Job(
        id=uuid.uuid4().hex, state=(JobState.waiting if waiting else JobState.queued).value,
        prompt=request.prompt, negative_prompt=request.negative_prompt, model=variant.name,
        width=request.width, height=request.height, frames=request.frames, fps=request.fps,
        steps=request.steps or variant.default_steps, guidance_high=guidance_high,
        guidance_low=guidance_low, seed=seed, priority=request.priority,
        project=request.project, track=request.track, batch_id=batch_id,
        continuous=request.continuous, held=request.hold, timeout_s=request.timeout_s,
        queue_ttl_s=request.queue_ttl_s, retain_days=request.retain_days,
        webhook=request.webhook, webhook_events=list(request.webhook_events), stage_times={},
        route=route.as_dict(), rules_sha256=rules_sha256, progress=0.0, created_at=utcnow(),
    )
    job.segments = [
        Segment(index=p.index, state=SegmentState.pending.value, frame_start=p.frame_start,
                render_frames=p.render_frames, skip_frames=p.skip_frames, seed=p.seed,
                progress=0.0, attempts=0, chunk_keys=[])
        for p in plan_segments(request.frames, variant.max_frames_per_segment, seed)
    ]
    return job


def add_jobs(db_url: str, new: list[Job], batch=None, extra: tuple = (),
             statements: tuple = ()) -> None:
    """Write the jobs (and their batch, and ``extra`` rows), and run ``statements`` (the
    result cache's hit counts), in one transaction."""
    with session_scope(db_url) as session:
        if batch is not None:
            session.add(batch)
        session.add_all(new)
        session.flush()  # the jobs first: ``extra`` rows may point at them
        session.add_all(extra)
        for statement in statements:
            session.execute(statement)
        for job in new:  # answered from the result cache: ended at birth (issue #13)
            if job.state in webhooks.COMPLETED_STATES:
                webhooks.job_ended(session, job.id)
    for job in new:
        log.info("job %s created: model=%s frames=%d segments=%d rule=%s tier=%s",
                 job.id, job.model, job.frames, len(job.segments), job.route["rule"],
                 job.route["tier"])


def job_state(db_url: str, job_id: str) -> str | None:
    """The job's state alone (a primary-key read); None when there is no such job."""
    with session_scope(db_url) as session:
        return session.scalar(select(Job.state).where(Job.id == job_id))


def get_job(db_url: str, job_id: str) -> Job:
    with session_scope(db_url) as session:
        job = session.get(Job, job_id, options=[selectinload(Job.segments)])
        if job is None:
            raise JobNotFound(job_id)
        return job


def list_jobs(db_url: str, state: str | None, limit: int, offset: int,
              project: str) -> tuple[list[Job], int]:
    with session_scope(db_url) as session:
        query = select(Job).options(selectinload(Job.segments)).where(Job.project == project)
        count = select(func.count()).select_from(Job).where(Job.project == project)
        if state:
            query, count = query.where(Job.state == state), count.where(Job.state == state)
        rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id)
                               .limit(limit).offset(offset)).all()
        return list(rows), session.scalar(count)


NOT_STARTED = (JobState.waiting.value, JobState.queued.value)


def queued_count_query(project: str):
    """Jobs of ``project`` waiting or queued (not yet rendering). Read through the index on
    ``jobs.state``: only jobs not yet started are visited, never the finished history
    (100,000 jobs a day); tests/e2e/test_rate_limits.py checks the plan."""
    return select(func.count()).select_from(Job).where(Job.state.in_(NOT_STARTED),
                                                       Job.project == project)


def count_queued(db_url: str, project: str) -> int:
    with session_scope(db_url) as session:
        return session.scalar(queued_count_query(project))


def set_celery_ids(db_url: str, job_id: str, chord_id: str, segment_ids: dict[int, str]) -> None:
    """Record the chord's id on the job and each render task's id on its segment."""
    with session_scope(db_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(celery_id=chord_id))
        for seg_id, task_id in segment_ids.items():
            session.execute(update(Segment).where(Segment.id == seg_id).values(celery_id=task_id))


# ---- compare-and-set transitions -----------------------------------------------------------

def _cas_job(session: Session, job_id: str, from_states: Iterable[str], *conditions,
             **values) -> bool:
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(list(from_states)), *conditions)
        .values(updated_at=utcnow(), **values)
    )
    if result.rowcount == 1 and values.get("state") in webhooks.COMPLETED_STATES:
        webhooks.job_ended(session, job_id)  # its outbox row, in this transaction (issue #13)
    return result.rowcount == 1


def _cas_segment(session: Session, seg_id: int, from_states: Iterable[str], *conditions,
                 **values) -> bool:
    result = session.execute(
        update(Segment).where(Segment.id == seg_id, Segment.state.in_(list(from_states)),
                              *conditions)
        .values(**values)
    )
    return result.rowcount == 1


def _job_is_live():
    """SQL condition: the segment's job has not ended."""
    return Segment.job_id.in_(select(Job.id).where(Job.state.in_(LIVE_JOB_STATES)))


def _fenced(task_id: str | None) -> tuple:
    """SQL condition: the segment's current task is ``task_id`` (None: no fencing)."""
    return () if task_id is None else (Segment.celery_id == task_id,)


def start_segment(db_url: str, seg_id: int, worker: str, max_attempts: int = 4,
                  task_id: str | None = None) -> bool:
    """pending -> running (or running -> running when a lost or failed attempt is re-run).

    Also moves the job queued -> running. False if the job is no longer live, or if
    ``task_id`` is no longer the segment's task (the reconciler re-sent it meanwhile). A
    segment already started ``max_attempts`` times raises SegmentExhausted instead.
    """
    with session_scope(db_url) as session:
        job_id = session.scalar(select(Segment.job_id).where(Segment.id == seg_id))
        if job_id is None:
            raise JobNotFound(f"segment {seg_id}")
        # The job's row locked first (issue #15): a sibling's yield (`yield_segment`) reads
        # whether any segment runs and may send the job back to the queue; under the lock it
        # sees this start, or this start sees its un-send (the task id cleared: refused).
        _lock_job(session, job_id)
        seg = session.get(Segment, seg_id)
        if task_id is not None and seg.celery_id != task_id:
            return False
        now = utcnow()
        # Only a job admission has sent (never one waiting for its window). A job sent again
        # after a preemption (issue #15) keeps its first start: its webhook went out then.
        first = session.scalar(select(Job.started_at).where(Job.id == seg.job_id)) is None
        started = session.execute(update(Job).where(Job.id == seg.job_id,
                                                    Job.state == JobState.queued.value,
                                                    Job.dispatched_at.is_not(None))
                                  .values(state=JobState.running.value,
                                          started_at=func.coalesce(Job.started_at, now),
                                          updated_at=now))
        if started.rowcount == 1 and first:
            webhooks.job_started(session, seg.job_id)  # issue #13
        job_state = session.scalar(select(Job.state).where(Job.id == seg.job_id))
        if job_state != JobState.running.value:
            return False
        if seg.attempts >= max_attempts and seg.state != SegmentState.done.value:
            raise SegmentExhausted(f"segment {seg.index} of job {seg.job_id} was started "
                                   f"{seg.attempts} times; giving up")
        return _cas_segment(session, seg_id, [SegmentState.pending.value, SegmentState.running.value],
                            Segment.attempts < max_attempts, *_fenced(task_id),
                            state=SegmentState.running.value, worker=worker, started_at=now,
                            heartbeat_at=now, attempts=Segment.attempts + 1, progress=0.0,
                            error=None, preempt_requested_at=None)


def beat_segment(db_url: str, seg_id: int, task_id: str | None) -> bool:
    """The running task's heartbeat; False once the segment is no longer its own."""
    with session_scope(db_url) as session:
        return _cas_segment(session, seg_id, [SegmentState.running.value], *_fenced(task_id),
                            heartbeat_at=utcnow())


def owns_segment(db_url: str, seg_id: int, task_id: str | None) -> bool:
    """Whether ``task_id`` is still the segment's task (None: no fencing)."""
    if task_id is None:
        return True
    with session_scope(db_url) as session:
        return session.scalar(select(Segment.celery_id).where(Segment.id == seg_id)) == task_id


def report_segment_progress(db_url: str, seg_id: int, fraction: float,
                            task_id: str | None) -> str | None:
    """Record a segment's progress and the job's, by the segment's current task only
    (``task_id``; None: unfenced, for callers outside Celery); returns the job's state (to
    see a cancel), None when there is no such segment."""
    return report_progress_and_requests(db_url, seg_id, fraction, task_id)[0]


def report_progress_and_requests(db_url: str, seg_id: int, fraction: float,
                                 task_id: str | None) -> tuple[str | None, bool]:
    """report_segment_progress, and whether the segment was asked to yield its group
    (issue #15: read with the segment's job id, no extra round trip)."""
    with session_scope(db_url) as session:
        return record_progress(session, seg_id, fraction, task_id)


def record_progress(session: Session, seg_id: int, fraction: float,
                    task_id: str | None) -> tuple[str | None, bool]:
    """report_progress_and_requests in the caller's transaction. Compare-and-set (issue
    #11): the segment while running under ``task_id``; the job, only then, while running,
    to the mean its segments have in this statement (a finish landing meanwhile is not
    undone). (None, False) when there is no such segment."""
    row = session.execute(select(Segment.job_id, Segment.preempt_requested_at)
                          .where(Segment.id == seg_id)).first()
    if row is None:
        return None, False
    job_id, requested = row
    if _cas_segment(session, seg_id, [SegmentState.running.value], *_fenced(task_id),
                    progress=fraction):
        mean = select(func.avg(Segment.progress)).where(Segment.job_id == job_id)
        if _cas_job(session, job_id, [JobState.running.value],
                    progress=RENDER_SHARE * mean.scalar_subquery()):
            webhooks.job_progressed(session, job_id)  # each tenth, once (issue #13)
    return session.scalar(select(Job.state).where(Job.id == job_id)), requested is not None


def finish_segment(db_url: str, seg_id: int, chunk_keys: list[str],
                   task_id: str | None = None) -> bool:
    """running -> done, only while the job is live (not for a job already failed or canceled)
    and by the segment's current task. A preempted segment's saved state is no longer
    needed (issue #15): its resume fields and any late request to yield are cleared."""
    with session_scope(db_url) as session:
        return _cas_segment(session, seg_id, [SegmentState.running.value], _job_is_live(),
                            *_fenced(task_id),
                            state=SegmentState.done.value, chunk_keys=chunk_keys,
                            progress=1.0, finished_at=utcnow(), **NO_RESUME)


def fail_segment(db_url: str, seg_id: int, error: str, task_id: str | None = None) -> bool:
    """pending|running -> failed, by the segment's current task (``task_id``; None: any)."""
    with session_scope(db_url) as session:
        return _cas_segment(session, seg_id, [SegmentState.pending.value, SegmentState.running.value],
                            *_fenced(task_id), state=SegmentState.failed.value,
                            error=error[:4000], finished_at=utcnow())


def fail_for_task(session: Session, job_id: str, seg_id: int, error: str,
                  task_id: str | None) -> bool:
    """A segment failed for good (farm.tasks.failure_handling.record_final), in one
    transaction: the segment fails only while pending or running under ``task_id`` and its
    job is live, and then the job. A task the reconciler replaced, a segment that
    finished, a job canceled or stitched meanwhile: nothing changes, False."""
    if not _cas_segment(session, seg_id, [SegmentState.pending.value, SegmentState.running.value],
                        _job_is_live(), *_fenced(task_id), state=SegmentState.failed.value,
                        error=error[:4000], finished_at=utcnow()):
        return False
    return _cas_job(session, job_id, LIVE_JOB_STATES, state=JobState.failed.value,
                    error=error[:4000], finished_at=utcnow())


def _stitch_fence(chord_id: str | None) -> tuple:
    """SQL condition: the job's current stitch task is ``chord_id`` (None: no fencing)."""
    return () if chord_id is None else (Job.celery_id == chord_id,)


def begin_stitch(db_url: str, job_id: str, chord_id: str | None = None) -> bool:
    """running -> stitching, by the job's current stitch task (``chord_id``; None: any). That
    task may begin again (stitching -> stitching) when it retries after a database outage."""
    states = [JobState.running.value] + ([JobState.stitching.value] if chord_id else [])
    with session_scope(db_url) as session:
        return _cas_job(session, job_id, states, *_stitch_fence(chord_id),
                        state=JobState.stitching.value, progress=RENDER_SHARE)


def end_stitch_early(db_url: str, job_id: str, chord_id: str | None = None) -> bool:
    """stitching -> running: a stitch that found segments not done gives the job back."""
    with session_scope(db_url) as session:
        return _cas_job(session, job_id, [JobState.stitching.value], *_stitch_fence(chord_id),
                        state=JobState.running.value)


def beat_job(db_url: str, job_id: str, chord_id: str | None = None) -> None:
    """The stitch task's heartbeat (``updated_at``), read by the reconciler."""
    with session_scope(db_url) as session:
        _cas_job(session, job_id, [JobState.stitching.value], *_stitch_fence(chord_id))


def succeed_job(db_url: str, job_id: str, output_key: str, sha256: str, size: int,
                chord_id: str | None = None) -> bool:
    with session_scope(db_url) as session:
        return _cas_job(session, job_id, [JobState.stitching.value], *_stitch_fence(chord_id),
                        state=JobState.succeeded.value, progress=1.0, output_key=output_key,
                        output_sha256=sha256, output_bytes=size, finished_at=utcnow())


def fail_stitch(db_url: str, job_id: str, error: str, chord_id: str | None) -> bool:
    with session_scope(db_url) as session:
        ok = stitch_failed(session, job_id, error, chord_id)
    if ok:
        log.error("job %s failed: %s", job_id, error)
    return ok


def stitch_failed(session: Session, job_id: str, error: str, chord_id: str | None) -> bool:
    """running|stitching -> failed, by the job's current stitch task only (``chord_id``;
    None: any): a replaced stitch that fails leaves the job to its successor, and a job
    that succeeded or was canceled meanwhile stays so (compare-and-set, issue #11)."""
    return _cas_job(session, job_id, [JobState.running.value, JobState.stitching.value],
                    *_stitch_fence(chord_id), state=JobState.failed.value,
                    error=error[:4000], finished_at=utcnow())


def fail_job(db_url: str, job_id: str, error: str) -> bool:
    with session_scope(db_url) as session:
        ok = _cas_job(session, job_id, LIVE_JOB_STATES, state=JobState.failed.value,
                      error=error[:4000], finished_at=utcnow())
    if ok:
        log.error("job %s failed: %s", job_id, error)
    return ok


def cancel_job(db_url: str, job_id: str) -> bool:
    """Any live state -> canceled. False if the job had already ended."""
    with session_scope(db_url) as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
        return _cas_job(session, job_id, LIVE_JOB_STATES, state=JobState.canceled.value,
                        finished_at=utcnow())


# ---- the reconciler's re-send (farm.tasks.reconcile) -------------------------------------------

def mark_resent(session: Session, job: Job, now) -> list[Segment] | None:
    """A stranded job, as the reconciler read it in ``session``, made ready to send again,
    by compare-and-set on what was read (issue #11): the job only if its state, stitch task
    and heartbeat (``updated_at``) are unchanged, and each segment not done only if its
    state, task and heartbeat are. All or nothing (a savepoint): a finish, a start, a
    heartbeat, a stitch success or a cancel that landed after the read wins, and the job is
    left alone (None); the next tick looks again. Otherwise running segments go back to
    pending, task ids are cleared (every task of the earlier send is fenced off at once,
    before the new send records its own) and the job counts one more re-send. Returns the
    segments that were running (their workers vanished)."""
    savepoint = session.begin_nested()
    running = [s for s in job.segments if s.state == SegmentState.running.value]
    ok = _cas_job(session, job.id, [job.state], Job.celery_id.is_not_distinct_from(job.celery_id),
                  Job.updated_at == job.updated_at, celery_id=None, dispatched_at=now,
                  resends=Job.resends + 1,
                  **({"state": JobState.running.value}
                     if job.state == JobState.stitching.value else {}))
    for seg in job.segments:
        if not ok or seg.state == SegmentState.done.value:
            continue
        ok = _cas_segment(session, seg.id, [seg.state],
                          Segment.celery_id.is_not_distinct_from(seg.celery_id),
                          Segment.heartbeat_at.is_not_distinct_from(seg.heartbeat_at),
                          state=SegmentState.pending.value, celery_id=None)
    if not ok:
        savepoint.rollback()
        return None
    savepoint.commit()
    return running


# ---- admission (farm.jobs.admit) -------------------------------------------------------------

def claim_for_dispatch(session: Session, job_id: str) -> bool:
    """Mark a queued job as sent to its tier's queue, once (inside admission's lock)."""
    return session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.queued.value,
                          Job.dispatched_at.is_(None))
        .values(dispatched_at=utcnow())).rowcount == 1


def unclaim(db_url: str, job_ids: list[str]) -> None:
    """Undo claims whose send failed: the next release sends them again."""
    with session_scope(db_url) as session:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.state == JobState.queued.value)
                        .values(dispatched_at=None, celery_id=None))


# ---- batch windows (farm.jobs.batches' tick) -----------------------------------------------------

def wake_jobs(db_url: str, job_ids: list[str]) -> int:
    """waiting -> queued: their window opened; admission sends them in priority order."""
    with session_scope(db_url) as session:
        return session.execute(
            update(Job).where(Job.id.in_(job_ids), Job.state == JobState.waiting.value)
            .values(state=JobState.queued.value, updated_at=utcnow())).rowcount


def park_jobs(db_url: str, job_ids: list[str], cancel: bool) -> int:
    """Queued jobs never started, when their window closes: back to waiting (they keep their
    place: priority and age are unchanged), or canceled if their batch says so. A job a
    preemption sent back to the queue has started: it is never parked (issue #15)."""
    values = (dict(state=JobState.canceled.value, error="the batch window closed first",
                   finished_at=utcnow()) if cancel else dict(state=JobState.waiting.value))
    with session_scope(db_url) as session:
        parked = session.scalars(
            update(Job).where(Job.id.in_(job_ids), Job.state == JobState.queued.value,
                              Job.dispatched_at.is_(None), Job.started_at.is_(None))
            .values(updated_at=utcnow(), **values).returning(Job.id)).all()
        for job_id in parked if cancel else ():
            webhooks.job_ended(session, job_id)  # issue #13
        return len(parked)


# ---- preemption at a step boundary (issue #15, item 1) -----------------------------------------

# A segment's saved state and request to yield, cleared once it finishes.
NO_RESUME = dict(resume_key=None, resume_sha256=None, resume_step=None, preempt_requested_at=None)


def _lock_job(session: Session, job_id: str) -> None:
    """The job's row locked to the end of the transaction (PostgreSQL: SELECT ... FOR
    UPDATE). SQLite has no row locks (SQLAlchemy leaves FOR UPDATE out): there the
    database's write lock, taken at a transaction's first write and held to its commit,
    serializes the writers, and what a transaction reads after its first write (as
    `_unsend_if_idle` does) already includes every other committed start."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
