"""Memory per GPU of a (variant, degree, placement, size), the arithmetic the router shows.

Estimate, in GB (1e9 bytes), per GPU of a tensor-parallel group of ``degree`` ranks:
    weights      params_b * bytes_per_param * resident experts / degree
    extra        text encoder + VAE, replicated on every rank
    activations  activation_gb[size] / degree   (tokens or heads are split across ranks)
    overhead     CUDA context and allocator slack
Placement decides the resident experts of a two-expert model (DESIGN.md "Models"): both
(`resident`), one with the other in pinned CPU memory (`offload`), or one per group (`split`).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.catalog import Catalog, ModelVariant, Tier

PLACEMENTS = ("resident", "offload", "split")


@dataclass(frozen=True)
class MemoryEstimate:
    variant: str
    degree: int
    placement: str
    size: str
    weights_gb: float
    extra_gb: float
    activations_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.extra_gb + self.activations_gb + self.overhead_gb

    def arithmetic(self, plan: str | None = None) -> str:
        how = f", {plan}" if plan else ""
        return (f"{self.variant} at degree {self.degree} ({self.placement}{how}, {self.size}): "
                f"weights {self.weights_gb:.1f} + encoders {self.extra_gb:.1f} + activations "
                f"{self.activations_gb:.1f} + overhead {self.overhead_gb:.1f} = "
                f"{self.total_gb:.1f} GB per GPU")


def resident_experts(variant: ModelVariant, placement: str) -> int:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    return variant.experts if placement == "resident" else 1


def estimate(catalog: Catalog, variant: ModelVariant, degree: int, placement: str,
             size: str | None = None) -> MemoryEstimate:
    """At ``size`` ("WxH", one of the variant's sizes), or the largest size it supports."""
    if size is None:
        size = max(variant.activation_gb, key=variant.activation_gb.get)
    experts = resident_experts(variant, placement)
    return MemoryEstimate(
        variant=variant.name, degree=degree, placement=placement, size=size,
        weights_gb=variant.params_b * variant.bytes_per_param * experts / degree,
        extra_gb=variant.extra_gb, activations_gb=variant.activation_gb[size] / degree,
        overhead_gb=catalog.runtime_overhead_gb,
    )


def fit_problem(catalog: Catalog, variant: ModelVariant, tier: Tier, degree: int,
                placement: str) -> str | None:
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
    need = estimate(catalog, variant, degree, placement)
    if need.total_gb > tier.memory_gb:
        return (f"{need.arithmetic()}, but tier {tier.name} ({tier.gpu}) has "
                f"{tier.memory_gb:g} GB: {need.total_gb - tier.memory_gb:.1f} GB over")
    return None
