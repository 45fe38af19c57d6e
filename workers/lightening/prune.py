"""Structured pruning of the Wan experts: FFN channels and whole blocks (issue #12, item 2),
and a shallower student (item 4).

Structured: the saved expert is a smaller `WanTransformer3DModel` (``ffn_dim`` or
``num_layers`` changed in its config.json, the weights sliced), so it loads with
``from_pretrained`` and runs faster; nothing is masked. Each removal is measured, not
guessed:
- an FFN channel's importance is its activation's RMS on calibration inputs times the norm
  of its output weights (what it adds to the residual stream); every block keeps the same
  number of channels (the config has one ``ffn_dim``), its own most important ones;
- a block's importance is how much the expert's output changes when the block is skipped
  (relative squared error on calibration inputs).
Calibration and training inputs are the base's own sampler states (workers/lightening/
recovery.py). Removal goes in steps (``--prune-ffn``: ``step`` of the channels at a time;
``--drop-blocks``: one block at a time), each followed by recovery distilled from the base.
Which base block each kept block came from is written beside its config
(``block_origin.json``) so a later operation matches features to the right teacher block.

Attention heads cannot be pruned in this architecture: see ``PruneHeads``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from abc import ABC, abstractmethod

import torch
from diffusers import WanTransformer3DModel

from workers.lightening.manifest import weights_sha256
from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.recovery import (
    ExpertInputs, RecoverySettings, StageCheckpoint, rebuild, run_stages, teacher_inputs,
)
from workers.wan_pipeline import WanT2V

EXPERTS = {"high": "transformer", "low": "transformer_2"}
ORIGIN_FILE = "block_origin.json"


def check_ratio(option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DeriveError(f"{option} {value!r}: must be a fraction strictly between 0 and 1")
    return float(value)


def check_count(option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeriveError(f"{option} {value!r}: must be a whole number of blocks, at least 1")
    return value


def check_counts(option: str, value) -> dict[str, int] | int:
    """K (every expert) or per expert: {"high": K, "low": K} or the text "high=2,low=1"."""
    given = value
    if isinstance(value, str) and "=" in value:
        pairs = [part.split("=", 1) for part in value.split(",")]
        try:
            value = {k.strip(): int(v) for k, v in pairs}
        except ValueError:
            raise DeriveError(f"{option} {value!r}: write K or high=K,low=K") from None
    elif isinstance(value, str):
        value = int(value) if value.strip().isdigit() else value
    if not isinstance(value, dict):
        return check_count(option, value)
    if not value or set(value) - {"high", "low"}:
        raise DeriveError(f"{option} {given!r}: per-expert counts are keyed 'high' and 'low'")
    for which, count in value.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise DeriveError(f"{option} {given!r}: {which}={count!r} must be a whole number "
                              f"of blocks, at least 1")
    return dict(value)


def check_experts(option: str, value: str) -> tuple[str, ...]:
    choices = {"both": ("high", "low"), "high": ("high",), "low": ("low",)}
    if value not in choices:
        raise DeriveError(f"{option} experts={value!r}: must be one of {sorted(choices)}")
    return choices[value]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- slicing ---------------------------------------------------------------------------------

def slice_ffn(model: WanTransformer3DModel, keep: list[torch.Tensor]) -> WanTransformer3DModel:
    """A new expert whose block b keeps FFN channels ``keep[b]`` (sorted indices, the same
    count in every block): rows of the up projection, columns of the down projection."""
    counts = {len(k) for k in keep}
    if len(keep) != len(model.blocks) or len(counts) != 1:
        raise ValueError(f"need one index set of one size per block, got sizes {counts}")
    state = dict(model.state_dict())
    for b, idx in enumerate(keep):
        up, down = f"blocks.{b}.ffn.net.0.proj.", f"blocks.{b}.ffn.net.2."
        state[up + "weight"] = state[up + "weight"][idx].clone()  # (ffn, dim) -> (kept, dim)
        state[up + "bias"] = state[up + "bias"][idx].clone()
        state[down + "weight"] = state[down + "weight"][:, idx].clone()  # (dim, ffn)
    return rebuild({**model.config, "ffn_dim": counts.pop()}, state)


def keep_blocks(model: WanTransformer3DModel, keep: list[int]) -> WanTransformer3DModel:
    """A new expert made of blocks ``keep`` (in order); everything else shared unchanged."""
    renamed = {}
    for key, value in model.state_dict().items():
        if not key.startswith("blocks."):
            renamed[key] = value.clone()
            continue
        _, b, rest = key.split(".", 2)
        if int(b) in keep:
            renamed[f"blocks.{keep.index(int(b))}.{rest}"] = value.clone()
    return rebuild({**model.config, "num_layers": len(keep)}, renamed)


# ---- importance ------------------------------------------------------------------------------

@torch.no_grad()
def ffn_scores(model: WanTransformer3DModel, calib) -> torch.Tensor:
    """(blocks, ffn_dim): RMS of each channel's activation over calibration tokens times the
    L2 norm of the weights that write it back to the residual stream."""
    sums = [None] * len(model.blocks)

    def hook(b):
        def record(_module, _inputs, act):  # act: (batch, tokens, ffn_dim), after GELU
            sums[b] = act.pow(2).mean(dim=(0, 1))
        return record

    hooks = [blk.ffn.net[0].register_forward_hook(hook(b)) for b, blk in enumerate(model.blocks)]
    try:
        x, t, text = calib
        model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([s.sqrt() * blk.ffn.net[2].weight.norm(dim=0)
                        for s, blk in zip(sums, model.blocks)])


@torch.no_grad()
def block_scores(model: WanTransformer3DModel, calib) -> list[float]:
    """Per block: ||out without the block - out||^2 / ||out||^2 on the calibration batch."""
    x, t, text = calib

    def run():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                     return_dict=False)[0]

    reference, blocks, scores = run(), model.blocks, []
    try:
        for b in range(len(blocks)):
            model.blocks = torch.nn.ModuleList([m for i, m in enumerate(blocks) if i != b])
            scores.append(((run() - reference).pow(2).sum() / reference.pow(2).sum()).item())
    finally:
        model.blocks = blocks
    return scores


# ---- shrinks: (student, origin, calibration batch) -> (student, origin, record) ---------------

def ffn_shrink(channels: int):
    def shrink(student, origin, calib):
        scores = ffn_scores(student, calib)
        keep = [s.topk(channels).indices.sort().values for s in scores]
        record = {"ffn_dim": [student.config.ffn_dim, channels],
                  "channel_scores": [[round(v, 5) for v in s.tolist()] for s in scores],
                  "channels_kept": [k.tolist() for k in keep]}
        return slice_ffn(student, keep), origin, record
    return shrink


def drop_one_block(student, origin, calib):
    scores = block_scores(student, calib)
    weakest = min(range(len(scores)), key=scores.__getitem__)
    keep = [b for b in range(len(scores)) if b != weakest]
    label = (lambda b: f"base block {origin[b]}") if origin else (lambda b: f"block {b}")
    record = {"block_scores": {label(b): round(s, 6) for b, s in enumerate(scores)},
              "dropped": label(weakest)}
    return keep_blocks(student, keep), ([origin[b] for b in keep] if origin else None), record


def layer_shrink(layers: int, init: str):
    def shrink(student, origin, calib):
        count = len(student.blocks)
        record = {"init": init}
        if init == "even":
            keep = sorted({round(i * (count - 1) / max(1, layers - 1)) for i in range(layers)})
        else:
            scores = block_scores(student, calib)
            keep = sorted(sorted(range(count), key=lambda b: -scores[b])[:layers])
            record["block_scores"] = [round(s, 6) for s in scores]
        record["blocks_kept"] = [origin[b] for b in keep] if origin else keep
        return keep_blocks(student, keep), record["blocks_kept"] if origin else None, record
    return shrink


# ---- folders ---------------------------------------------------------------------------------

def load_expert(folder, which: str, option: str) -> WanTransformer3DModel:
    path = folder / EXPERTS[which]
    if not (path / "config.json").is_file():
        raise DeriveError(f"{option}: {folder} has no {which}-noise expert ({EXPERTS[which]}/)")
    config = json.loads((path / "config.json").read_text())
    model = WanTransformer3DModel.from_pretrained(path)
    if "quantization_config" in config or any(not p.is_floating_point()
                                                for p in model.parameters()):
        raise DeriveError(f"{option}: {path} holds quantized weights; prune before quantizing")
    return model.eval().requires_grad_(False)


def read_origin(folder, which: str, student, teacher, teacher_sha: str) -> list[int] | None:
    """The teacher block each student block came from: the sidecar an earlier operation wrote
    against this same teacher, else identity when the depths agree, else unknown (None)."""
    sidecar = folder / EXPERTS[which] / ORIGIN_FILE
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        if saved.get("teacher_sha256") == teacher_sha and len(saved["blocks"]) == len(
                student.blocks):
            return saved["blocks"]
    return list(range(len(student.blocks))) if len(student.blocks) == len(teacher.blocks) \
        else None


def save_expert(model, folder, which: str, origin, teacher_sha: str) -> None:
    path = folder / EXPERTS[which]
    shutil.rmtree(path)  # no stale weight file or sidecar survives
    model.save_pretrained(path, safe_serialization=True)
    if origin is not None:
        (path / ORIGIN_FILE).write_text(json.dumps(
            {"teacher_sha256": teacher_sha, "blocks": origin}) + "\n")


# ---- operations ------------------------------------------------------------------------------

class _Staged(ABC):
    """Shared by the operations: load, plan (validated for every expert before any training),
    stage and recover each expert from the base, save; the manifest entry."""

    name = ""
    option = ""
    method = ""

    def __init__(self, experts: str, recovery: RecoverySettings):
        self.experts = check_experts(f"--{self.name}", experts)
        self.recovery = recovery

    @abstractmethod
    def stages(self, student, which: str) -> list:
        """[(shrink, recovery steps)] for this expert; DeriveError when it cannot be done."""

    def _only_experts_in(self, counts) -> None:
        """Per-expert counts ({"high": K}) name the experts the operation changes."""
        if isinstance(counts, dict):
            self.experts = tuple(w for w in ("high", "low") if w in counts)

    @staticmethod
    def _count_for(counts, which: str) -> int:
        return counts[which] if isinstance(counts, dict) else counts

    def apply(self, ctx: DeriveContext) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(ctx.threads)
        try:
            return self._apply(ctx)
        finally:
            torch.set_num_threads(threads)

    def _apply(self, ctx: DeriveContext) -> dict:
        started = time.monotonic()
        base = WanT2V.from_folder(ctx.base)
        present = [w for w in self.experts if (ctx.work / EXPERTS[w]).is_dir()]
        if not present or (self.experts != ("high", "low") and present != list(self.experts)):
            raise DeriveError(f"{self.option}: {ctx.work} lacks the expert(s) {self.experts}")
        students = {w: load_expert(ctx.work, w, self.option) for w in present}
        plans = {w: self.stages(students[w], w) for w in present}
        traj = teacher_inputs(base, ctx.prompts, ctx.seed, self.recovery,
                              ctx.scratch / "trajectories.pt", reuse=ctx.resume)
        experts, signature = {}, {"settings": self.settings(), **self.recovery.as_dict()}
        for k, which in enumerate(present):
            teacher = base.transformer if which == "high" else base.transformer_2
            teacher_sha = weights_sha256(ctx.base / EXPERTS[which])
            student = students[which]
            origin = read_origin(ctx.work, which, student, teacher, teacher_sha)
            before = {"params": param_count(student), **self._shape(student)}
            student, origin, records = run_stages(
                student, origin, plans[which], teacher,
                ExpertInputs(traj, which, base.boundary_ratio), self.recovery,
                ctx.seed * 1000 + k, StageCheckpoint(ctx.scratch, which, ctx.resume, signature),
                lambda m, w=which: ctx.note(f"{self.option} {w}: {m}"))
            save_expert(student, ctx.work, which, origin, teacher_sha)
            experts[which] = {"before": before,
                              "after": {"params": param_count(student), **self._shape(student)},
                              "base_params": param_count(teacher),
                              "blocks_from_base": origin, "stages": records}
        return {"name": self.name, "settings": self.settings(), "method": self.method,
                "recovery": {**self.recovery.as_dict(),
                             "data": "the base's own renders of training captions (never the "
                                     "held-out ones): its latents at every step and re-noised "
                                     "final latents, caption and empty prompt",
                             "loss": "MSE to the base expert's outputs + (guidance - 1)^2 x "
                                     "MSE of the guidance direction + feature_weight x "
                                     "relative MSE of block outputs"},
                "experts": experts, "seconds": round(time.monotonic() - started, 1)}

    @staticmethod
    def _shape(model) -> dict:
        return {"num_layers": model.config.num_layers, "ffn_dim": model.config.ffn_dim}


class PruneFfn(_Staged):
    """``--prune-ffn R``: remove the fraction R of every block's FFN channels, ``step`` at a
    time, each step followed by recovery."""

    name, option = "prune-ffn", "--prune-ffn"
    method = ("structured FFN channel pruning: per block, channels ranked by activation RMS x "
              "output-weight norm on the base's sampler states; removed in steps, each "
              "followed by recovery distilled from the base")

    def __init__(self, ratio: float, step: float = 0.05, experts: str = "both",
                 stage_steps: int = 40, final_steps: int = 300, multiple: int = 8,
                 recovery: RecoverySettings = RecoverySettings()):
        self.ratio = check_ratio("--prune-ffn", ratio)
        self.step = check_ratio("--prune-ffn step", step)
        self.multiple = check_count("--prune-ffn multiple", multiple)
        self.stage_steps, self.final_steps = stage_steps, final_steps
        self.option = f"--prune-ffn {ratio}"
        super().__init__(experts, recovery)

    def settings(self) -> dict:
        return {"ratio": self.ratio, "step": self.step, "experts": list(self.experts),
                "stage_steps": self.stage_steps, "final_steps": self.final_steps,
                "multiple": self.multiple}

    def channel_plan(self, dim: int) -> list[int]:
        """FFN channels kept after each step, rounded to a multiple of ``multiple`` (matrix
        kernels work in whole tiles; on this CPU 141 channels cost what 144 do)."""
        plan = []
        for i in range(math.ceil(self.ratio / self.step - 1e-9)):
            kept = dim * (1 - min(self.ratio, self.step * (i + 1)))
            channels = min(dim, self.multiple * round(kept / self.multiple))
            if channels < 1:
                raise DeriveError(f"{self.option}: leaves no FFN channel of {dim} (kept "
                                  f"channels are rounded to a multiple of {self.multiple})")
            if channels < (plan[-1] if plan else dim):
                plan.append(channels)
        if not plan:
            raise DeriveError(f"{self.option}: removes no FFN channel of {dim} once rounded "
                              f"to a multiple of {self.multiple}")
        return plan

    def stages(self, student, which: str) -> list:
        plan = self.channel_plan(student.config.ffn_dim)
        return [(ffn_shrink(c), self.final_steps if i == len(plan) - 1 else self.stage_steps)
                for i, c in enumerate(plan)]


class DropBlocks(_Staged):
    """``--drop-blocks K``: remove K blocks, the least important one at a time (scores
    measured again after each recovery). K per expert: ``high=2,low=1``."""

    name = "drop-blocks"
    method = ("structured block removal: the block whose skipping changes the expert's output "
              "least on the base's sampler states goes, one at a time, each removal followed "
              "by recovery distilled from the base")

    def __init__(self, count: int | str | dict, experts: str = "both", stage_steps: int = 150,
                 final_steps: int = 600, recovery: RecoverySettings = RecoverySettings()):
        self.count = check_counts("--drop-blocks", count)
        self.stage_steps, self.final_steps = stage_steps, final_steps
        self.option = f"--drop-blocks {count}"
        super().__init__(experts, recovery)
        self._only_experts_in(self.count)

    def settings(self) -> dict:
        return {"count": self.count, "experts": list(self.experts),
                "stage_steps": self.stage_steps, "final_steps": self.final_steps}

    def stages(self, student, which: str) -> list:
        count = self._count_for(self.count, which)
        layers = student.config.num_layers
        if count >= layers:
            raise DeriveError(f"{self.option}: the {which}-noise expert has {layers} blocks; "
                              f"at least one must stay (K < {layers})")
        return [(drop_one_block, self.final_steps if i == count - 1 else self.stage_steps)
                for i in range(count)]


class StudentLayers(_Staged):
    """``--student-layers K``: a student of the same architecture with K blocks (K per
    expert: ``high=1,low=3``), started from K of the base's (``init="importance"``: the K
    whose skipping hurts most; ``"even"``: evenly spaced, first and last kept) and trained
    to match the base."""

    name = "student-layers"
    method = ("shallower student: K of the expert's blocks as its initialisation, then "
              "distillation from the base on outputs and block features")

    def __init__(self, layers: int | str | dict, init: str = "importance", steps: int = 600,
                 experts: str = "both", recovery: RecoverySettings = RecoverySettings()):
        self.layers = check_counts("--student-layers", layers)
        if init not in ("importance", "even"):
            raise DeriveError(f"--student-layers init={init!r}: must be 'importance' or 'even'")
        self.init, self.steps = init, steps
        self.option = f"--student-layers {layers}"
        super().__init__(experts, recovery)
        self._only_experts_in(self.layers)

    def settings(self) -> dict:
        return {"layers": self.layers, "init": self.init, "steps": self.steps,
                "experts": list(self.experts)}

    def stages(self, student, which: str) -> list:
        want = self._count_for(self.layers, which)
        layers = student.config.num_layers
        if want >= layers:
            raise DeriveError(f"{self.option}: the {which}-noise expert has {layers} blocks; "
                              f"a student needs fewer (K < {layers})")
        return [(layer_shrink(want, self.init), self.steps)]


HEADS_REASON = (
    "diffusers' WanTransformer3DModel cannot hold fewer attention heads at the same width: "
    "each block builds its attention with heads x (dim // heads) channels, which is the "
    "model's width (num_attention_heads x attention_head_dim is the hidden size everywhere: "
    "patch embedding, norms, modulation, projections), and its q/k RMS norms run across all "
    "heads together, so removing heads means changing the width of the whole model; use "
    "--prune-ffn or --drop-blocks")


class PruneHeads:
    """``--prune-heads R``: refused, with the reason (see ``HEADS_REASON``)."""

    name = "prune-heads"

    def __init__(self, ratio: float):
        check_ratio("--prune-heads", ratio)
        raise DeriveError(f"--prune-heads {ratio}: {HEADS_REASON}")
