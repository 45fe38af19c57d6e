"""The job service's transitions for preemption at a step boundary (issue #15, item 1):
asking running segments to yield, a yield putting its segment back to pending with its saved
state, the job going back to the queue un-sent, a refused state dropped.

Beside farm.jobs.service (whose compare-and-set helpers it uses), kept apart for its
size. Every change is a compare-and-set, fenced by the
segment's task id where a render task makes it (farm/tasks/preemption.py carries them out).
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from farm.db.session import session_scope
from farm.db.tables import JobState, Segment, SegmentState, utcnow
from farm.jobs import events
from farm.jobs.service import _cas_job, _cas_segment, _fenced, _job_is_live, _lock_job
from farm.settings import get_settings

log = logging.getLogger(__name__)


def request_preemption(db_url: str, segment_ids: list[int],
                       max_preemptions: int | None = None) -> int:
    """Ask running segments to yield their group at their next denoising step: those still
    running without a request, not in a batched render, and yielded fewer than
    ``max_preemptions`` times (None: FARM_MAX_PREEMPTIONS; also enforced where the victims
    are chosen: scheduler/preemption.py). Their render sees it at its next progress write.
    Returns how many were asked."""
    if not segment_ids:
        return 0
    if max_preemptions is None:
        max_preemptions = get_settings().max_preemptions
    with session_scope(db_url) as session:
        return session.execute(
            update(Segment).where(Segment.id.in_(list(segment_ids)),
                                  Segment.state == SegmentState.running.value,
                                  Segment.preempt_requested_at.is_(None),
                                  Segment.render_batch.is_(None),
                                  Segment.preemptions < max_preemptions,
                                  _job_is_live())
            .values(preempt_requested_at=utcnow())).rowcount


def clear_preemption_request(db_url: str, seg_id: int, task_id: str | None) -> bool:
    """A request that came after the segment's denoising ended: nothing to save, ignored.
    By the segment's current task only (``task_id``; None: unfenced), while it runs: a
    superseded task must not drop a request meant for its successor's render."""
    with session_scope(db_url) as session:
        return _cas_segment(session, seg_id, [SegmentState.running.value], *_fenced(task_id),
                            preempt_requested_at=None)


def discard_resume_state(db_url: str, seg_id: int, task_id: str | None) -> bool:
    """The segment's saved state is dropped (its render starts from noise: same seed, same
    video): the actor refused it, e.g. a redeploy changed the solver's config. By the
    segment's current task while it runs; False otherwise (the fields are left to the
    task that owns the segment now)."""
    with session_scope(db_url) as session:
        return _cas_segment(session, seg_id, [SegmentState.running.value], *_fenced(task_id),
                            resume_key=None, resume_sha256=None, resume_step=None)


def yield_segment(db_url: str, seg_id: int, task_id: str | None, resume_key: str,
                  sha256: str, step: int, message: str) -> bool:
    """running -> pending after its render saved its state at ``step`` (``resume_key``,
    its ``sha256``), by the segment's current task while its job is live. The attempt does
    not count (it did not fail), ``preemptions`` counts one more, the task id is cleared
    (nothing runs it now), the PREEMPTED event is written; and when no other segment of the
    job still runs, the job goes back to the queue un-sent (`_unsend_if_idle`). One
    transaction, the job's row locked (as `start_segment` locks it): two segments of a job
    yielding at once agree, and a sibling starting meanwhile is seen."""
    with session_scope(db_url) as session:
        job_id = session.scalar(select(Segment.job_id).where(Segment.id == seg_id))
        if job_id is None:
            return False
        _lock_job(session, job_id)
        if not _cas_segment(session, seg_id, [SegmentState.running.value], _job_is_live(),
                            *_fenced(task_id), state=SegmentState.pending.value,
                            celery_id=None, attempts=Segment.attempts - 1,
                            preemptions=Segment.preemptions + 1, preempt_requested_at=None,
                            resume_key=resume_key, resume_sha256=sha256, resume_step=step,
                            heartbeat_at=None):
            return False
        index = session.scalar(select(Segment.index).where(Segment.id == seg_id))
        events.add(session, job_id, events.PREEMPTED, message, index)
        _unsend_if_idle(session, job_id)
        return True


def unsend_job_if_idle(db_url: str, job_id: str) -> bool:
    """After a segment finished: a sibling that yielded earlier waits with no task; once no
    segment of the job runs, the job is given back to admission (`_unsend_if_idle`)."""
    with session_scope(db_url) as session:
        _lock_job(session, job_id)
        return _unsend_if_idle(session, job_id)


def _unsend_if_idle(session: Session, job_id: str) -> bool:
    """A running job none of whose segments runs, with a yielded segment waiting (pending,
    no task): back to queued and un-sent (dispatched_at, its chord's and its pending
    segments' task ids cleared), so admission sends it again in priority order and the old
    chord's later tasks and its stitch are fenced out (issue #15, the preamble's contract).
    The caller holds the job's row lock."""
    states = session.execute(select(Segment.state, Segment.celery_id)
                             .where(Segment.job_id == job_id)).all()
    running = any(state == SegmentState.running.value for state, _ in states)
    waiting = any(state == SegmentState.pending.value and task is None for state, task in states)
    if running or not waiting:
        return False
    if not _cas_job(session, job_id, [JobState.running.value], state=JobState.queued.value,
                    dispatched_at=None, celery_id=None):
        return False
    session.execute(update(Segment).where(Segment.job_id == job_id,
                                          Segment.state == SegmentState.pending.value)
                    .values(celery_id=None))
    log.info("job %s back in the queue: a segment yielded its group", job_id)
    return True
