"""Preemption's trigger (issue #15, item 1): an urgent job waits for a full tier.

After a tier's admission pass ends blocked (farm.jobs.admit: the job first in line found no
room; every tick runs a pass, so every tick looks again), ``preempt_for_waiting`` asks
scheduler.preemption.choose_victims which running segments yield their groups, and asks
those (farm.jobs.preemption_service.request_preemption); each renders up to its next denoising step,
saves its state and goes back to pending, its job re-queued, and the next pass sends the
urgent job first. Everything read goes through indexes: the line's first page
(ix_jobs_admission_edf), the tier's holdings and its running segments (ix_jobs_in_flight,
then the segments' job_id index): a few hundred rows at most, whatever the history holds.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from farm.db.session import session_scope
from farm.db.tables import Job, Segment
from farm.jobs import events, preemption_service as preempting
from farm.jobs.admit import gpus_per_group, holdings, job_groups, runnable_segments
from farm.jobs.admit_queries import batched_jobs, look_ahead, running_rows
from farm.policy import get_policy
from farm.settings import Settings
from scheduler.preemption import Running, choose_victims

# No function-local imports: farm.jobs.admit reaches this module only from inside a function
# (farm.jobs.admit_send.preempt_quietly), and farm.jobs.service imports neither, so importing
# both here at the top makes no cycle.

log = logging.getLogger(__name__)


def running_segments(session, tier: str) -> list[Running]:
    """The tier's segments that could yield (those on a group: admit_queries.running_rows),
    as scheduler.preemption sees them."""
    return [Running(r.id, r.job_id, r.priority, gpus_per_group(r.route), r.preemptions,
                    r.started_at.timestamp() if r.started_at else 0.0,
                    r.preempt_requested_at is not None)
            for r in running_rows(session, tier)]


def live_view(db_url: str, tier: str, policy) -> tuple[list[Running], list[str], int]:
    """For `farm rules explain` (issue #15): the tier's running segments that could yield,
    the jobs rendering in a batched render (never preempted), and its free GPUs, now."""
    with session_scope(db_url) as session:
        return (running_segments(session, tier), batched_jobs(session, tier),
                free_gpus(session, tier, policy))


def free_gpus(session, tier: str, policy) -> int:
    """GPUs of the tier no holding takes (the holdings admission counts)."""
    spec = policy.catalog.tiers[tier]
    return max(0, spec.count * spec.gpus_per_node
               - sum(h.gpus for h in holdings(session, tier, policy)))


def urgent_job(session, tier: str, job_id: str | None) -> Job | None:
    """The waiting job that found no room: ``job_id`` when the pass named it, else the
    first of the tier's line."""
    if job_id is None:
        rows = look_ahead(session, tier, 1)
        job_id = rows[0].id if rows else None
    return None if job_id is None else session.get(Job, job_id)


def ask(settings: Settings, chosen: list[Running]) -> list[Running]:
    """Ask ``chosen`` to yield (farm.jobs.preemption_service.request_preemption, which
    counts those it asked); those now asked. A victim may have ended or yielded since it was
    read: only when fewer than all were asked is the database read again for which (the log
    must name only those asked)."""
    ids = [v.segment_id for v in chosen]
    count = preempting.request_preemption(settings.database_url, ids,
                                    max_preemptions=settings.max_preemptions)
    if count == len(chosen) or count == 0:
        return chosen if count else []
    with session_scope(settings.database_url) as session:
        now_asked = set(session.scalars(select(Segment.id).where(
            Segment.id.in_(ids), Segment.preempt_requested_at.is_not(None))))
    return [v for v in chosen if v.segment_id in now_asked]


def preempt_for_waiting(settings: Settings, tier: str, job_id: str | None = None) -> list[int]:
    """Ask the segments scheduler.preemption chooses to yield to the tier's first waiting
    job (or ``job_id``, the job its pass found no room for); returns their segment ids
    ([] when its route does not preempt, the tier has room, or no set of victims frees
    enough). Each victim's job log says which job asked."""
    policy = get_policy()
    if tier not in policy.catalog.tiers:
        return []
    with session_scope(settings.database_url) as session:
        urgent = urgent_job(session, tier, job_id)
        if (urgent is None or urgent.dispatched_at is not None or urgent.held
                or urgent.route.get("preempt_at") is None):
            return []
        route = urgent.route
        runnable = 1 if urgent.continuous else runnable_segments(session, [urgent.id]).get(
            urgent.id, 1)
        need = gpus_per_group(route) * job_groups(route, urgent.project, runnable, policy)
        chosen = choose_victims(urgent.priority, need, free_gpus(session, tier, policy),
                                running_segments(session, tier), route.get("preempt_at"),
                                route.get("preempt_margin", 20), settings.max_preemptions)
        urgent_id, priority = urgent.id, urgent.priority
    chosen = ask(settings, chosen) if chosen else []
    for victim in chosen:
        events.record(settings.database_url, victim.job_id, events.PREEMPT_REQUESTED,
                      f"preemption requested for job {urgent_id} (priority {priority})")
    if chosen:
        log.info("tier %s: job %s (priority %d) asked segments %s to yield", tier, urgent_id,
                 priority, [v.segment_id for v in chosen])
    return [v.segment_id for v in chosen]
