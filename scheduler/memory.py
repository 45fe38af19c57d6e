"""Memory per GPU of a route: the one model that routing, `farm rules check`, `farm rules
explain` and the plan chooser all use (issue #11: two models used to disagree).

A route runs a (variant, plan, placement) at the variant's native size, one segment of at
most ``max_frames`` frames; per rank of a plan tpT x spS x cfgC, in GB (1e9 bytes):
    weights      params_b * bytes_per_param * resident experts / T
                 (tensor parallel shards every linear layer; sequence parallel splits tokens,
                 not weights; each CFG half holds whole weights)
    encoders     extra_gb: text encoder + VAE, whole on every rank
    activations  activation_gb[native] * latent volume / latent volume of a full segment
                 / (T x S)   (tp splits heads and FFN columns, sp splits tokens; a CFG half
                 runs one pass, as a lone rank runs its two passes one after the other)
    overhead     runtime_overhead_gb: CUDA context, allocator slack
Resident experts (README.md "Parallel rendering and expert placement"): both for `resident`; one for `offload` (the other in
pinned host memory) and for `split` (each group holds its own expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.catalog import Catalog, ModelVariant, Tier, parse_size
from scheduler.parallel_cost import Plan, bytes_per_step, candidate_plans, parse_plan, splits

PLACEMENTS = ("resident", "offload", "split")


class NoFittingPlan(ValueError):
    """No parallel plan of a route fits its tier's memory; says by how many GB."""

    def __init__(self, message: str, variant: str, tier: str, over_gb: float):
        super().__init__(message)
        self.variant, self.tier, self.over_gb = variant, tier, over_gb


@dataclass(frozen=True)
class MemoryEstimate:
    variant: str
    plan: str  # "tp2", "sp2+cfg2", "single"
    placement: str
    size: str  # "WxH" rendered
    frames: int  # of the segment
    weights_gb: float
    encoders_gb: float
    activations_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.encoders_gb + self.activations_gb + self.overhead_gb

    def arithmetic(self) -> str:
        return (f"{self.variant} {self.plan} ({self.placement}, {self.size} x {self.frames} "
                f"frames): weights {self.weights_gb:.1f} + encoders {self.encoders_gb:.1f} + "
                f"activations {self.activations_gb:.1f} + overhead {self.overhead_gb:.1f} = "
                f"{self.total_gb:.1f} GB per GPU")


def resident_experts(variant: ModelVariant, placement: str) -> int:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    return variant.experts if placement == "resident" else 1


def _volume(variant: ModelVariant, frames: int, size: str) -> int:
    """Latent elements of one segment (scheduler/latents.py, through the catalog)."""
    return math.prod(variant.latent.shape(*parse_size(size), frames))


def activations_gb(variant: ModelVariant, frames: int | None = None,
                   size: str | None = None) -> float:
    """One unsplit pass over a segment of ``frames`` at ``size`` (default: a full segment at
    the native size, where activation_gb is measured), scaled by the latent volume."""
    frames, size = frames or variant.max_frames, size or variant.native
    full = _volume(variant, variant.max_frames, variant.native)
    return variant.activation_gb[variant.native] * _volume(variant, frames, size) / full


def plan_memory(catalog: Catalog, variant: ModelVariant, plan: Plan, placement: str,
                frames: int | None = None) -> MemoryEstimate:
    frames = frames or variant.max_frames
    weights = variant.params_b * variant.bytes_per_param * resident_experts(variant, placement)
    return MemoryEstimate(
        variant=variant.name, plan=plan.name, placement=placement, size=variant.native,
        frames=frames, weights_gb=weights / plan.tp, encoders_gb=variant.extra_gb,
        activations_gb=activations_gb(variant, frames) / (plan.tp * plan.sp),
        overhead_gb=catalog.runtime_overhead_gb)


def plan_table(catalog: Catalog, variant: ModelVariant, tier: Tier, degree: int,
               placement: str) -> list[dict]:
    """Every plan of ``degree`` ranks: bytes it moves per step, memory per GPU, fits."""
    width, height = parse_size(variant.native)
    rows = []
    for plan in candidate_plans(degree):
        memory = plan_memory(catalog, variant, plan, placement).total_gb
        rows.append({"plan": plan.name, "gb_per_step": round(bytes_per_step(
            variant, plan, width, height, variant.max_frames) / 1e9, 3),
            "memory_gb": round(memory, 2), "splits": splits(variant, plan),
            "fits": splits(variant, plan) and memory <= tier.memory_gb})
    return rows


def choose_plan(catalog: Catalog, variant: ModelVariant, tier: Tier, degree: int,
                placement: str, parallel: str = "auto") -> tuple[Plan, MemoryEstimate]:
    """``parallel`` itself, or for "auto" the plan moving the fewest bytes among those that
    split the model and fit the tier. NoFittingPlan when none fits (never a silent pick)."""
    if parallel != "auto":
        plan = parse_plan(parallel)
        need = plan_memory(catalog, variant, plan, placement)
        if need.total_gb > tier.memory_gb:
            raise _no_fit(need, tier, f"{parallel!r} needs")
        return plan, need
    rows = plan_table(catalog, variant, tier, degree, placement)
    fitting = [(row["gb_per_step"], i) for i, row in enumerate(rows) if row["fits"]]
    plans = candidate_plans(degree)
    if fitting:
        plan = plans[min(fitting)[1]]
        return plan, plan_memory(catalog, variant, plan, placement)
    usable = [(row["memory_gb"], i) for i, row in enumerate(rows) if row["splits"]]
    smallest = plans[min(usable or [(0, 0)])[1]]
    need = plan_memory(catalog, variant, smallest, placement)
    lead = (f"no {degree}-rank plan fits; the smallest, {smallest.name}, needs"
            if len(plans) > 1 else "")
    raise _no_fit(need, tier, lead)


def _no_fit(need: MemoryEstimate, tier: Tier, lead: str) -> NoFittingPlan:
    over = need.total_gb - tier.memory_gb
    what = f"{lead} {need.arithmetic()}" if lead else need.arithmetic()
    return NoFittingPlan(f"{what}, but tier {tier.name} ({tier.gpu}) has {tier.memory_gb:g} "
                         f"GB: {over:.1f} GB over", need.variant, tier.name, over)


def fit_problem(catalog: Catalog, variant: ModelVariant, tier: Tier, degree: int,
                placement: str, parallel: str = "auto") -> str | None:
    """Why ``variant`` cannot run on ``tier`` at ``degree`` (None when it can)."""
    if degree not in variant.degrees:
        why = (f"does not divide {variant.name}'s {variant.heads} attention heads"
               if variant.heads % degree else f"is not one of {variant.name}'s degrees")
        return (f"degree {degree} {why} (supported: "
                f"{', '.join(map(str, variant.degrees))})")
    if degree > tier.gpus_per_node:
        return (f"degree {degree} needs {degree} GPUs in one node; tier {tier.name} has "
                f"{tier.gpus_per_node} per node")
    if placement == "split" and variant.experts < 2:
        return f"placement 'split' needs two experts; {variant.name} has one"
    if placement == "split" and 2 * degree > tier.gpus_per_node:
        # Admission places the pair of groups as one pool member, on one node.
        return (f"placement 'split' needs two groups of {degree} GPUs on one node; tier "
                f"{tier.name} has {tier.gpus_per_node} per node")
    if parallel != "auto":
        problem = _explicit_plan_problem(variant, degree, parallel)
        if problem:
            return problem
    try:
        choose_plan(catalog, variant, tier, degree, placement, parallel)
    except NoFittingPlan as exc:
        return str(exc)
    return None


def _explicit_plan_problem(variant: ModelVariant, degree: int, parallel: str) -> str | None:
    try:
        plan = parse_plan(parallel)
    except ValueError as exc:
        return str(exc)
    if plan.degree != degree:
        return f"{parallel!r} uses {plan.degree} ranks; the route's degree is {degree}"
    if not splits(variant, plan):
        return (f"{parallel!r} cannot split {variant.name} ({variant.heads} heads, "
                f"FFN {variant.ffn_dim}) {plan.tp * plan.sp} ways")
    return None
