"""A segment yielding its group at a step boundary, and resuming later (issue #15, item 1).

The render task (farm/tasks/segment_runner.py) sees a request to yield at its progress write
(farm.jobs.preemption_service.request_preemption, asked by admission: farm/jobs/preempt.py)
and asks the group to stop after its next step; the group's last event carries the denoising
state (workers/resume_state.py). Here the state is stored under ``jobs/{id}/resume/`` (the
job's scratch: retention removes it with the job's folder) with its sha256, and the segment
goes back to pending with ``resume_key`` set (farm.jobs.preemption_service.yield_segment,
which also un-sends the job when none of its segments still runs, so admission sends it
again in priority order). The next start, on any group of the route's pool, reads the state
back.

A stored state that is missing, or whose sha256 or header does not match, or that the
group's pipeline refuses (another solver config or latent shape: a redeploy), is not used:
the segment starts from noise, and the job's log says so. Its seed fixes its noise, so the video
is the same; only the steps already done are run again (decided for issue #15: a lost state
costs time, never the job).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from farm.db.session import DATABASE_OUTAGE
from farm.jobs import events, preemption_service as preempting
from farm.settings import Settings
from farm.storage import Storage
from workers import resume_state
from workers.resume_state import ResumeStateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Yielded:
    """A render that stopped for a preemption: its stream's last event."""
    event: dict  # {"kind": "preempted", "state": bytes, "sha256", "step", "steps", "expert", ...}

    def describe(self, key: str) -> str:
        e = self.event
        return (f"at step {e['step']} of {e['steps']}, expert {e['expert']} (next: "
                f"{e.get('next_expert', e['expert'])}), state {key}")


def resume_key(job, segment, preemption: int) -> str:
    """One file per preemption: a late reader of the previous one never sees it change."""
    return f"jobs/{job.id}/resume/s{segment.index:04d}_p{preemption:02d}.safetensors"


def saved_state(settings: Settings, storage: Storage, job, segment) -> bytes | None:
    """The state a preempted segment resumes from, checked (its sha256, its header's step);
    None to start from noise: never preempted, or the stored state is unusable (logged).
    RESUMED is logged by `start_render`, once the group has taken the state."""
    key = segment.resume_key
    if key is None:
        return None
    try:
        if not storage.exists(key):
            raise ResumeStateError("missing from storage")
        with storage.open(key) as fh:
            data = fh.read()
        if resume_state.sha256_of(data) != segment.resume_sha256:
            raise ResumeStateError(f"sha256 {resume_state.sha256_of(data)} is not the stored "
                                   f"{segment.resume_sha256}")
        header = resume_state.describe(data)
        if header["step"] != segment.resume_step:
            raise ResumeStateError(f"it holds step {header['step']}, the segment says "
                                   f"{segment.resume_step}")
    except (ResumeStateError, OSError) as exc:
        events.record(settings.database_url, job.id, events.RESUME_DISCARDED,
                      f"state {key} not used ({exc}): starting from noise (same seed, same "
                      "video)", segment.index)
        log.warning("job %s segment %d: resume state %s not used: %s", job.id, segment.index,
                    key, exc)
        return None
    return data


def start_render(settings: Settings, storage: Storage, group, request: dict, job, segment,
                 task_id: str | None, state: bytes | None):
    """The group's render stream, resumed from ``state`` when there is one. Its first event
    says how the resume went: a progress event, and the job's log shows RESUMED (only once
    the actor has taken the state); "resume_refused" (the actor's pipeline cannot continue
    it: another solver config or latent shape, e.g. after a redeploy), and the state is
    dropped (RESUME_DISCARDED, the segment's resume fields cleared, the file removed) and
    the render starts again from noise on the same group: a lost state costs time, never
    the job."""
    stream = group.render(request, state=state)
    if state is None:
        return stream
    events_ = iter(stream)
    first = next(events_, None)
    db, key = settings.database_url, segment.resume_key
    if first is None or first["kind"] != "resume_refused":
        header = resume_state.describe(state)
        events.record(db, job.id, events.RESUMED,
                      f"from step {header['step']} of {header['info'].get('steps', job.steps)},"
                      f" state {key} verified (sha256 {segment.resume_sha256[:12]})",
                      segment.index)
        return FirstEventFirst(stream, first, events_)
    events.record(db, job.id, events.RESUME_DISCARDED,
                  f"state {key} refused by the group ({first['error']}): starting from noise "
                  "(same seed, same video)", segment.index)
    log.warning("job %s segment %d: resume state %s refused: %s", job.id, segment.index, key,
                first["error"])
    if preempting.discard_resume_state(db, segment.id, task_id):
        storage.remove(key)
    return group.render(request, state=None)


class FirstEventFirst:
    """A render stream whose first event was already read: it comes first again."""

    def __init__(self, stream, first: dict | None, rest):
        self.stream, self.first, self.rest = stream, first, rest

    def cancel(self) -> None:
        self.stream.cancel()

    def preempt(self) -> None:
        self.stream.preempt()

    def __iter__(self):
        if self.first is not None:
            yield self.first
        yield from self.rest


def store_and_yield(settings: Settings, storage: Storage, job, segment, task_id: str | None,
                    yielded: Yielded, work: Path) -> bool:
    """Store the state, then put the segment back to pending (fenced by ``task_id``). False
    when the segment is no longer this task's or its job ended: the file is removed."""
    event = yielded.event
    key = resume_key(job, segment, segment.preemptions + 1)
    with tempfile.NamedTemporaryFile(dir=work, suffix=".safetensors", delete=False) as fh:
        fh.write(event["state"])
    local = Path(fh.name)
    try:
        digest, _ = storage.put_file(local, key)
    finally:
        local.unlink(missing_ok=True)
    if digest != event["sha256"]:  # what the actor saved is not what was stored
        storage.remove(key)
        raise ResumeStateError(f"stored state {key} has sha256 {digest}, the render sent "
                               f"{event['sha256']}")
    if not preempting.yield_segment(settings.database_url, segment.id, task_id, key, digest,
                              event["step"], yielded.describe(key)):
        storage.remove(key)
        return False
    if segment.resume_key and segment.resume_key != key:
        storage.remove(segment.resume_key)  # the state it resumed from is superseded
    log.info("job %s segment %d yielded its group %s", job.id, segment.index,
             yielded.describe(key))
    return True


def after_finish(settings: Settings, job, segment) -> None:
    """A finished segment: its resume state is no longer needed (finish_segment cleared the
    row's fields), and a sibling that yielded may now let the job go back to the queue."""
    if segment.resume_key:
        try:
            Storage(settings.storage_url).remove(segment.resume_key)
        except OSError as exc:  # scratch: retention removes the job's folder anyway
            log.warning("job %s: resume state %s not removed: %s", job.id, segment.resume_key, exc)
    if len(job.segments) > 1:
        try:
            preempting.unsend_job_if_idle(settings.database_url, job.id)
        except DATABASE_OUTAGE as exc:  # its stitch finds the segment not done, and the
            # reconciler sends the job again (farm/tasks/reconcile.py)
            log.warning("job %s: not sent back after its segment finished, database "
                        "unavailable: %s", job.id, type(exc).__name__)
