"""--distill-steps N: a few-step student with the teacher's guidance folded in (issue #12).

Method: piecewise trajectory distillation of the probability-flow ODE. The base (the
teacher) renders training captions with its own sampler and classifier-free guidance
(workers/lightening/teacher.py); its latents are kept at the N + 1 noise levels of the
student's N-step schedule, which are a subset of the teacher's grid (an N-step flow UniPC
grid lies inside an M-step one whenever N divides M), so every target is an exact teacher
state, not an interpolation. Between two of those levels the student learns the straight
line: at the teacher's latent x_a (level sigma_a) and caption, with the conditional pass
only, it predicts the velocity (x_b - x_a) / (sigma_b - sigma_a) that one Euler step takes
to the teacher's next state x_b. The student's sampler is that Euler step: the folder keeps
UniPC (so WanT2V and diffusers' WanPipeline load it unchanged) at solver order 1 with the
corrector off, which for flow matching is exactly Euler on the same sigmas. Guidance is
folded in because the targets are the guided teacher's; the student renders with guidance
1.0, one pass per step: N passes instead of 2 x the teacher's steps.

Each expert learns only the student steps it runs at render time (WanT2V.expert_for on the
student's timesteps: t >= boundary_ratio * 1000 is the high-noise expert), starting from the
weights it has. (Feeding half of each batch from the student's own rollout, against the
same targets, was tried on the toy: no gain at equal steps, so inputs are the teacher's.)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.teacher import training_captions, trajectories
from workers.wan_pipeline import WanT2V

CHECKPOINT = "distill-checkpoint.pt"
TEACHER_CACHE = "teacher-trajectories.pt"
SEED_BASE = 1 << 20  # trajectory seeds start here: far from farm eval's (1000 + 17c + k)

WHY = ("Why trajectory distillation: consistency distillation queries the teacher (a guided, "
       "two-pass solve) at every training step, and distribution matching trains a second "
       "'fake score' network against the student in a GAN-like balance; both take far longer "
       "than the few minutes a 2-core machine gives. The trajectory targets are rendered "
       "once, batched, and each training step is one student pass per sample. Progressive "
       "distillation (20 -> 10 -> 5 -> ... steps, one round each) reaches the same straight "
       "segments through several rounds, each compounding its error; matching the teacher's "
       "own states at the student's levels does it in one round, with exact targets.")

NOT_KL = ("Soft-label knowledge distillation matches a student's class probabilities to a "
          "teacher's (a KL divergence between two softmax outputs over the same labels). A "
          "diffusion expert has no labels and no softmax: it outputs a continuous velocity "
          "field over the latent (C x F x H x W per step), and what the student must inherit "
          "is where the teacher's sampler goes, a whole trajectory of many network calls "
          "with guidance mixing two of them per step. A KL between per-pixel Gaussians of "
          "fixed variance reduces to the mean squared error on those outputs; and matching "
          "the teacher call for call would keep its 20 steps and two passes. So the student "
          "is trained to reproduce the teacher's states several steps apart in one step.")


@dataclass
class DistillSteps:
    """The operation; settings default to the shipped toy model (its catalog entry renders
    20 steps at guidance 4.0 / 4.0, 17 frames at 32x32)."""

    steps: int = 4  # the student's sampler steps (--distill-steps)
    teacher_steps: int = 20  # the base's default steps; the teacher's grid is a multiple of N
    guidance: tuple[float, float] = (4.0, 4.0)  # the teacher's CFG (high, low expert)
    trajectories: int = 512  # teacher renders to learn from (seen captions only)
    validation: int = 32  # more teacher renders, never trained on: the reported losses
    train_steps: int = 600
    batch: int = 16  # samples per expert per training step
    lr: float = 2e-4  # AdamW, 20 warm-up steps (fewer in short runs), cosine to lr / 10
    frames: int = 17
    height: int = 32
    width: int = 32
    checkpoint_every: int = 100

    name: ClassVar[str] = "distill"

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not (
                1 <= self.steps <= self.teacher_steps):
            raise DeriveError(f"--distill-steps must be a whole number of steps from 1 to the "
                              f"base's {self.teacher_steps}, got {self.steps!r}")
        for field_name in ("trajectories", "validation", "train_steps", "batch",
                           "checkpoint_every"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeriveError(f"distill {field_name} must be a positive whole number, "
                                  f"got {value!r}")
        if not self.lr > 0:
            raise DeriveError(f"distill lr must be positive, got {self.lr!r}")
        if isinstance(self.guidance, (int, float)):
            self.guidance = (self.guidance, self.guidance)
        if len(self.guidance) != 2 or not all(float(g) >= 1.0 for g in self.guidance):
            raise DeriveError(f"distill guidance must be the teacher's CFG scale (>= 1), or "
                              f"one per expert (high, low), got {self.guidance!r}")
        self.guidance = tuple(float(g) for g in self.guidance)

    def settings(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def apply(self, ctx: DeriveContext) -> dict:
        return _distill(self, ctx)


# ---- the student's sampler and where its steps sit on the teacher's grid --------------------

def student_scheduler(base_scheduler):
    """The base's scheduler made a first-order one: Euler for flow matching, same sigmas."""
    config = dict(base_scheduler.config)
    if isinstance(base_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if (isinstance(base_scheduler, UniPCMultistepScheduler) and config.get("use_flow_sigmas")
            and config.get("prediction_type") == "flow_prediction"):
        # Order 1 without the corrector is DDIM, which for a flow x_t = (1 - s) x0 + s noise
        # is x_b = x_a + (s_b - s_a) v. The corrector is off for every step a render can take.
        config.update(solver_order=1, lower_order_final=True,
                      disable_corrector=list(range(config["num_train_timesteps"])))
        return UniPCMultistepScheduler.from_config(config)
    raise DeriveError(f"--distill-steps needs a flow-matching sampler (UniPC with flow sigmas, "
                      f"or FlowMatchEulerDiscrete); the base's is "
                      f"{type(base_scheduler).__name__!r}")


def teacher_grid(base_scheduler, student_sigmas: torch.Tensor, steps: int,
                 teacher_steps: int) -> tuple[int, list[int]]:
    """The fewest teacher steps (at least ``teacher_steps``) whose sigmas contain every one
    of the student's, and where: (M, [index of student sigma k in the teacher's M + 1])."""
    for m in range(teacher_steps, teacher_steps * steps + 2):
        scheduler = type(base_scheduler).from_config(base_scheduler.config)
        scheduler.set_timesteps(m)
        grid = scheduler.sigmas.double()
        where = [int((grid - s).abs().argmin()) for s in student_sigmas.double()]
        if all(abs(float(grid[i]) - float(s)) < 1e-6 for i, s in zip(where, student_sigmas)):
            return m, where
    raise DeriveError(f"--distill-steps {steps}: no teacher schedule of {teacher_steps} to "
                      f"{teacher_steps * steps + 1} steps passes through the student's sigmas")


# ---- the teacher's states -------------------------------------------------------------------

def teacher_states(op: DistillSteps, ctx: DeriveContext, teacher: WanT2V, m: int,
                   where: list[int]) -> dict:
    """The teacher's latents at the student's levels, x (n, N + 1, C, F, H, W), and caption
    embeddings cond (n, L, D) for ``trajectories + validation`` seeded renders; kept in the
    scratch folder so a resumed run does not render them again (a fresh run renders anew:
    the base may have changed)."""
    total = op.trajectories + op.validation
    key = {"seed": ctx.seed, "prompts": ctx.prompts, "teacher_steps": m, "where": where,
           "guidance": list(op.guidance), "n": total,
           "shape": [op.frames, op.height, op.width]}
    cache = ctx.scratch / TEACHER_CACHE
    if ctx.resume and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            return saved
    captions = training_captions(ctx.prompts, ctx.seed, total)
    seeds = [SEED_BASE + (ctx.seed * 1_000_003 + i) % (1 << 30) for i in range(total)]
    xs, conds = [], []
    for i in range(0, total, 64):  # only the student's levels are kept
        traj = trajectories(teacher, captions[i:i + 64], seeds[i:i + 64], m, op.guidance,
                            op.frames, op.height, op.width)
        xs.append(traj.latents[:, where].clone())
        conds.append(traj.cond)
    data = {"key": key, "x": torch.cat(xs), "cond": torch.cat(conds), "captions": captions,
            "seeds": seeds}
    _save_atomic(data, cache)
    return data


# ---- training -------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the loop needs: the student's grid and which expert runs each of its steps."""
    sigmas: torch.Tensor  # (N + 1,) float32
    timesteps: torch.Tensor  # (N,) as the sampler hands them to the expert
    which: list[str]  # "high" | "low" per student step
    experts: dict  # "high" / "low" -> WanTransformer3DModel (trained in place)

    def steps_of(self, name: str) -> torch.Tensor:
        return torch.tensor([k for k, w in enumerate(self.which) if w == name])


def velocity_target(x: torch.Tensor, k: torch.Tensor, start: torch.Tensor,
                    sigmas: torch.Tensor) -> torch.Tensor:
    """The velocity one Euler step from ``start`` (at sigma_k) must take to land on the
    teacher's x[:, k + 1]: (x_{k+1} - start) / (sigma_{k+1} - sigma_k)."""
    ds = (sigmas[k + 1] - sigmas[k]).view(-1, 1, 1, 1, 1)
    return (x[torch.arange(len(k)), k + 1] - start) / ds


def expert_loss(plan: Plan, name: str, x, cond, idx, k, start) -> torch.Tensor:
    expert = plan.experts[name]
    pred = expert(hidden_states=start, timestep=plan.timesteps[k], encoder_hidden_states=cond[idx],
                  return_dict=False)[0]
    return F.mse_loss(pred.float(), velocity_target(x[idx], k, start, plan.sigmas))


@torch.no_grad()
def rollout(plan: Plan, x: torch.Tensor, cond: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The student's own render from each trajectory's noise x[:, 0]: (n, N + 1, ...)."""
    out = []
    for i in range(0, len(x), batch):
        z, c = x[i:i + batch, 0], cond[i:i + batch]
        states = [z]
        for k, name in enumerate(plan.which):
            t = plan.timesteps[k].expand(len(z))
            v = plan.experts[name](hidden_states=z, timestep=t, encoder_hidden_states=c,
                                   return_dict=False)[0].float()
            z = z + (plan.sigmas[k + 1] - plan.sigmas[k]) * v
            states.append(z)
        out.append(torch.stack(states, 1))
    return torch.cat(out)


@torch.no_grad()
def measure(plan: Plan, x: torch.Tensor, cond: torch.Tensor) -> dict:
    """Over whole renders (held-back or trained ones): each expert's velocity loss at the
    teacher's states, and the mean squared distance of the student's final latent (its own
    N-step render from the same noise) from the teacher's."""
    losses = {}
    n = len(x)
    for name in plan.experts:
        ks = plan.steps_of(name)
        if len(ks) == 0:
            continue
        idx = torch.arange(n).repeat_interleave(len(ks))
        k = ks.repeat(n)
        losses[name] = round(float(expert_loss(plan, name, x, cond, idx, k, x[idx, k])), 5)
    final = rollout(plan, x, cond)[:, -1]
    losses["final_latent_mse"] = round(float(F.mse_loss(final, x[:, -1])), 5)
    return losses


def _lr_factor(step: int, total: int) -> float:
    warmup = min(20, max(1, total // 5))  # a seconds-long run warms up for a fifth of it
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(op: DistillSteps, ctx: DeriveContext, plan: Plan, data: dict) -> dict:
    """The training loop, checkpointed to ``ctx.scratch`` every ``op.checkpoint_every`` steps;
    with ``ctx.resume`` it continues from the last checkpoint (bit for bit on one thread)."""
    x, cond = data["x"][:op.trajectories], data["cond"][:op.trajectories]
    params = [p for e in plan.experts.values() for p in e.parameters()]
    optimizer = torch.optim.AdamW(params, lr=op.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    state = {"step": 0, "seconds": 0.0, "log": []}
    path = ctx.scratch / CHECKPOINT
    if ctx.resume and path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved["settings"] != op.settings() or saved["seed"] != ctx.seed:
            raise DeriveError(f"--resume: {path} was written by a distill run with other "
                              f"settings ({saved['settings']}, seed {saved['seed']})")
        for name, expert in plan.experts.items():
            expert.load_state_dict(saved["experts"][name])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        state = saved["state"]
        ctx.note(f"distill resumes at step {state['step']} of {op.train_steps}")
    steps_of = {name: plan.steps_of(name) for name in plan.experts}
    for e in plan.experts.values():
        e.train().requires_grad_(True)
    started = time.monotonic() - state["seconds"]
    for step in range(state["step"], op.train_steps):
        for group in optimizer.param_groups:
            group["lr"] = op.lr * _lr_factor(step, op.train_steps)
        losses = {}
        optimizer.zero_grad(set_to_none=True)
        for name, ks in steps_of.items():
            if len(ks) == 0:
                continue
            idx = torch.randint(len(x), (op.batch,), generator=gen)
            k = ks[torch.randint(len(ks), (op.batch,), generator=gen)]
            loss = expert_loss(plan, name, x, cond, idx, k, x[idx, k])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plan.experts[name].parameters(), 1.0)
            losses[name] = loss.item()
        optimizer.step()
        state["log"].append(losses)
        done = step + 1
        if done % op.checkpoint_every == 0 or done == op.train_steps:
            state.update(step=done, seconds=time.monotonic() - started)
            _save_atomic({"settings": op.settings(), "seed": ctx.seed, "state": state,
                          "experts": {n: e.state_dict() for n, e in plan.experts.items()},
                          "optimizer": optimizer.state_dict(), "generator": gen.get_state()},
                         path)
            recent = {n: float(np.mean([r[n] for r in state["log"][-50:]])) for n in losses}
            ctx.note(f"distill step {done}/{op.train_steps} loss {recent} "
                     f"({state['seconds']:.0f} s)")
    for e in plan.experts.values():
        e.eval().requires_grad_(False)
    return state


# ---- the operation --------------------------------------------------------------------------

def _plan(op: DistillSteps, student: WanT2V, scheduler, folder: Path) -> Plan:
    """The student's grid and experts; each expert must be plain float weights to train."""
    scheduler.set_timesteps(op.steps)
    student.scheduler = scheduler  # expert_for reads num_train_timesteps from it
    which = [student.expert_for(float(t))[1] for t in scheduler.timesteps]
    experts = {"high": student.transformer}
    if student.transformer_2 is not None:
        experts["low"] = student.transformer_2
    for name, expert in experts.items():
        odd = [(n, p) for n, p in expert.named_parameters()
               if type(p.data) is not torch.Tensor or not p.is_floating_point()]
        if odd:
            raise DeriveError(f"--distill-steps trains plain float weights; the {name}-noise "
                              f"expert in {str(folder)!r} holds {odd[0][0]!r} as "
                              f"{type(odd[0][1].data).__name__} {odd[0][1].dtype} "
                              f"(distil before quantizing)")
        expert.float()
    return Plan(scheduler.sigmas.float().clone(), scheduler.timesteps.clone(), which, experts)


def _write_student(work: Path, plan: Plan, scheduler) -> None:
    """The trained experts over the folder's (old weight files removed first, so a sharded
    checkpoint leaves no stale shard) and the first-order sampler's config."""
    for name, folder in (("high", "transformer"), ("low", "transformer_2")):
        if name not in plan.experts:
            continue
        for old in (work / folder).iterdir():
            if old.suffix in (".safetensors", ".bin") or old.name.endswith(".index.json"):
                old.unlink()
        plan.experts[name].save_pretrained(work / folder, safe_serialization=True)
    scheduler.save_pretrained(work / "scheduler")


def _distill(op: DistillSteps, ctx: DeriveContext) -> dict:
    started = time.monotonic()
    torch.manual_seed(ctx.seed)
    teacher = WanT2V.from_folder(ctx.base)
    scheduler = student_scheduler(teacher.scheduler)
    plan = _plan(op, WanT2V.from_folder(ctx.work), scheduler, ctx.work)
    m, where = teacher_grid(teacher.scheduler, plan.sigmas, op.steps, op.teacher_steps)
    data = teacher_states(op, ctx, teacher, m, where)
    rendered = time.monotonic() - started
    held = data["x"][op.trajectories:], data["cond"][op.trajectories:]
    seen = data["x"][:op.validation], data["cond"][:op.validation]  # as many trained ones
    before = measure(plan, *held), measure(plan, *seen)
    state = train(op, ctx, plan, data)
    after = measure(plan, *held), measure(plan, *seen)
    _write_student(ctx.work, plan, scheduler)
    final = {n: round(float(np.mean([r[n] for r in state["log"][-50:]])), 5)
             for n in plan.experts if plan.steps_of(n).numel()}
    return {
        "method": "piecewise trajectory distillation (flow matching, guidance folded in)",
        "why": WHY,
        "teacher": {"folder": str(ctx.base), "steps": m, "guidance": list(op.guidance),
                    "sampler": type(teacher.scheduler).__name__,
                    "levels_kept": where},
        "student": {"steps": op.steps, "sampler": f"{type(scheduler).__name__} order 1 (Euler)",
                    "sigmas": [round(float(s), 5) for s in plan.sigmas],
                    "timesteps": [int(t) for t in plan.timesteps], "experts": plan.which,
                    "passes_per_render": op.steps},
        "training": {"trajectories": op.trajectories, "validation": op.validation,
                     "captions": "the given prompts" if ctx.prompts
                     else "the toy world's seen combinations (never the held-out ones)",
                     "seeds": f"{data['seeds'][0]}..{data['seeds'][-1]}",
                     "steps": op.train_steps, "batch_per_expert": op.batch, "lr": op.lr,
                     "threads": torch.get_num_threads(),
                     "teacher_seconds": round(rendered, 1),
                     "train_seconds": round(state["seconds"], 1)},  # all runs, resumed too
        "losses": {"train_final": final,  # mean of the last 50 steps' batches
                   "held_back_before": before[0], "held_back_after": after[0],
                   "trained_before": before[1], "trained_after": after[1]},
        "render": {"steps": op.steps, "guidance": 1.0},
        "seconds": round(time.monotonic() - started, 1),
        "notes": NOT_KL,
    }
