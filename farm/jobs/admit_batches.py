"""Batches of like jobs in an admission pass (issue #15, item 2): which waiting jobs of a
page go together, which lone one waits for companions, and the groups batches hold.

The decisions are scheduler.batching's (form_batches, may_hold) and scheduler.admission's
(a batch takes ONE group); this module reads what they need from the page's rows. A job is
batchable when its variant's ``max_batch`` > 1 and one batched forward pass can render it:
one segment, pending, not resuming a saved state (farm.jobs.admit_queries.batch_candidates),
on a single-rank, unsplit, uncached route (what farm.jobs.dispatch.enqueue_batch accepts).
Shipped variants have ``max_batch`` 1: nothing batches, and a pass reads nothing more.
"""

from __future__ import annotations

from datetime import datetime

from farm.jobs.admit_queries import batch_candidates
from scheduler.admission import Holding, Waiting
from scheduler.batching import Batchable, batch_cap, batch_key, form_batches, may_hold


def _variant(policy, route: dict):
    return policy.catalog.models.get(route.get("variant"))


def _batches_alone(route: dict) -> bool:
    """Routes a batched render never takes (farm.jobs.dispatch._check_alike says why)."""
    return (route.get("degree", 1) != 1 or route.get("placement", "resident") == "split"
            or route.get("parallel", "single") != "single" or route.get("cache") is not None)


def keys(session, rows, policy) -> dict[str, tuple]:
    """Job id -> batch key, for the page's batchable jobs only. The key adds the route's
    queue (one Celery queue per batch) to scheduler.batching.batch_key's."""
    maybe = [r for r in rows
             if (v := _variant(policy, r.route)) is not None and v.max_batch > 1
             and not _batches_alone(r.route)]
    able = batch_candidates(session, [r.id for r in maybe])
    return {r.id: batch_key(r.route["variant"], r.route["tier"], r.width, r.height, r.frames,
                            r.steps, r.guidance_high, r.guidance_low, r.route.get("cache"))
            + (r.route.get("queue"),)
            for r in maybe if r.id in able}


def plan(waiting: list[Waiting], rows, keyed: dict[str, tuple], policy, now: datetime,
         in_order, free_groups: int) -> tuple[list[list[str]], set[str]]:
    """(batches of two or more, in admission order; lone jobs to hold for companions).
    ``in_order``: scheduler.admission.queue_order; ``free_groups``: single-rank groups the
    tier has free now. Each key's jobs are batched up to scheduler.batching.batch_cap (idle
    groups first, at most the variant's max_batch); the other jobs stay in the line as
    singletons, so the rule that a batch never passes a job of higher priority than all its
    members holds across keys."""
    if not keyed:
        return [], set()
    route_of = {r.id: r.route for r in rows}
    line = in_order(waiting)
    batches: list[list[str]] = []
    for key in set(keyed.values()):
        variant = policy.catalog.models[key[0]]
        like = sum(1 for k in keyed.values() if k == key)
        cap = batch_cap(like, free_groups, variant.max_batch)
        if cap < 2:
            continue
        mine = [Batchable(w.job_id, w.priority, key if keyed.get(w.job_id) == key else None)
                for w in line]
        batches += [b for b in form_batches(mine, cap) if len(b) > 1]
    in_batch = {j for b in batches for j in b}
    hold = set()
    for w in line:
        if w.job_id not in keyed or w.job_id in in_batch:
            continue
        variant = policy.catalog.models[route_of[w.job_id]["variant"]]
        like = sum(1 for k in keyed.values() if k == keyed[w.job_id])
        if batch_cap(like + 1, free_groups, variant.max_batch) < 2:
            continue  # a companion would find an idle group of its own: holding only delays
        age_ms = (now - w.created_at).total_seconds() * 1000
        others = [o.priority for o in line if o.job_id != w.job_id]
        if may_hold(Batchable(w.job_id, w.priority, keyed[w.job_id]), age_ms,
                    variant.batch_wait_ms, variant.max_batch, others):
            hold.add(w.job_id)
    position = {w.job_id: i for i, w in enumerate(line)}
    return sorted(batches, key=lambda b: position[b[0]]), hold


def group_holdings(rows, tier: str, held_by) -> list[Holding]:
    """One Holding per job on the tier's GPUs, except that the jobs of one batched render
    (``rows``' ``batch``) share ONE group: the first holds it, and the other projects riding
    in it are charged its GPUs too (as scheduler.admission charges a batch it releases).
    ``held_by(row) -> Holding | None``: a lone job's holding (None: it holds none)."""
    out, batches = [], {}
    for r in rows:
        one = held_by(r)
        if one is None:
            continue
        if getattr(r, "batch", None) is None:
            out.append(one)
        elif r.batch not in batches:
            batches[r.batch] = one
        elif one.project not in (batches[r.batch].project, *batches[r.batch].shared_with):
            first = batches[r.batch]
            batches[r.batch] = Holding(first.project, tier, first.degree, 1,
                                       (*first.shared_with, one.project))
    return out + [Holding(h.project, tier, h.degree, 1, h.shared_with) for h in batches.values()]


def sent_holdings(waiting: list[Waiting], released: tuple[str, ...],
                  batches: tuple[tuple[str, ...], ...], tier: str) -> list[Holding]:
    """What a page's released jobs hold on the next page: a batch one group."""
    by_id = {w.job_id: w for w in waiting}
    in_batch = {j for b in batches for j in b}
    out = [Holding(by_id[j].project, tier, by_id[j].degree, by_id[j].groups)
           for j in released if j not in in_batch]
    for batch in batches:
        head, projects = by_id[batch[0]], dict.fromkeys(by_id[j].project for j in batch)
        out.append(Holding(head.project, tier, head.degree, 1,
                           tuple(p for p in projects if p != head.project)))
    return out
