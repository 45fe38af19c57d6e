"""The integrity check (issue #13, item 2): stored videos are re-hashed on a schedule, not
on every download.

Each retention tick re-hashes the FARM_VERIFY_PER_TICK succeeded jobs whose video was
verified longest ago (index ``ix_jobs_state_verified_at``; a job enters the rotation when
retention settles it, its sha256 having been taken when it was stored). One file may be
the video of several jobs (a job answered from the result cache shares its source's
``output_key``): it is hashed once, and every succeeded job naming it is stamped, and
marked or cleared, together. To verify each video once a day the tick must keep up with
the farm: FARM_VERIFY_PER_TICK >= jobs a day x the tick's seconds / 86400 (farm/settings.py).

A video that no longer matches its recorded sha256, or is missing, is logged as an error,
recorded in each job's log (``output_corrupt``) and in ``jobs.error`` (starting with
CORRUPT_PREFIX: the one mark ``is_corrupt`` reads; no column of its own without a
migration); the download route then refuses it (500) rather than serve bytes the record
does not vouch for, and the result cache stops answering with it (``servable``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import or_, select, update

from farm.db.session import session_scope
from farm.db.tables import Job, JobState, utcnow
from farm.jobs import events
from farm.settings import Settings
from farm.storage import Storage

log = logging.getLogger(__name__)

OUTPUT_CORRUPT = "output_corrupt"  # the job-log event
CORRUPT_PREFIX = "integrity check: "  # how jobs.error starts when this check marked it
HASH_THREADS = 4  # videos hashed at once per tick (reads from storage, mostly waiting)


def corrupt_message(key: str, recorded: str | None, found: str | None) -> str:
    return (f"{CORRUPT_PREFIX}stored video {key} does not match its recorded sha256 "
            f"{recorded} (found {found or 'no file'}): it is not served")


def is_corrupt(job: Job) -> bool:
    """The integrity check found the job's stored video damaged or gone."""
    return job.state == JobState.succeeded.value and bool(job.error) \
        and job.error.startswith(CORRUPT_PREFIX)


def servable(job: Job) -> bool:
    """The job's video may be served (or reused by the result cache): not marked corrupt."""
    return not is_corrupt(job)


def verify_outputs(settings: Settings, limit: int | None = None) -> list[str]:
    """Re-hash the least recently verified videos, each file once; returns the ids of the
    jobs found corrupt (every job sharing a bad file)."""
    limit = settings.verify_per_tick if limit is None else limit
    if limit <= 0:
        return []
    with session_scope(settings.database_url) as session:
        due = session.execute(
            select(Job.id, Job.output_key).where(Job.state == JobState.succeeded.value,
                                                 Job.verified_at.is_not(None))
            .order_by(Job.verified_at).limit(limit)).all()
    one_per_file = list({key: job_id for job_id, key in reversed(due)}.values())
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(one_per_file)))) as pool:
        found = list(pool.map(lambda job_id: verify_file(settings, job_id), one_per_file))
    return [job_id for bad in found for job_id in bad]


def _sharing(source_id: str, key: str):
    """Succeeded jobs whose video is the file ``key`` of job ``source_id`` (the job under
    whose prefix it lies and the jobs answered with it: indexes on id and cached_from)."""
    return (Job.state == JobState.succeeded.value, Job.output_key == key,
            or_(Job.id == source_id, Job.cached_from == source_id))


def verify_job(settings: Settings, job_id: str) -> bool:
    """Re-hash one job's stored video (and mark or clear every job sharing it): whether it
    matched."""
    return not verify_file(settings, job_id)


def verify_file(settings: Settings, job_id: str) -> list[str]:
    """Re-hash one job's stored video; returns the ids of the succeeded jobs sharing it that
    are now marked corrupt ([] when it matched). A mismatch is logged and recorded in each
    sharing job's log (once) and ``jobs.error``; a match clears the marks an earlier check
    left (the file was restored). Every sharing job is stamped verified."""
    storage = Storage(settings.storage_url)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        key, recorded = job.output_key, job.output_sha256
        source_id = job.cached_from or job.id
    found = storage.sha256(key) if key and storage.exists(key) else None
    with session_scope(settings.database_url) as session:
        sharing = list(session.scalars(select(Job).where(*_sharing(source_id, key))))
        bad = [j for j in sharing if found != j.output_sha256]
        if bad:
            message = corrupt_message(key, recorded, found)
            log.error("jobs %s: %s", ", ".join(j.id for j in bad), message)
            for j in bad:
                if not is_corrupt(j):
                    events.add(session, j.id, OUTPUT_CORRUPT, message)
        for j in sharing:
            values = {"verified_at": utcnow()}
            if j in bad:
                values["error"] = corrupt_message(key, j.output_sha256, found)
            elif is_corrupt(j):
                values["error"] = None
            session.execute(update(Job).where(Job.id == j.id,
                                              Job.state == JobState.succeeded.value)
                            .values(**values))
    return [j.id for j in bad]
