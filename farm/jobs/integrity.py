"""The integrity check (issue #13, item 2): stored videos are re-hashed on a schedule, not
on every download.

Each beat tick re-hashes the FARM_VERIFY_PER_TICK succeeded jobs whose video was verified
longest ago (index ``ix_jobs_state_verified_at``; a job enters the rotation when retention
settles it, its sha256 having been taken when it was stored). A video that no longer matches
its recorded sha256, or is missing, is logged as an error, recorded in the job's log
(``output_corrupt``) and in ``jobs.error``; the download route then refuses it (500) rather
than serve bytes the record does not vouch for.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from farm.db.session import session_scope
from farm.db.tables import Job, JobState, utcnow
from farm.jobs import events
from farm.settings import Settings
from farm.storage import Storage

log = logging.getLogger(__name__)

OUTPUT_CORRUPT = "output_corrupt"  # the job-log event


def corrupt_message(key: str, recorded: str | None, found: str | None) -> str:
    return (f"stored video {key} does not match its recorded sha256 {recorded} (found "
            f"{found or 'no file'}, integrity check): it is not served")


def verify_outputs(settings: Settings, limit: int | None = None) -> list[str]:
    """Re-hash the least recently verified videos; returns the ids found corrupt."""
    limit = settings.verify_per_tick if limit is None else limit
    if limit <= 0:
        return []
    with session_scope(settings.database_url) as session:
        due = list(session.scalars(
            select(Job.id).where(Job.state == JobState.succeeded.value,
                                 Job.verified_at.is_not(None))
            .order_by(Job.verified_at).limit(limit)))
    return [job_id for job_id in due if not verify_job(settings, job_id)]


def verify_job(settings: Settings, job_id: str) -> bool:
    """Re-hash one job's stored video. A mismatch is logged, recorded in the job's log and
    ``jobs.error``; a match clears a mark an earlier check left (the file was restored)."""
    storage = Storage(settings.storage_url)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        key, recorded, marked = job.output_key, job.output_sha256, is_corrupt(job)
    found = storage.sha256(key) if key and storage.exists(key) else None
    with session_scope(settings.database_url) as session:
        values: dict = {"verified_at": utcnow()}
        if found != recorded:
            message = corrupt_message(key, recorded, found)
            log.error("job %s: %s", job_id, message)
            if not marked:
                events.add(session, job_id, OUTPUT_CORRUPT, message)
            values["error"] = message
        elif marked:
            values["error"] = None
        session.execute(update(Job).where(Job.id == job_id,
                                          Job.state == JobState.succeeded.value).values(**values))
    return found == recorded


def is_corrupt(job: Job) -> bool:
    """The integrity check found the job's stored video damaged or gone."""
    return job.state == JobState.succeeded.value and bool(job.error) \
        and job.error.startswith("stored video ")
