"""Route a job: the first matching rule's choice, or one of its fallbacks, as a `Route`.

Pure and fast (benchmarks/routing.py): a decision reads the job, the rules and a snapshot of
queue loads; `explain` gives the same decision with every rule's verdict and the arithmetic.
Fallbacks are tried in order, each `when` tested against the current choice: one whose
condition holds replaces it (and the next ones are tested against that), one whose condition
does not is passed over. So `[long queue -> X, deadline -> Y]` spills on either reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from scheduler.catalog import Catalog, ModelVariant
from scheduler.memory import NoFittingPlan, choose_plan, plan_table
from scheduler.rules import Choice, Match, Rule, RuleSet, describe

STITCH_QUEUE = "stitch"  # CPU-only work: concatenation, probing, thumbnails
TP_EFFICIENCY = 0.85  # speed-up of degree N is N * 0.85 (N > 1): collectives cost


class NoRoute(LookupError):
    """No rule matches the job; the message lists why each rule did not."""


class RouteDoesNotFit(NoRoute):
    """The matching rule's route has no parallel plan that fits its tier (rules checked
    against another catalog than the one routing uses): names variant, tier and GB over.
    A NoRoute, so submission answers it with a 422 like any other unroutable job."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the rules see of a job."""
    track: str = "draft"
    width: int = 1280
    height: int = 720
    frames: int = 81
    fps: int = 16
    priority: int = 50
    batch: bool = False
    project: str = "default"
    model: str | None = None  # named by the job; None: the rules choose
    steps: int | None = None  # None: the variant's default
    deadline_s: float | None = None  # seconds from now by which the video is wanted

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """One queue right now: jobs waiting for GPUs, and the GPU-seconds ahead of a new job."""
    waiting_jobs: int = 0
    backlog_gpu_s: float = 0.0


@dataclass(frozen=True)
class Route:
    variant: str
    tier: str
    degree: int  # ranks (GPUs) of the actor group
    placement: str  # resident | offload | split
    parallel: str  # how the ranks split a render: "single", "tp2", "sp2+cfg2", ...
    queue: str  # Celery queue of the tier's render tasks
    rule: str
    window: str | None = None
    timezone: str = "UTC"
    fallback: int | None = None  # index of the fallback taken; None: the rule's own choice
    est_seconds: float | None = None  # render time once on GPUs (estimate)
    memory_gb: float | None = None  # per GPU (estimate)
    # The variant the rule chose when the job's track rendered a lighter one (its
    # `tracks` entry, issue #12); None: ``variant`` is the rule's own choice.
    track_of: str | None = None
    cache: dict | None = None  # the rule's step caching (scheduler/rules.py Choice.cache)
    # Preemption (issue #15, scheduler/preemption.py): the rule's choice, read by the farm
    # from the job's route dict when its tier is full.
    preempt_at: int | None = None
    preempt_margin: int = 20

    @property
    def gpu_seconds(self) -> float | None:
        return None if self.est_seconds is None else self.est_seconds * self.degree

    def as_dict(self) -> dict:
        return asdict(self)


def render_queue(tier: str) -> str:
    return f"render.{tier}"


def mismatch(match: Match, job: JobSpec) -> str | None:
    """Why ``match`` does not fit ``job`` (None when it does)."""
    if match.track is not None and job.track not in match.track:
        return f"track is {job.track!r}, rule wants {'|'.join(match.track)}"
    if match.model is not None and job.model not in match.model:
        return f"model is {job.model!r}, rule wants {'|'.join(match.model)}"
    if match.project is not None and job.project not in match.project:
        return f"project is {job.project!r}, rule wants {'|'.join(match.project)}"
    if match.batch is not None and job.batch != match.batch:
        return f"batch is {str(job.batch).lower()}, rule wants {str(match.batch).lower()}"
    if match.priority is not None and not match.priority.holds(job.priority):
        return f"priority {job.priority} is outside {match.priority}"
    if match.duration_s is not None and not match.duration_s.holds(job.duration_s):
        return f"duration {job.duration_s:g}s is outside {match.duration_s}"
    if match.output is not None:
        lo_w, lo_h, hi_w, hi_h = match.output.bounds()
        if not (lo_w <= job.width <= hi_w and lo_h <= job.height <= hi_h):
            return (f"output {job.width}x{job.height} is outside "
                    f"{match.output.min or ''}..{match.output.max or ''}")
    return None


def segments_rendered_frames(frames: int, max_frames: int) -> int:
    """Frames the model renders for a job (scheduler.planner's split, counted)."""
    if frames <= max_frames:
        return max_frames if frames > 1 else 1
    later = math.ceil((frames - max_frames) / (max_frames - 1))
    return max_frames * (1 + later)


def est_seconds(variant: ModelVariant, tier: str, degree: int, job: JobSpec) -> float | None:
    per_step = variant.seconds_per_step.get(tier)
    if per_step is None:
        return None
    steps = job.steps or variant.default_steps
    share = segments_rendered_frames(job.frames, variant.max_frames) / variant.max_frames
    speedup = degree * (TP_EFFICIENCY if degree > 1 else 1.0)
    return steps * per_step * share / speedup


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _plan(catalog: Catalog, variant: str, tier: str, degree: int, placement: str,
          parallel: str) -> tuple[str, float, str]:
    """(plan name, memory GB per GPU, its arithmetic), memoised: the same few routes are
    asked for often. NoFittingPlan when no plan fits the tier."""
    key = ("plan", variant, tier, degree, placement, parallel)
    if key not in catalog._memo:
        plan, need = choose_plan(catalog, catalog.models[variant], catalog.tiers[tier], degree,
                                 placement, parallel)
        catalog._memo[key] = (plan.name, round(need.total_gb, 2), need.arithmetic())
    return catalog._memo[key]


def build(choice: Choice, rule: Rule, job: JobSpec, catalog: Catalog,
          fallback: int | None) -> Route:
    variant = catalog.models[choice.variant or job.model]
    try:
        plan, memory_gb, _ = _plan(catalog, variant.name, choice.tier, choice.degree,
                                   choice.placement, choice.parallel)
    except NoFittingPlan as exc:
        which = "route" if fallback is None else f"fallback {fallback}"
        raise RouteDoesNotFit(f"rule {rule.name!r} {which}: {variant.name} on tier "
                              f"{choice.tier}: {exc}") from None
    return Route(
        variant=variant.name, tier=choice.tier, degree=choice.degree,
        placement=choice.placement, parallel=plan,
        queue=choice.queue or render_queue(choice.tier),
        rule=rule.name, window=choice.window, timezone=choice.timezone, fallback=fallback,
        est_seconds=_rounded(est_seconds(variant, choice.tier, choice.degree, job)),
        memory_gb=memory_gb, cache=choice.cache, preempt_at=choice.preempt_at,
        preempt_margin=choice.preempt_margin,
    )


def spill_reason(when, route: Route, job: JobSpec, catalog: Catalog,
                 loads: dict[str, QueueLoad]) -> str | None:
    """Why ``route`` should be given up for the fallback with condition ``when``."""
    load = loads.get(route.queue, QueueLoad())
    if when.queue_longer_than is not None and load.waiting_jobs > when.queue_longer_than:
        return (f"queue {route.queue} has {load.waiting_jobs} jobs waiting "
                f"(> {when.queue_longer_than})")
    if when.deadline_unmet and job.deadline_s is not None and route.est_seconds is not None:
        gpus = max(1, catalog.tiers[route.tier].gpus)
        finish = load.backlog_gpu_s / gpus + route.est_seconds
        if finish > job.deadline_s:
            return (f"deadline {job.deadline_s:g}s cannot be met on {route.tier}: about "
                    f"{load.backlog_gpu_s / gpus:.0f}s of queue + {route.est_seconds:.0f}s render")
    return None


def route(job: JobSpec, rules: RuleSet, catalog: Catalog,
          loads: dict[str, QueueLoad] | None = None) -> Route:
    """The route of ``job``. Raises NoRoute when no rule matches, RouteDoesNotFit (a NoRoute)
    when the matching route has no plan that fits its tier.

    A job naming a derived variant is matched as its base (``derived_from``, to the root),
    and renders the variant it named. When the chosen variant names a lighter one for the
    job's track (``tracks``) and that one fits the same tier, the job renders that one."""
    loads = loads or {}
    matched = replace(job, model=base_of(job.model, catalog))
    for rule in rules.rules:
        if mismatch(rule.match, matched) is None:
            choice, chosen = rule.route, build(rule.route, rule, job, catalog, None)
            for i, fallback in enumerate(rule.fallbacks):
                if spill_reason(fallback.when, chosen, job, catalog, loads) is not None:
                    choice, chosen = fallback.route, build(fallback.route, rule, job, catalog, i)
            return _on_track(choice, chosen, rule, job, catalog)
    raise NoRoute(_no_route_message(matched, rules))


def base_of(model: str | None, catalog: Catalog) -> str | None:
    """The root of a derived variant's chain; any other name as it is."""
    seen = set()
    while model in catalog.models and catalog.models[model].derived_from and model not in seen:
        seen.add(model)
        model = catalog.models[model].derived_from
    return model


def track_variant(catalog: Catalog, variant: str, track: str, placement: str) -> str | None:
    """The lighter variant ``variant`` renders ``track`` with on this placement, or None.
    A quantized one is skipped on an offload route (workers/actor.py refuses it there)."""
    light = catalog.models[variant].tracks.get(track)
    if light is None or light == variant:
        return None
    if placement == "offload" and catalog.models[light].is_quantized:
        return None
    return light


def _on_track(choice: Choice, chosen: Route, rule: Rule, job: JobSpec,
              catalog: Catalog) -> Route:
    light = track_variant(catalog, chosen.variant, job.track, chosen.placement)
    if light is None:
        return chosen
    try:
        on_track = build(choice.model_copy(update={"variant": light}), rule, job, catalog,
                         chosen.fallback)
    except RouteDoesNotFit:  # the light variant does not fit this tier: the rule's own
        return chosen
    # The rule's step cache was chosen (and, for mag, calibrated) for its own variant, not
    # for a few-step student whose every step counts.
    return replace(on_track, track_of=chosen.variant, cache=None)


def _no_route_message(job: JobSpec, rules: RuleSet) -> str:
    reasons = "; ".join(f"{r.name}: {mismatch(r.match, job)}" for r in rules.rules)
    return f"no routing rule matches the job ({reasons})"


@dataclass
class Explanation:
    job: dict
    rules_sha256: str
    verdicts: list[dict] = field(default_factory=list)  # rule, matches, why not / spills
    route: dict | None = None
    memory: str | None = None  # the chosen route's arithmetic
    parallel_plans: list[dict] = field(default_factory=list)  # bytes per step, memory, fits
    error: str | None = None


def explain(job: JobSpec, rules: RuleSet, catalog: Catalog,
            loads: dict[str, QueueLoad] | None = None) -> Explanation:
    loads = loads or {}
    out = Explanation(job=asdict(job), rules_sha256=rules.sha256)
    for rule in rules.rules:
        why = mismatch(rule.match, job)
        verdict = {"rule": rule.name, "match": describe(rule.match), "matches": why is None}
        out.verdicts.append(verdict)
        if why is not None:
            verdict["why_not"] = why
            continue
        try:
            chosen = _explained_route(rule, job, catalog, loads, verdict)
        except RouteDoesNotFit as exc:
            out.error = str(exc)
            return out
        out.route = chosen.as_dict()
        tier = catalog.tiers[chosen.tier]
        arithmetic = _plan(catalog, chosen.variant, chosen.tier, chosen.degree,
                           chosen.placement, _rule_parallel(rule, chosen))[2]
        out.memory = f"{arithmetic}; tier {chosen.tier} has {tier.memory_gb:g} GB"
        out.parallel_plans = plan_table(catalog, catalog.models[chosen.variant], tier,
                                        chosen.degree, chosen.placement)
        return out
    out.error = _no_route_message(job, rules)
    return out


def _explained_route(rule: Rule, job: JobSpec, catalog: Catalog,
                     loads: dict[str, QueueLoad], verdict: dict) -> Route:
    chosen = build(rule.route, rule, job, catalog, None)
    verdict["spills"] = []
    for i, fallback in enumerate(rule.fallbacks):
        reason = spill_reason(fallback.when, chosen, job, catalog, loads)
        if reason is None:
            verdict["spills"].append({"fallback": i, "taken": False})
            continue
        verdict["spills"].append({"fallback": i, "taken": True, "because": reason})
        chosen = build(fallback.route, rule, job, catalog, i)
    return chosen


def _rule_parallel(rule: Rule, chosen: Route) -> str:
    """The `parallel` the rule asked for on the choice ``chosen`` came from."""
    choice = rule.route if chosen.fallback is None else rule.fallbacks[chosen.fallback].route
    return choice.parallel
