"""Routing rules in YAML: first match wins. Parsed and validated against the catalog here.

A rule matches on a job's quality track, output size, duration, priority, batch, project and
explicit model, and chooses a variant, tier, parallel degree, expert placement, queue and
batch window, with ordered fallbacks. Loading fails, with every problem listed by rule name,
on: an unknown tier or variant; a route with no parallel plan that fits its tier's memory
(scheduler/memory.py, the model routing uses too; by how many GB); a degree the model cannot
be split into; a bad window; a rule that an earlier rule (or a set of them) already matches in
full, so it could never be reached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import product
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.catalog import Catalog, PolicyError, _load_yaml, parse_size, validation_message
from scheduler.memory import fit_problem
from scheduler.windows import Window, WindowError

TRACKS = ("draft", "final")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value):
    return [value] if isinstance(value, (str, int, float)) else value


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def covers(self, other: "Range | None") -> bool:
        lo, hi = (other.min, other.max) if other else (None, None)
        return ((self.min is None or (lo is not None and lo >= self.min)) and
                (self.max is None or (hi is not None and hi <= self.max)))

    def __str__(self) -> str:
        return f"{'' if self.min is None else f'{self.min:g}'}..{'' if self.max is None else f'{self.max:g}'}"


class SizeRange(_Strict):
    """Output size bounds, each "WxH": a job fits when both its width and height do."""
    min: str | None = None
    max: str | None = None

    @field_validator("min", "max")
    @classmethod
    def _size(cls, value):
        if value is not None:
            parse_size(value)
        return value

    def bounds(self) -> tuple[int, int, float, float]:
        lo = parse_size(self.min) if self.min else (0, 0)
        hi = parse_size(self.max) if self.max else (float("inf"), float("inf"))
        return lo[0], lo[1], hi[0], hi[1]


class Match(_Strict):
    track: list[Literal["draft", "final"]] | None = None
    model: list[str] | None = None  # the job names one of these models explicitly
    project: list[str] | None = None
    batch: bool | None = None  # submitted as part of a batch
    priority: Range | None = None  # 0..100
    duration_s: Range | None = None  # frames / fps
    output: SizeRange | None = None

    @field_validator("track", "model", "project", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _as_list(value)


class Choice(_Strict):
    variant: str | None = None  # None: the model the job names (the match must name models)
    tier: str
    degree: Annotated[int, Field(ge=1, le=64)] = 1
    placement: Literal["resident", "offload", "split"] = "resident"
    # How the degree's ranks split a render: "auto" (the plan moving the fewest bytes that
    # fits, scheduler.parallel_cost), or e.g. "tp2", "sp4", "sp2+cfg2".
    parallel: str = "auto"
    queue: str | None = None  # default render.{tier}
    window: str | None = None  # e.g. "22:00-06:00": the job waits for it
    timezone: str = "UTC"
    # Training-free step caching (issue #12): {kind: first_block | mag | taylorseer, ...},
    # checked by workers/lightening/step_cache.py's StepCacheConfig; None: every step runs.
    cache: dict | None = None
    # Preemption (issue #15): a job of priority >= preempt_at waiting for a full tier makes
    # the lowest-priority running segment at least preempt_margin below it yield its group
    # at the next denoising step (scheduler/preemption.py). None: this route never preempts.
    preempt_at: Annotated[int, Field(ge=0, le=100)] | None = None
    preempt_margin: Annotated[int, Field(ge=1, le=100)] = 20

    @field_validator("cache")
    @classmethod
    def _cache(cls, value):
        if value is not None:
            from workers.lightening.step_cache import StepCacheConfig

            StepCacheConfig.from_dict(value)  # ValueError naming cache.<field> and the value
        return value


class When(_Strict):
    queue_longer_than: Annotated[int, Field(ge=0)] | None = None  # jobs waiting for the tier
    deadline_unmet: bool = False  # the job's deadline cannot be met on the current choice

    @model_validator(mode="after")
    def _something(self) -> "When":
        if self.queue_longer_than is None and not self.deadline_unmet:
            raise ValueError("a fallback needs queue_longer_than or deadline_unmet")
        return self


class Fallback(_Strict):
    when: When
    route: Choice


class Rule(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    match: Match = Match()
    route: Choice
    fallbacks: list[Fallback] = []


class Quotas(_Strict):
    """GPUs (ranks) a project may hold at once, per tier; unset: the whole tier."""
    default: dict[str, Annotated[int, Field(ge=0)]] = {}
    projects: dict[str, dict[str, Annotated[int, Field(ge=0)]]] = {}

    def limit(self, project: str, tier: str) -> int | None:
        own = self.projects.get(project, {})
        return own[tier] if tier in own else self.default.get(tier)


class RulesDoc(_Strict):
    version: Literal[1] = 1
    rules: Annotated[list[Rule], Field(min_length=1)]
    quotas: Quotas = Quotas()


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    quotas: Quotas
    sha256: str  # of the file's bytes: every job records it (audit of later rule changes)
    source: str


def parse_rules(text: str, catalog: Catalog, source: str = "rules.yaml") -> RuleSet:
    data = _load_yaml(text, source)
    try:
        doc = RulesDoc(**data)
    except ValidationError as exc:
        raise PolicyError(validation_message(source, exc)) from None
    problems = _problems(doc, catalog)
    if problems:
        raise PolicyError("\n".join(f"{source}: {p}" for p in problems))
    return RuleSet(rules=tuple(doc.rules), quotas=doc.quotas, source=source,
                   sha256=hashlib.sha256(text.encode()).hexdigest())


def _problems(doc: RulesDoc, catalog: Catalog) -> list[str]:
    problems, seen = [], set()
    for rule in doc.rules:
        where = f"rule {rule.name!r}"
        if rule.name in seen:
            problems.append(f"{where}: the name is used twice")
        seen.add(rule.name)
        for model in rule.match.model or ():
            if model not in catalog.models:
                problems.append(f"{where}: match.model: unknown variant {model!r}")
        problems += _choice_problems(f"{where}: route", rule.route, rule, catalog, doc.quotas)
        for i, fallback in enumerate(rule.fallbacks):
            problems += _choice_problems(f"{where}: fallbacks[{i}]", fallback.route, rule,
                                         catalog, doc.quotas)
    for project, limits in [("default", doc.quotas.default), *doc.quotas.projects.items()]:
        for tier in limits:
            if tier not in catalog.tiers:
                problems.append(f"quotas.{project}: unknown tier {tier!r}")
    return problems + unreachable(doc.rules)


def _choice_problems(where: str, choice: Choice, rule: Rule, catalog: Catalog,
                     quotas: Quotas) -> list[str]:
    if choice.tier not in catalog.tiers:
        return [f"{where}.tier: unknown tier {choice.tier!r}; known: "
                f"{', '.join(sorted(catalog.tiers))}"]
    if catalog.tiers[choice.tier].count == 0:
        return [f"{where}.tier: tier {choice.tier!r} has no nodes (count 0)"]
    limit = quotas.default.get(choice.tier)
    if limit is not None and choice.degree > limit:
        return [f"{where}: degree {choice.degree} exceeds the default quota on "
                f"{choice.tier} ({limit} GPUs): its jobs could never start"]
    if choice.variant is None and not rule.match.model:
        return [f"{where}: names no variant, and the rule's match names no model to run"]
    variants = [choice.variant] if choice.variant else rule.match.model
    problems = []
    for name in variants:
        if name not in catalog.models:
            problems.append(f"{where}.variant: unknown variant {name!r}; known: "
                            f"{', '.join(sorted(catalog.models))}")
            continue
        why = fit_problem(catalog, catalog.models[name], catalog.tiers[choice.tier],
                          choice.degree, choice.placement, choice.parallel)
        if why:
            problems.append(f"{where}: {why}")
    if choice.window is not None:
        try:
            Window.parse(choice.window, choice.timezone)
        except WindowError as exc:
            problems.append(f"{where}.window: {exc}")
    return problems


# ---- reachability ----------------------------------------------------------------------

def covers(a: Match, b: Match) -> bool:
    """Every job that ``b`` matches, ``a`` matches too."""
    for field in ("track", "model", "project"):
        mine, theirs = getattr(a, field), getattr(b, field)
        if mine is not None and (theirs is None or not set(theirs) <= set(mine)):
            return False
    if a.batch is not None and a.batch != b.batch:
        return False
    for field in ("priority", "duration_s"):
        mine = getattr(a, field)
        if mine is not None and not mine.covers(getattr(b, field)):
            return False
    if a.output is not None:
        a_lo_w, a_lo_h, a_hi_w, a_hi_h = a.output.bounds()
        b_lo_w, b_lo_h, b_hi_w, b_hi_h = (b.output or SizeRange()).bounds()
        if b_lo_w < a_lo_w or b_lo_h < a_lo_h or b_hi_w > a_hi_w or b_hi_h > a_hi_h:
            return False
    return True


def _cells(match: Match) -> list[Match]:
    """``match`` split over the finite fields (track x batch), to test cover by a union."""
    tracks = match.track or list(TRACKS)
    batches = [match.batch] if match.batch is not None else [False, True]
    return [match.model_copy(update={"track": [t], "batch": b}) for t, b in product(tracks, batches)]


def unreachable(rules) -> list[str]:
    problems = []
    for j, later in enumerate(rules):
        earlier = rules[:j]
        blockers = []
        for cell in _cells(later.match):
            hit = next((r for r in earlier if covers(r.match, cell)), None)
            if hit is None:
                break
            blockers.append(hit.name)
        else:
            if earlier:
                names = ", ".join(repr(n) for n in dict.fromkeys(blockers))
                problems.append(f"rule {later.name!r}: unreachable: earlier rule(s) {names} "
                                "already match every job it matches")
    return problems


def describe(match: Match) -> str:
    parts = [f"{f}={'|'.join(map(str, v))}" for f in ("track", "model", "project")
             if (v := getattr(match, f))]
    if match.batch is not None:
        parts.append(f"batch={str(match.batch).lower()}")
    parts += [f"{f}={v}" for f in ("priority", "duration_s") if (v := getattr(match, f))]
    if match.output:
        parts.append(f"output={match.output.min or ''}..{match.output.max or ''}")
    return ", ".join(parts) or "every job"

