"""fleet.yaml: the GPUs to simulate, what they cost, how often they fail, and the policy.

    start: "2026-12-01T00:00:00+00:00"  # the instant a trace's `at` counts from
    policy: {rules_file: rules.yaml}  # optional, relative to this file; default: shipped
    tiers:  # GPUs per tier (a multiple of gpus_per_node); a policy's tier not listed: as it is
      a10: {gpus: 400, gpus_per_node: 4, cost_per_gpu_hour: 1.01}
      h100: {gpus: 200, gpus_per_node: 8, cost_per_gpu_hour: 6.5, gpu: H100, memory_gb: 80}
    measured:  # seconds per step a GPU run measured, model -> tier: overrides the catalog
      wan2.2-t2v-a14b: {h100: 38.0}
    failures: {per_gpu_hour: 0.002, retry_delay_s: 60, max_retries: 3}
    admission: {pass_every_s: 5, lookahead: 100, pages: 5}
    preemption: {max_preemptions: 2}  # issue #15: FARM_MAX_PREEMPTIONS; rules set preempt_at
    batching:  # issue #15: per model, overrides the catalog's (shipped: max_batch 1)
      wan2.2-ti2v-5b-int8: {max_batch: 4, batch_marginal: 0.35}

Errors name the file, the field and the bad value (scheduler.catalog.validation_message).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scheduler.catalog import Catalog, PolicyError, Tier, validation_message
from scheduler.rules import parse_rules


class FleetError(ValueError):
    """A fleet file that cannot be simulated; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetTier(_Strict):
    gpus: Annotated[int, Field(ge=0)]  # GPUs of the tier, all nodes together
    gpus_per_node: Annotated[int, Field(ge=1, le=64)] | None = None  # None: the policy's
    cost_per_gpu_hour: Annotated[float, Field(ge=0)] | None = None  # dollars; None: policy's
    gpu: str | None = None  # needed (with memory_gb) for a tier the policy does not declare
    memory_gb: Annotated[float, Field(gt=0)] | None = None


class Failures(_Strict):
    per_gpu_hour: Annotated[float, Field(ge=0)] = 0.0  # failures per GPU-hour of rendering
    retry_delay_s: Annotated[float, Field(ge=0)] = 60.0  # before the job queues again
    max_retries: Annotated[int, Field(ge=0)] = 3  # then the job fails


class Admission(_Strict):
    # 0: a pass at every arrival and finish, as the live farm releases; > 0: passes batched
    # to this tick (seconds), for days of 100,000 jobs.
    pass_every_s: Annotated[float, Field(ge=0)] = 5.0
    # As farm/jobs/admit.py reads a tier's line: pages of LOOK_AHEAD jobs, at most
    # MAX_PAGES of them, the next only while the tier has room (issue #14, item 5).
    lookahead: Annotated[int, Field(ge=1)] = 100  # waiting jobs of a tier in a page
    pages: Annotated[int, Field(ge=1)] = 5


class Preemption(_Strict):
    max_preemptions: Annotated[int, Field(ge=0)] = 2  # as FARM_MAX_PREEMPTIONS


class Batching(_Strict):
    """A model's batching as a measurement gives it (benchmarks/batching.py)."""
    max_batch: Annotated[int, Field(ge=1, le=64)] = 1
    batch_marginal: Annotated[float, Field(gt=0, le=1)] = 1.0


class PolicyFiles(_Strict):
    tiers_file: str | None = None
    models_file: str | None = None
    rules_file: str | None = None
    variants_file: str | None = None


class FleetDoc(_Strict):
    start: datetime = datetime(2026, 12, 1, tzinfo=timezone.utc)
    policy: PolicyFiles = PolicyFiles()
    tiers: dict[str, FleetTier] | None = None  # unlisted tiers: as the tiers file has them
    measured: dict[str, dict[str, Annotated[float, Field(gt=0)]]] = {}
    failures: Failures = Failures()
    admission: Admission = Admission()
    preemption: Preemption = Preemption()
    batching: dict[str, Batching] = {}

    @model_validator(mode="after")
    def _aware(self) -> "FleetDoc":
        if self.start.tzinfo is None:
            raise ValueError(f"start {self.start.isoformat()!r}: give a time zone, e.g. +00:00")
        return self


@dataclass(frozen=True)
class Fleet:
    doc: FleetDoc
    catalog: Catalog  # the policy's catalog with the fleet's tiers and measured step times
    rules: object  # scheduler.rules.RuleSet

    @property
    def failures(self) -> Failures:
        return self.doc.failures

    @property
    def admission(self) -> Admission:
        return self.doc.admission

    @property
    def preemption(self) -> Preemption:
        return self.doc.preemption


def parse_fleet(text: str, source: str = "fleet.yaml", base_dir: Path | None = None,
                overrides: PolicyFiles | None = None) -> Fleet:
    """Read a fleet file; ``overrides``: policy files given on the command line (absolute
    paths), which win over the fleet file's own."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise FleetError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FleetError(f"{source}: expected a mapping at the top, got {data!r}")
    try:
        doc = FleetDoc(**data)
    except ValidationError as exc:
        raise FleetError(validation_message(source, exc)) from None
    files = doc.policy.model_copy(update={k: v for k, v in (overrides or PolicyFiles())
                                          .model_dump().items() if v})
    base = load_base_policy(files, base_dir or Path("."))
    catalog = fleet_catalog(base.catalog, doc, source)
    rules_file = _path(files.rules_file, base_dir or Path(".")) or _shipped("rules.yaml")
    try:
        rules = parse_rules(Path(rules_file).read_text(), catalog, str(rules_file))
    except PolicyError as exc:
        raise FleetError(f"{source}: the rules do not fit this fleet: {exc}") from None
    return Fleet(doc, catalog, rules)


def load_fleet(path: Path, overrides: PolicyFiles | None = None) -> Fleet:
    path = Path(path)
    if not path.is_file():
        raise FleetError(f"--fleet: no file at {str(path)!r}")
    return parse_fleet(path.read_text(), str(path), path.parent, overrides)


def _shipped(name: str) -> Path:
    from farm.policy import CONFIG_DIR

    return CONFIG_DIR / name


def _path(value: str | None, base_dir: Path) -> Path | None:
    """A policy file named in the fleet file is relative to it (the CLI's are absolute)."""
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


def load_base_policy(files: PolicyFiles, base_dir: Path):
    from farm.policy import load_policy

    paths = {k: _path(v, base_dir) for k, v in files.model_dump().items()}
    for field, path in paths.items():
        if path is not None and not path.is_file():
            raise FleetError(f"policy.{field}: no file at {str(path)!r}")
    try:
        return load_policy(paths["tiers_file"], paths["models_file"], paths["rules_file"],
                           paths["variants_file"])
    except PolicyError as exc:
        raise FleetError(str(exc)) from None


def fleet_catalog(catalog: Catalog, doc: FleetDoc, source: str) -> Catalog:
    """The catalog with the fleet's tiers (nodes = gpus / gpus_per_node) and measured step
    times; a tier of the policy the fleet does not list keeps its tiers file's size."""
    tiers = dict(catalog.tiers)
    for name, spec in (doc.tiers or {}).items():
        tiers[name] = _tier(name, spec, catalog.tiers.get(name), source)
    models = dict(catalog.models)
    for model, per_tier in doc.measured.items():
        if model not in models:
            raise FleetError(f"{source}: measured.{model}: unknown model {model!r}; known: "
                             f"{', '.join(sorted(models))}")
        for tier in per_tier:
            if tier not in tiers:
                raise FleetError(f"{source}: measured.{model}.{tier}: unknown tier {tier!r}")
        steps = {**models[model].seconds_per_step, **per_tier}
        models[model] = models[model].model_copy(update={"seconds_per_step": steps})
    for model, spec in doc.batching.items():
        if model not in models:
            raise FleetError(f"{source}: batching.{model}: unknown model {model!r}; known: "
                             f"{', '.join(sorted(models))}")
        models[model] = models[model].model_copy(update=spec.model_dump())
    return Catalog(tiers=tiers, models=models, runtime_overhead_gb=catalog.runtime_overhead_gb)


def _tier(name: str, spec: FleetTier, known: Tier | None, source: str) -> Tier:
    where = f"{source}: tiers.{name}"
    if known is None and (spec.gpu is None or spec.memory_gb is None):
        raise FleetError(f"{where}: tier {name!r} is not in the policy's tiers; give gpu and "
                         f"memory_gb")
    per_node = spec.gpus_per_node or (known.gpus_per_node if known else 1)
    if spec.gpus % per_node:
        raise FleetError(f"{where}.gpus: got {spec.gpus}: not a multiple of gpus_per_node "
                         f"({per_node})")
    fields = {"count": spec.gpus // per_node, "gpus_per_node": per_node}
    for field in ("cost_per_gpu_hour", "gpu", "memory_gb"):
        if getattr(spec, field) is not None:
            fields[field] = getattr(spec, field)
    if known is not None:
        return known.model_copy(update=fields)
    return Tier(name=name, ray_resource=f"tier:{name}",
                **{"cost_per_gpu_hour": 0.0, **fields})
