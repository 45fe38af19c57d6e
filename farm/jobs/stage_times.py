"""A job's stage times and peak memory (issue #13): where its time went.

Stages, in seconds: ``queue_wait`` (creation to its first segment starting), ``load`` (finding
or making the actor group, loading the model, the start state), ``denoise`` (the sampler's
steps), ``decode`` (the VAE, on the actor), ``encode`` (H.264 chunks on the Celery worker,
stored), ``stitch`` (joining, checking and storing the video). Per-segment stages are summed
over the job's segments, so with segments rendered at once a stage can exceed the wall time.
Segments of one job may finish at the same moment: each adds its times under a row lock on
the job (SELECT ... FOR UPDATE), so no addition is lost.
"""

from __future__ import annotations

from sqlalchemy import select

from farm.db.session import session_scope
from farm.db.tables import Job

STAGES = ("queue_wait", "load", "denoise", "decode", "encode", "stitch")


def add_stages(db_url: str, job_id: str, seconds: dict[str, float],
               peak_memory_bytes: int | None = None) -> dict[str, float] | None:
    """Add ``seconds`` (stage -> seconds) to the job's stage times, set its queue wait once
    it has started, and raise its peak memory to ``peak_memory_bytes``. The merged times;
    None if there is no such job."""
    with session_scope(db_url) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()
                              ).scalar_one_or_none()
        if job is None:
            return None
        merged = dict(job.stage_times or {})
        for stage, value in seconds.items():
            merged[stage] = round(merged.get(stage, 0.0) + max(0.0, float(value)), 6)
        if "queue_wait" not in merged and job.started_at is not None:
            merged["queue_wait"] = round((job.started_at - job.created_at).total_seconds(), 6)
        job.stage_times = merged  # a new dict: the JSON column is written
        if peak_memory_bytes is not None:
            job.peak_memory_bytes = max(job.peak_memory_bytes or 0, int(peak_memory_bytes))
        return merged


def server_timing(stage_times: dict[str, float]) -> str:
    """The ``Server-Timing`` header's value: each stage's duration in milliseconds, in the
    order of STAGES (e.g. ``queue_wait;dur=1234.5, load;dur=80.2``)."""
    return ", ".join(f"{stage};dur={stage_times[stage] * 1000:.1f}"
                     for stage in STAGES if stage in stage_times)
