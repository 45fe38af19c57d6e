"""Admission: queued jobs wait in the database and go to their tier's Celery queue when the
scheduler's policy lets them (scheduler.admission: priority, tier capacity, project quotas).

One scheduler, not two: a tier's Celery queue only ever holds work its GPUs can
take now, so priorities are never lost in a broker queue. `release` runs after a submission,
whenever a job leaves the GPUs, and on every Celery beat tick. Decisions are taken under a
lock and recorded by compare-and-set on ``dispatched_at`` before anything is sent; a send
that fails is undone, and the next release sends the job again.

At fleet scale (issue #14, item 5) a pass costs what the GPUs hold, not what waits: each
tier passes on its own (its own lock, farm.jobs.admit_locks) over a bounded look-ahead,
the top LOOK_AHEAD waiting jobs of the tier in admission order, read through a
partial index (farm.jobs.admit_queries), and the jobs on its GPUs, read through
a partial index of the jobs in flight. A pass reads more pages only while the tier still
has room (the jobs read were passed over for their project's quota), MAX_PAGES at most. A
submission runs no pass unless its own job could go now (or is urgent), and then one page
of its tier (`release_submitted`).

Issue #15: the line's order is earliest deadline first within a priority band
(scheduler.deadlines.admission_key, index ix_jobs_admission_edf); like jobs of a page go as
one batched render on one group (farm.jobs.admit_batches, sent by farm.jobs.admit_send); a
tier whose line ends blocked asks running segments of lower priority to yield
(farm.jobs.preempt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import func, select

from farm.db.tables import Job, JobState, Segment, SegmentState, utcnow
from farm.db.session import session_scope
from farm.jobs import admit_batches, admit_send
from farm.jobs.admit_locks import locked_session, tier_session
from farm.jobs.admit_queries import (
    ON_GPUS, holding_rows, look_ahead, orphan_rows, queue_loads_lazy,
)
from farm.policy import get_policy
from farm.settings import Settings
from scheduler.admission import (
    Holding, TierSize, Waiting, groups_for, queue_order, select_for_release,
)
from scheduler.preemption import qualifies
from scheduler.routing import QueueLoad

log = logging.getLogger(__name__)

__all__ = ["ON_GPUS", "locked_session", "release", "release_soon", "release_submitted"]
LOOK_AHEAD = 100  # waiting jobs of a tier a pass reads at once (a page)
MAX_PAGES = 5  # pages a full pass reads at most, while its tier has room


def runnable_segments(session, job_ids: list[str]) -> dict[str, int]:
    """Per job: segments that need a group now. A continuous job's segments continue one
    another (one at a time); an independent job's all can. A segment whose denoising has
    ended (progress 1.0: decoding, encoding, storing) needs none: its group is given back
    when its last frame leaves, and the next segment may go to it meanwhile."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.continuous, func.count(Segment.id))
        .join(Segment, Segment.job_id == Job.id)
        .where(Job.id.in_(job_ids),
               Segment.state.in_((SegmentState.pending.value, SegmentState.running.value)),
               Segment.progress < 1.0)
        .group_by(Job.id, Job.continuous)).all()
    return {job_id: (min(1, n) if continuous else n) for job_id, continuous, n in rows}


def gpus_per_group(route: dict) -> int:
    """GPUs one of the route's pool members takes: its degree, twice over for the split
    placement, whose member is a pair of groups (one per expert)."""
    return route["degree"] * (2 if route.get("placement") == "split" else 1)


def pool_size(route: dict, policy=None) -> int:
    """Members of the route's pool: as many as its tier's nodes pack; 0 for an unknown tier."""
    tier = (policy or get_policy()).catalog.tiers.get(route["tier"])
    if tier is None:
        return 0
    return TierSize(tier.count, tier.gpus_per_node).groups(gpus_per_group(route))


def job_groups(route: dict, project: str, runnable: int, policy=None) -> int:
    """The groups a job holds while on the GPUs (scheduler.admission.groups_for)."""
    policy = policy or get_policy()
    if route["tier"] not in policy.catalog.tiers:
        return 1
    return groups_for(runnable, pool_size(route, policy), gpus_per_group(route),
                      policy.rules.quotas.limit(project, route["tier"]))


def _waiting(rows, runnable: dict[str, int], policy, now) -> list[Waiting]:
    """The page's jobs as the policy sees them; a job whose window has closed since the
    last tick is left out (the tick parks it), unless it has started: a job preempted
    back into the line (issue #15) finishes, as running ones do when a window closes."""
    from farm.jobs.submit import must_wait

    return [Waiting(r.id, r.project, r.route["tier"], gpus_per_group(r.route), r.priority,
                    r.created_at, job_groups(r.route, r.project,
                                             1 if r.continuous else runnable.get(r.id, 0), policy),
                    r.deadline_at)
            for r in rows if r.started_at is not None or not must_wait(r.route, now)]


def holdings(session, tier: str, policy) -> list[Holding]:
    """What the tier's GPUs hold: one entry per job sent and not ended, with the groups its
    segments still denoising take (a job whose segments all denoised holds none); the jobs
    of one batched render hold one group together (issue #15)."""
    def held_by(r) -> Holding | None:
        runnable = min(1, r.runnable) if r.continuous else r.runnable
        return Holding(r.project, tier, gpus_per_group(r.route),
                       job_groups(r.route, r.project, runnable, policy)) if runnable else None

    return admit_batches.group_holdings(holding_rows(session, tier), tier, held_by)


@dataclass
class TierPass:
    """One tier's pass: jobs marked as sent (in send order), those that can never run as
    routed (id -> why), the released batches (each sent as one render), and the job that
    found no room (None: the line was not blocked)."""
    chosen: list[str] = field(default_factory=list)
    impossible: dict[str, str] = field(default_factory=dict)
    batches: list[tuple[str, ...]] = field(default_factory=list)
    blocked: str | None = None


def choose_in_tier(session, tier: str, pages: int = MAX_PAGES) -> TierPass:
    """One tier's pass (under its lock), page after page of the tier's queue while the
    tier has room. Like jobs of a page go as batches (farm.jobs.admit_batches)."""
    from farm.jobs import service as jobs

    policy, now = get_policy(), utcnow()
    spec = policy.catalog.tiers[tier]
    size = {tier: TierSize(spec.count, spec.gpus_per_node)}
    holding = holdings(session, tier, policy)
    out, after = TierPass(), None
    for _ in range(pages):
        rows = look_ahead(session, tier, LOOK_AHEAD, after)
        # A continuous job takes one group whatever is left of it: count the others only.
        runnable = runnable_segments(session, [r.id for r in rows if not r.continuous])
        waiting = _waiting(rows, runnable, policy, now)
        free = spec.count * spec.gpus_per_node - sum(h.gpus for h in holding)
        batches, hold = admit_batches.plan(waiting, rows, admit_batches.keys(session, rows, policy),
                                           policy, now, queue_order, max(0, free))
        decision = select_for_release(waiting, holding, size, policy.rules.quotas, batches, hold)
        claimed = {job_id for job_id in decision.released
                   if jobs.claim_for_dispatch(session, job_id)}
        out.chosen += [job_id for job_id in decision.released if job_id in claimed]
        out.batches += [tuple(j for j in b if j in claimed) for b in decision.batches]
        out.impossible.update(decision.impossible)
        out.blocked = decision.blocked.get(tier)
        if decision.blocked or len(rows) < LOOK_AHEAD:
            break
        # they hold their GPUs on the next page
        holding += admit_batches.sent_holdings(waiting, decision.released, decision.batches, tier)
        after = rows[-1]
    return out


def orphans(session) -> dict[str, str]:
    """Waiting jobs of a tier the policy no longer declares (one page): they never run."""
    return {r.id: f"tier {r.tier!r} is not declared"
            for r in orphan_rows(session, list(get_policy().catalog.tiers), LOOK_AHEAD)}


def _choose(session, pages: int = MAX_PAGES) -> tuple[list[str], dict[str, str]]:
    """Every tier's pass in one session that holds the farm-wide lock (tests, tools)."""
    chosen, impossible = [], orphans(session)
    for tier in get_policy().catalog.tiers:
        passed = choose_in_tier(session, tier, pages)
        chosen += passed.chosen
        impossible.update(passed.impossible)
    return chosen, impossible


def release(settings: Settings, enqueue: Callable | None = None, tiers: list[str] | None = None,
            wait: bool = True, pages: int = MAX_PAGES,
            enqueue_batch: Callable | None = None) -> list[str]:
    """Send every job the policy admits now, tier by tier (each under its own lock);
    returns their ids. ``tiers``: only those (and no look for jobs of undeclared tiers);
    ``wait=False``: skip a tier whose pass another caller will run (admit_locks). Raises
    QueueUnavailable (after undoing the marks) when the broker refuses a send. A tier whose
    line is blocked then looks for segments to preempt (farm.jobs.preempt, issue #15)."""
    from farm.jobs import service as jobs

    db = settings.database_url
    passes: dict[str, TierPass] = {}
    impossible = {}
    if tiers is None:
        with session_scope(db) as session:
            impossible = orphans(session)  # e.g. a tier removed from the policy since
    for tier in tiers if tiers is not None else get_policy().catalog.tiers:
        with tier_session(db, tier, wait) as session:
            if session is not None:
                passes[tier] = choose_in_tier(session, tier, pages)
                impossible.update(passes[tier].impossible)
    for job_id, why in impossible.items():
        jobs.fail_job(db, job_id, f"cannot run as routed: {why}")
    sent = admit_send.send(db, list(passes.values()), enqueue, enqueue_batch)
    if sent:
        log.info("released %d job(s): %s", len(sent), ", ".join(sent))
    for tier, passed in passes.items():
        if passed.blocked is not None:
            admit_send.preempt_quietly(settings, tier, passed.blocked)
    return sent


def release_submitted(settings: Settings, job: Job, enqueue: Callable | None = None
                      ) -> list[str]:
    """After one job's submission. Its arrival changes nothing for the jobs already waiting
    (each change that frees room runs a full pass: a job leaving the GPUs, a tick), so
    unless the new job itself would go now (its tier has room and its project quota: read
    from the tier's holdings, a few rows) there is no pass at all. Else one page of its
    tier's queue, skipped when a pass that will see the job runs or is pending
    (farm.jobs.admit_locks). The page holds the highest priorities: nothing passes a job
    ahead of it; jobs past the page wait for the next full pass. An urgent job's
    submission always runs the page (it may preempt: farm.jobs.preempt)."""
    tier, policy = job.route["tier"], get_policy()
    if job.held or job.state != JobState.queued.value or tier not in policy.catalog.tiers:
        return []  # held, waiting for its window, or of no tier (the tick fails it)
    # An urgent job (its route's preempt_at reached, issue #15) runs the page even on a
    # full tier: a pass it blocks asks running segments to yield now, not at the next tick.
    urgent = qualifies(job.priority, job.route.get("preempt_at"))
    if not urgent and not _may_go_now(settings.database_url, job, policy):
        return []
    return release(settings, enqueue, tiers=[tier], wait=False, pages=1)


def _may_go_now(db_url: str, job: Job, policy) -> bool:
    """Would admission take ``job`` (or find it impossible) if it were first in line?"""
    tier = job.route["tier"]
    spec = policy.catalog.tiers[tier]
    with session_scope(db_url) as session:
        holding = holdings(session, tier, policy)
    pending = sum(1 for s in job.segments if s.state == SegmentState.pending.value)
    waiting = Waiting(job.id, job.project, tier, gpus_per_group(job.route), job.priority,
                      job.created_at, job_groups(job.route, job.project,
                                                 min(1, pending) if job.continuous else pending,
                                                 policy))
    decision = select_for_release([waiting], holding,
                                  {tier: TierSize(spec.count, spec.gpus_per_node)},
                                  policy.rules.quotas)
    return bool(decision.released or decision.impossible)


def release_soon(settings: Settings) -> None:
    """After a job leaves the GPUs: let the next ones in. A failure here is logged and left
    to the next beat tick, which releases again; the task that called must not fail for it.
    Not in the one-process `farm render` (eager tasks): it renders its own job, nothing else."""
    from farm.celery_app import app

    if app.conf.task_always_eager:
        return
    try:
        release(settings)
    except Exception:
        log.exception("release after a job left the GPUs failed; the next tick retries")


def queue_loads(db_url: str) -> Mapping[str, QueueLoad]:
    """Per queue: jobs waiting for GPUs, and GPU-seconds of work queued or running on it;
    read (one aggregate) only when routing asks, i.e. when a rule's fallback has a
    condition on it: most submissions never pay for it."""
    return queue_loads_lazy(db_url)
