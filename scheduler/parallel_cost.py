"""Parallel plans and the bytes each moves per denoising step, from the arithmetic (issue #5);
scheduler/memory.py holds their memory per GPU and chooses among them.

Per rank, per step, bf16 activations (2 bytes), S video tokens, width D, L blocks, and a
ring all-reduce moving 2(N-1)/N of its buffer:
  tp N   3 all-reduces of S x D per block (self-attention out, cross-attention out, FFN out)
  sp N   4 all-to-alls of S/N x D per block (q, k, v in, attention out back), each moving
         (N-1)/N of its buffer, plus one all-gather of the output tokens
  cfg 2  one all-gather of the noise prediction (the latent), and no unconditional pass
A step runs the expert twice with classifier-free guidance (once per CFG half with cfg 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.catalog import ModelVariant

ACTIVATION_BYTES = 2  # bf16


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    sp: int = 1
    cfg: int = 1

    @property
    def degree(self) -> int:
        return self.tp * self.sp * self.cfg

    @property
    def world(self) -> int:  # the ranks of an actor group
        return self.degree

    @property
    def model_parallel(self) -> int:
        """Ranks that share one forward pass (tp or sp)."""
        return self.tp * self.sp

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}"] * (self.tp > 1) + [f"sp{self.sp}"] * (self.sp > 1)
        return "+".join(parts + ["cfg2"] * (self.cfg == 2)) or "single"


def parse_plan(text: str) -> Plan:
    """"tp2", "sp4", "sp2+cfg2", "single"."""
    sizes = {"tp": 1, "sp": 1, "cfg": 1}
    for part in filter(None, text.split("+")):
        kind = part.rstrip("0123456789")
        number = part[len(kind):]
        if part == "single":
            continue
        if kind not in sizes or not number or (kind == "cfg" and number != "2"):
            raise ValueError(f"parallel {text!r}: unknown part {part!r}; use tpN or spN, "
                             "cfg2, joined by +")
        sizes[kind] = int(number)
    if sizes["tp"] > 1 and sizes["sp"] > 1:
        raise ValueError(f"parallel {text!r}: tp and sp cannot be combined")
    return Plan(**sizes)


def splits(variant: ModelVariant, plan: Plan) -> bool:
    """tp splits heads and FFN columns; sp splits heads (in attention) only."""
    return (variant.heads % (plan.tp * plan.sp) == 0
            and variant.ffn_dim % plan.tp == 0 and variant.dim % plan.tp == 0)


def candidate_plans(degree: int) -> list[Plan]:
    plans = [Plan(tp=degree), Plan(sp=degree)] if degree > 1 else [Plan()]
    if degree % 2 == 0:
        half = degree // 2
        plans += [Plan(cfg=2)] if half == 1 else [Plan(tp=half, cfg=2), Plan(sp=half, cfg=2)]
    return plans


def bytes_per_step(variant: ModelVariant, plan: Plan, width: int, height: int,
                   frames: int) -> float:
    """Bytes one rank sends per denoising step (with CFG)."""
    tokens = variant.tokens(width, height, frames)
    layer_bytes = tokens * variant.dim * ACTIVATION_BYTES
    passes = 1 if plan.cfg == 2 else 2
    per_pass = 0.0
    if plan.tp > 1:
        per_pass += variant.layers * 3 * layer_bytes * 2 * (plan.tp - 1) / plan.tp
    if plan.sp > 1:
        per_pass += variant.layers * 4 * (layer_bytes / plan.sp) * (plan.sp - 1) / plan.sp
        out_tokens = tokens * variant.latent.channels * _patch_cells(variant) * ACTIVATION_BYTES
        per_pass += out_tokens * (plan.sp - 1) / plan.sp
    total = passes * per_pass
    if plan.cfg == 2:
        latent = math.prod(variant.latent.shape(width, height, frames))
        total += latent * ACTIVATION_BYTES  # the all-gather of the two halves' predictions
    return total


def _patch_cells(variant: ModelVariant) -> int:
    pt, ph, pw = variant.latent.patch
    return pt * ph * pw
