"""The simulated day: SimPy events for arrivals, admission passes, renders, failures, windows.

What is the farm's own code, called as the live farm calls it (farm/jobs/submit.py and
farm/jobs/admit.py): the route (scheduler.routing.route, with the queue loads the live farm
computes: jobs waiting per queue, GPU-seconds queued or running), a batch's window over the
rule's, `must_wait`, the groups a job holds (farm.jobs.admit.job_groups, gpus_per_group) and
the admission decision (scheduler.admission.select_for_release with the quotas). What is
simulated: the GPUs (a job holds its groups for its estimated render time), failures
(exponential, ``per_gpu_hour`` per GPU rendering) and the result cache (a request whose key
matches a job that already succeeded is answered at once, without a GPU).

Scale (issue #14: 100,000 jobs a day on 1,000 GPUs): state is kept per tier (the waiting
line sorted as admission orders it, GPUs held per project and degree, given to admission
as whole nodes: `held_as`), a pass is handed one tier's line in pages of ``lookahead`` jobs
(select_for_release decides per tier, and farm.jobs.admit reads a tier's queue in pages
too), and with ``pass_every_s`` > 0 the passes that arrivals and finishes ask for are
batched to that tick; 0 runs one at each, as the live farm does.

Issue #15: the waiting line is in the farm's admission order (scheduler.deadlines.
admission_key: priority bands, earliest deadline first within a band); with ``batching``,
like single-segment jobs of a page go as one batched render (scheduler.batching.form_batches,
the variant's max_batch), and with ``preemption`` a route's preempt_at makes running work
yield at a step boundary (scheduler/simulate/runs.py). Both off give the farm before #15
with EDF; scheduler/simulate/compare.py runs the four combinations on one trace.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta

import simpy

from farm.jobs.admit import gpus_per_group, job_groups
from farm.jobs.result_cache import normalise
from farm.jobs.submit import must_wait, parse_window
from farm.policy import Policy
from scheduler.admission import Holding, TierSize, Waiting, select_for_release
from scheduler.batching import Batchable, batch_cap, batch_key, form_batches
from scheduler.deadlines import admission_key
from scheduler.planner import plan_segments
from scheduler.routing import JobSpec, NoRoute, QueueLoad, Route, route
from scheduler.simulate.fleet import Fleet
from scheduler.simulate.runs import GpuRuns
from scheduler.simulate.workload import TraceJob

DONE = ("succeeded", "cached", "failed", "rejected")


class SimJob:
    __slots__ = ("id", "trace", "route", "route_dict", "tier", "degree", "groups", "segments",
                 "render_s", "remaining_s", "est_gpu_s", "waiting", "sort_key", "state",
                 "why", "admitted_s", "finished_s", "attempts", "gpu_s", "cost", "key",
                 "run", "steps_total", "preemptions", "batch_key")

    def __init__(self, seq: int, trace: TraceJob):
        self.id, self.trace = f"j{seq:07d}", trace  # ids sort as the trace: ties go in order
        self.route = self.route_dict = self.tier = self.why = self.waiting = None
        self.admitted_s = self.finished_s = self.key = None
        self.state, self.attempts, self.gpu_s, self.cost = "new", 0, 0.0, 0.0
        self.degree = self.groups = self.segments = 1
        self.render_s = self.remaining_s = self.est_gpu_s = 0.0
        self.run = self.batch_key = None
        self.steps_total, self.preemptions = 1, 0


@dataclass
class TierState:
    size: TierSize
    cost_per_gpu_hour: float
    waiting: list = field(default_factory=list)  # (sort key, job), admission's order
    holding: Counter = field(default_factory=Counter)  # (project, degree) -> groups
    busy: int = 0  # GPUs rendering now
    busy_area: float = 0.0  # GPU-seconds rendered within the horizon
    running: dict = field(default_factory=dict)  # run seq -> runs.Run on the tier now
    last_change: float = 0.0
    dirty: bool = False  # a pass was asked for since the last tick

    @property
    def gpus(self) -> int:
        return self.size.nodes * self.size.gpus_per_node


@dataclass
class SimResult:
    jobs: list
    tiers: dict  # name -> TierState
    admissions: list  # (sim seconds, job id, tier), in admission order
    samples: list  # (sim seconds, {tier: (waiting jobs, busy GPUs)})
    horizon_s: float
    end_s: float
    start: datetime
    passes: int
    preempted: int = 0  # times a run yielded its groups (issue #15)
    batched_jobs: int = 0  # jobs rendered in a batch of two or more
    batch_runs: int = 0


class Simulation(GpuRuns):
    def __init__(self, fleet: Fleet, trace: list[TraceJob], hours: float = 24.0, seed: int = 0,
                 sample_s: float = 60.0, drain_hours: float = 24.0, preemption: bool = True,
                 batching: bool = True):
        self.env = simpy.Environment()
        self.fleet, self.policy = fleet, Policy(fleet.catalog, fleet.rules)
        self.start, self.horizon_s = fleet.doc.start, hours * 3600.0
        self.drain_s, self.sample_s = drain_hours * 3600.0, sample_s
        self.rng = random.Random(seed)
        self.jobs = [SimJob(i, t) for i, t in enumerate(trace) if t.at_s < self.horizon_s]
        self.tiers = {name: TierState(TierSize(t.count, t.gpus_per_node), t.cost_per_gpu_hour)
                      for name, t in fleet.catalog.tiers.items()}
        self.loads: dict[str, list] = {}  # queue -> [jobs waiting, GPU-seconds queued+running]
        self.succeeded_keys: set = set()
        self.parked: dict[tuple, list] = {}  # (window, timezone) -> jobs waiting for it
        self.admissions, self.samples, self.passes, self.open = [], [], 0, len(self.jobs)
        self.all_done = self.env.event()
        self.rule_fallbacks = {r.name: bool(r.fallbacks) for r in fleet.rules.rules}
        self.routes: dict = {}  # JobSpec -> Route, for rules without fallbacks
        self.groups: dict = {}  # (tier, GPUs a group, project, runnable) -> groups
        self.preemption, self.batching = preemption, batching
        self.preempted = self.batched_jobs = self.batch_runs = self.run_seq = 0

    # --- the day -------------------------------------------------------------------------
    def run(self) -> SimResult:
        self.env.process(self._arrivals())
        self.env.process(self._sampler())
        if self.fleet.admission.pass_every_s > 0:
            self.env.process(self._ticker(self.fleet.admission.pass_every_s))
        if self.open:
            self.env.run(until=self.env.any_of([self.all_done,
                                                self.env.timeout(self.horizon_s + self.drain_s)]))
        end = self.env.now
        for st in self.tiers.values():
            self._account(st)
        return SimResult(self.jobs, self.tiers, self.admissions, self.samples, self.horizon_s,
                         end, self.start, self.passes, self.preempted, self.batched_jobs,
                         self.batch_runs)

    def now_dt(self) -> datetime:
        return self.start + timedelta(seconds=self.env.now)

    def _arrivals(self):
        for job in self.jobs:
            if job.trace.at_s > self.env.now:
                yield self.env.timeout(job.trace.at_s - self.env.now)
            self._arrive(job)

    def _ticker(self, every: float):
        while True:
            yield self.env.timeout(every)
            for name, st in self.tiers.items():
                if st.dirty:
                    st.dirty = False
                    self._pass(name)

    def _sampler(self):
        while True:
            self.samples.append((self.env.now, {n: (len(st.waiting), st.busy)
                                                for n, st in self.tiers.items()}))
            yield self.env.timeout(self.sample_s)

    def _later(self, delay: float, fn, *args) -> None:
        self.env.timeout(delay).callbacks.append(lambda _event: fn(*args))

    # --- submission (farm/jobs/submit.py) ---------------------------------------------------
    def _arrive(self, job: SimJob) -> None:
        t = job.trace
        spec = JobSpec(track=t.track, width=t.width, height=t.height, frames=t.frames, fps=t.fps,
                       priority=t.priority, batch=t.batch is not None, project=t.project,
                       model=t.model, steps=t.steps, deadline_s=t.deadline_s)
        try:
            chosen = self._route(spec)
        except NoRoute as exc:
            return self._settle(job, "rejected", str(exc))
        if t.window:  # a batch's own window wins over its rule's (farm/jobs/batches.py)
            chosen = replace(chosen, window=t.window, timezone=t.timezone)
        job.route, job.route_dict, job.tier = chosen, _shallow(chosen), chosen.tier
        if t.cache and t.seed is not None:
            job.key = self._cache_key(job)
            if job.key in self.succeeded_keys:
                job.admitted_s = self.env.now
                return self._settle(job, "cached")
        if chosen.est_seconds is None:
            return self._settle(job, "rejected", f"no seconds_per_step for {chosen.variant} "
                                                 f"on tier {chosen.tier}: give it in measured")
        self._size(job)
        self._enqueue(job)

    def _route(self, spec: JobSpec):
        """scheduler.routing.route with the live farm's queue loads. Memoised per request
        where the rule that took it has no fallbacks: only a fallback reads the loads."""
        if spec in self.routes:
            return self.routes[spec]
        loads = {q: QueueLoad(w, b) for q, (w, b) in self.loads.items()}
        chosen = route(spec, self.fleet.rules, self.fleet.catalog, loads)
        if not self.rule_fallbacks[chosen.rule]:
            self.routes[spec] = chosen
        return chosen

    def _cache_key(self, job: SimJob) -> tuple:
        """The fields farm.jobs.result_cache keys on (the variant's files stand as its name)."""
        t, r = job.trace, job.route
        return (t.project, r.variant, repr(r.cache), normalise(t.prompt),
                normalise(t.negative_prompt), t.seed, t.width, t.height, t.fps, t.frames,
                t.steps, t.continuous)

    def _size(self, job: SimJob) -> None:
        variant = self.fleet.catalog.models[job.route.variant]
        job.segments = _segments(job.trace.frames, variant.max_frames)
        runnable = 1 if job.trace.continuous else job.segments
        job.degree = gpus_per_group(job.route_dict)
        shape = (job.tier, job.degree, job.trace.project, runnable)
        if shape not in self.groups:
            self.groups[shape] = job_groups(job.route_dict, job.trace.project, runnable,
                                            self.policy)
        job.groups = self.groups[shape]
        rounds = math.ceil(job.segments / job.groups)  # segments run `groups` at a time
        job.render_s = job.remaining_s = job.route.est_seconds * rounds / job.segments
        job.est_gpu_s = job.route.est_seconds * job.route.degree  # as admit.queue_loads
        steps = job.trace.steps or variant.default_steps
        job.steps_total = steps * rounds  # steps its groups run, one after another
        created = self.start + timedelta(seconds=job.trace.at_s)
        due = (None if job.trace.deadline_s is None
               else created + timedelta(seconds=job.trace.deadline_s))
        job.sort_key = admission_key(job.trace.priority, due, created, job.id)
        job.waiting = Waiting(job.id, job.trace.project, job.tier, job.degree,
                              job.trace.priority, created, job.groups, due)
        if variant.max_batch > 1 and job.segments == 1:  # as the farm batches (issue #15)
            job.batch_key = batch_key(variant.name, job.tier, job.trace.width,
                                      job.trace.height, job.trace.frames, steps,
                                      variant.guidance_high, variant.guidance_low,
                                      job.route.cache)

    def _window_holds(self, job: SimJob, now: datetime) -> bool:
        """Its window is closed and it has not started: a job preempted (or retried) after
        it started finishes, as the farm's started jobs do (farm.jobs.admit._waiting,
        batches.apply_windows; issue #15 review)."""
        return job.admitted_s is None and must_wait(job.route_dict, now)

    def _enqueue(self, job: SimJob) -> None:
        if self._window_holds(job, self.now_dt()):
            return self._park(job)
        job.state = "queued"
        load = self.loads.setdefault(job.route.queue, [0, 0.0])
        load[0] += 1
        load[1] += job.est_gpu_s
        bisect.insort(self.tiers[job.tier].waiting, (job.sort_key, job))
        self._want_pass(job.tier)

    def _park(self, job: SimJob) -> None:
        """A closed window: the job waits unseen by admission until it opens (batches.tick)."""
        job.state = "parked"
        spot = (job.route.window, job.route.timezone)
        if spot not in self.parked:
            self.parked[spot] = []
            opens = parse_window(*spot).next_open(self.now_dt())
            self._later((opens - self.now_dt()).total_seconds(), self._wake, spot)
        self.parked[spot].append(job)

    def _wake(self, spot: tuple) -> None:
        for job in self.parked.pop(spot, []):
            self._enqueue(job)

    # --- admission (farm/jobs/admit.py) ------------------------------------------------------
    def _want_pass(self, tier: str) -> None:
        if self.fleet.admission.pass_every_s > 0:
            self.tiers[tier].dirty = True
        else:
            self._pass(tier)

    def _pass(self, tier: str) -> None:
        """One tier's pass, as farm.jobs.admit.choose_in_tier: a page of the tier's line at
        a time, the next only while the last was full and nothing stopped the line."""
        st = self.tiers[tier]
        if not st.waiting:
            return
        if st.busy >= st.gpus and st.gpus:
            self._preempt_for(st, st.waiting[0][1])  # the farm's preempt_for_waiting
            return
        self.passes += 1
        page, now = self.fleet.admission.lookahead, self.now_dt()
        holding, released, impossible = held_as(st, tier), [], {}
        batch_of, blocked = {}, None  # job id -> the batch it goes in; who stopped the line
        lines = st.waiting[:page * self.fleet.admission.pages]
        for first in range(0, len(lines), page):
            ahead = []
            for _key, job in lines[first:first + page]:
                if job.route.window and self._window_holds(job, now):
                    self._repark(st, job)  # its window closed since it queued
                else:
                    ahead.append(job)
            free = st.gpus - sum(h.gpus for h in holding)
            batches = self._batches(ahead, max(0, free)) if self.batching else []
            decision = select_for_release([j.waiting for j in ahead], holding,
                                          {tier: st.size}, self.fleet.rules.quotas, batches)
            batch_of.update((m, b) for b in decision.batches for m in b)
            blocked = decision.blocked.get(tier)
            went = set(decision.released)
            released += [j for j in ahead if j.id in went]
            impossible.update({j.id: (j, decision.impossible[j.id]) for j in ahead
                               if j.id in decision.impossible})
            # An older select_for_release has no `blocked`: one page, as the farm read then.
            if getattr(decision, "blocked", True) or first + page >= len(lines):
                break
            holding += [Holding(j.trace.project, tier, j.degree, j.groups)
                        for j in ahead if j.id in went]  # they hold GPUs on the next page
        by_id = {j.id: j for j in released}
        for job in released:
            self._unqueue(st, job)
        for job in released:
            members = batch_of.get(job.id, (job.id,))
            if members[0] == job.id:  # a batch starts with its first member
                self._start(st, [by_id[m] for m in members])
        if blocked is not None and st.waiting and st.waiting[0][1].id == blocked:
            self._preempt_for(st, st.waiting[0][1])
        for job, why in impossible.values():
            self._unqueue(st, job)
            self.loads[job.route.queue][1] -= job.est_gpu_s
            self._settle(job, "failed", f"cannot run as routed: {why}")

    def _repark(self, st: TierState, job: SimJob) -> None:
        """Parked again, unseen by the loads (the live farm's parked jobs are `waiting`)."""
        self._unqueue(st, job)
        self.loads[job.route.queue][1] -= job.est_gpu_s
        self._park(job)

    def _unqueue(self, st: TierState, job: SimJob) -> None:
        del st.waiting[bisect.bisect_left(st.waiting, (job.sort_key,))]
        self.loads[job.route.queue][0] -= 1

    def _batches(self, ahead: list, free_groups: int) -> list[list[str]]:
        """Batches of two or more among a page's jobs (in admission order), per key, as
        farm.jobs.admit_batches.plan: idle groups first (batch_cap), then form_batches over
        every job of the page (the others as alone), so no batch pulls a member past a job
        of higher priority than all its members."""
        out = []
        keys = [j.batch_key for j in ahead if j.batch_key is not None]
        for key in set(keys):
            variant = next(j.route.variant for j in ahead if j.batch_key == key)
            cap = batch_cap(keys.count(key), free_groups,
                            self.fleet.catalog.models[variant].max_batch)
            if cap < 2:
                continue
            items = [Batchable(j.id, j.trace.priority, key if j.batch_key == key else None)
                     for j in ahead]
            out += [b for b in form_batches(items, cap) if len(b) > 1]
        return out

    def _account(self, st: TierState) -> None:
        """GPU-seconds busy up to now, within the horizon (for utilisation)."""
        now = min(self.env.now, self.horizon_s)
        if now > st.last_change:
            st.busy_area += st.busy * (now - st.last_change)
            st.last_change = now

    def _settle(self, job: SimJob, state: str, why: str | None = None) -> None:
        job.state, job.why, job.finished_s = state, why, self.env.now
        self.open -= 1
        if self.open == 0:
            self.all_done.succeed()


def held_as(st: TierState, tier: str) -> list[Holding]:
    """The tier's holdings for select_for_release, one entry per project and degree. Where
    every group on the tier has one degree that divides the node, a project's groups are
    given as whole nodes (groups of gpus_per_node) after everyone's remainder groups: its
    first-fit placement then leaves nodes of the same free GPUs, in an order that differs
    only by full nodes (which no placement can use), as placing each group would, and each
    project counts the same GPUs against its quota; a pass costs nodes, not groups."""
    held = [(project, degree, groups) for (project, degree), groups in st.holding.items()
            if groups]
    per_node = st.size.gpus_per_node
    if len({degree for _, degree, _ in held}) != 1 or per_node % held[0][1]:
        return [Holding(project, tier, degree, groups) for project, degree, groups in held]
    per = per_node // held[0][1]  # groups a node holds
    rest = [Holding(p, tier, d, g % per) for p, d, g in held if g % per]
    whole = [Holding(p, tier, per_node, g // per) for p, d, g in held if g >= per]
    return rest + whole


_ROUTE_FIELDS = tuple(f.name for f in fields(Route))


def _shallow(chosen: Route) -> dict:
    """Route.as_dict without asdict's deep copies (the same keys and values): 100,000 a day."""
    return {name: getattr(chosen, name) for name in _ROUTE_FIELDS}


_SEGMENTS: dict[tuple[int, int], int] = {}


def _segments(frames: int, max_frames: int) -> int:
    """Segments the planner splits a job into (scheduler.planner.plan_segments), memoised."""
    key = (frames, max_frames)
    if key not in _SEGMENTS:
        _SEGMENTS[key] = len(plan_segments(frames, max_frames, 0))
    return _SEGMENTS[key]


def simulate(fleet: Fleet, trace: list[TraceJob], hours: float = 24.0, seed: int = 0,
             **kwargs) -> SimResult:
    return Simulation(fleet, trace, hours, seed, **kwargs).run()
