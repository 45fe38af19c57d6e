"""The simulated GPUs (issue #15): renders, batched renders, preemption at a step boundary.

A ``Run`` is what holds a tier's GPUs: one job's render on its groups, or a batch of like
single-segment jobs rendered in ONE group through the batch dimension, all ending together
after ``scheduler.batching.batch_seconds`` of the solo render (the variant's measured
``batch_marginal``). A run ends by finishing, by a failure (exponential, per GPU-hour) or,
for a solo run only (batch members are never preempted, as in the farm), by yielding its
groups to an urgent job at its next denoising step boundary (``scheduler.preemption.
choose_victims`` chooses whom, for the tier's first waiting job when its route's
``preempt_at`` qualifies and the tier has no room). A yielding job loses no work: it goes
back to the queue in its place in admission order with the steps it rendered done, and
resumes later on any group of its tier (the farm's saved state; its reload is not modelled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.batching import batch_seconds
from scheduler.preemption import Running, choose_victims


@dataclass(eq=False)
class Run:
    seq: int
    members: list  # SimJob; the first is the head (the batch's, or the only one)
    gpus: int
    groups: int
    started_s: float
    duration_s: float
    active: bool = True
    yield_at_s: float | None = None  # asked to yield, at this step boundary (from its start)
    batch: bool = field(init=False)

    def __post_init__(self):
        self.batch = len(self.members) > 1


class GpuRuns:
    """Simulation's GPU side (mixed into scheduler.simulate.engine.Simulation)."""

    def _start(self, st, members: list) -> None:
        head = members[0]
        batched = len(members) > 1
        groups = 1 if batched else head.groups
        gpus = head.degree * groups
        duration = head.remaining_s
        if batched:
            marginal = self.fleet.catalog.models[head.route.variant].batch_marginal
            duration = batch_seconds(head.remaining_s, len(members), marginal)
            self.batched_jobs += len(members)
            self.batch_runs += 1
        self._account(st)
        st.busy += gpus
        st.holding[head.trace.project, head.degree] += groups
        self.run_seq += 1
        run = Run(self.run_seq, list(members), gpus, groups, self.env.now, duration)
        st.running[run.seq] = run
        for job in members:
            job.state, job.run = "running", run
            if job.admitted_s is None:
                job.admitted_s = self.env.now
                self.admissions.append((self.env.now, job.id, job.tier))
        rate = self.fleet.failures.per_gpu_hour * gpus / 3600.0  # failures per second
        fails_in = self.rng.expovariate(rate) if rate > 0 else math.inf
        if fails_in < duration:
            self._later(fails_in, self._fail, st, run, fails_in)
        else:
            self._later(duration, self._finish, st, run)

    def _leave(self, st, run: Run, seconds: float) -> None:
        """The run's GPUs are free; its GPU-seconds and cost are shared by its members."""
        self._account(st)
        run.active = False
        st.running.pop(run.seq, None)
        head = run.members[0]
        st.busy -= run.gpus
        st.holding[head.trace.project, head.degree] -= run.groups
        for job in run.members:
            share = seconds * run.gpus / len(run.members)
            job.gpu_s += share
            job.cost += share * st.cost_per_gpu_hour / 3600.0

    def _finish(self, st, run: Run) -> None:
        if not run.active:  # it yielded first
            return
        self._leave(st, run, run.duration_s)
        for job in run.members:
            self.loads[job.route.queue][1] -= job.est_gpu_s
            if job.key is not None:
                self.succeeded_keys.add(job.key)
            self._settle(job, "succeeded")
        self._want_pass(run.members[0].tier)

    def _fail(self, st, run: Run, after: float) -> None:
        """The GPUs are given back; a solo run keeps its finished rounds of segments (as the
        live farm keeps finished segments), a batch loses its one segment each; each job
        queues again after retry_delay_s, or fails."""
        if not run.active:
            return
        self._leave(st, run, after)
        for job in run.members:
            if not run.batch:
                round_s = job.render_s / math.ceil(job.segments / job.groups)
                job.remaining_s -= math.floor(after / round_s) * round_s
            job.attempts += 1
            self.loads[job.route.queue][1] -= job.est_gpu_s  # _enqueue counts it again
            if job.attempts > self.fleet.failures.max_retries:
                self._settle(job, "failed", f"failed {job.attempts} times on {job.tier}")
            else:
                job.state = "retrying"
                self._later(self.fleet.failures.retry_delay_s, self._enqueue, job)
        self._want_pass(run.members[0].tier)

    # --- preemption ------------------------------------------------------------------------
    def _preempt_for(self, st, job) -> int:
        """Ask the runs choose_victims picks to yield for ``job`` (the tier's first waiting
        job); -> how many were asked."""
        route = job.route
        if not self.preemption or route.preempt_at is None:
            return 0
        running = [Running(r.seq, r.members[0].id, r.members[0].trace.priority, r.gpus,
                           r.members[0].preemptions, r.started_s, r.yield_at_s is not None)
                   for r in st.running.values() if not r.batch]
        victims = choose_victims(job.trace.priority, job.degree * job.groups,
                                 st.gpus - st.busy, running, route.preempt_at,
                                 route.preempt_margin, self.fleet.preemption.max_preemptions)
        for victim in victims:
            self._ask_to_yield(st, st.running[victim.segment_id])
        return len(victims)

    def _ask_to_yield(self, st, run: Run) -> None:
        """The run stops at its next step boundary (a run about to end simply ends)."""
        job = run.members[0]
        step_s = job.render_s / job.steps_total
        elapsed = self.env.now - run.started_s
        boundary = math.ceil(elapsed / step_s - 1e-9) * step_s
        run.yield_at_s = min(boundary, run.duration_s)
        if boundary < run.duration_s:
            self._later(boundary - elapsed, self._yield, st, run, boundary)

    def _yield(self, st, run: Run, done_s: float) -> None:
        if not run.active:  # it failed first
            return
        job = run.members[0]
        self._leave(st, run, done_s)
        job.remaining_s -= done_s  # the steps rendered are kept (the saved state)
        job.preemptions += 1
        job.batch_key = None  # a resumed segment renders alone
        self.preempted += 1
        self.loads[job.route.queue][1] -= job.est_gpu_s  # _enqueue counts it again
        self._enqueue(job)
        self._want_pass(job.tier)
