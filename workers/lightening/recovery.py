"""Recovery after pruning: a smaller expert learns to give what the base's expert gives.

The training inputs are the base's own: its sampler's latents at every step this expert runs
(workers/lightening/teacher.py), with the caption's embedding and the empty prompt's, plus
the same captions' final latents re-noised to a random level on this expert's side of the
boundary (so timesteps off the 20-step grid are covered too). At each input the student
matches the base expert's output for the caption and for the empty prompt, the guidance
direction between them (what classifier-free guidance amplifies), and the hidden state after
its blocks (each student block against the base block that ends its span, see
``feature_targets``). Work is staged (prune a little, recover, prune again); the state after
every stage and every ``checkpoint_every`` steps goes to the operation's scratch folder, so a
run continues where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from workers.lightening.teacher import Trajectories, training_captions, trajectories
from workers.wan_pipeline import WanT2V


@dataclass(frozen=True)
class RecoverySettings:
    captions: int = 128  # base renders whose steps are the training inputs (64: worse shapes)
    sampler_steps: int = 20  # the base's sampler for those renders (the toy's catalog values)
    guidance: float = 4.0
    frames: int = 17
    size: int = 32
    batch: int = 16  # latents per step; each is seen with its caption and the empty prompt
    lr: float = 5e-4  # AdamW; warm-up then cosine to lr/10 within each stage
    feature_weight: float = 1.0
    renoise: float = 0.25  # share of a batch re-noised from the base's final latents
    calibration: int = 32  # latents for importance scores and the reported losses
    checkpoint_every: int = 50

    def as_dict(self) -> dict:
        return asdict(self)


class ExpertInputs:
    """What one expert sees in the base's renders: latents (N, S_e, C, F, H, W) at the S_e
    steps it runs, their timesteps (S_e,) in 0..1000, final latents (N, C, F, H, W), caption
    embeddings (N, L, D) and the empty prompt's (1, L, D); re-noised inputs take sigma in
    [sigma_lo, sigma_hi), this expert's side of the boundary."""

    def __init__(self, traj: Trajectories, which: str, boundary_ratio: float | None):
        steps = [k for k, e in enumerate(traj.experts) if e == which]
        if not steps:
            raise ValueError(f"the base's sampler never runs the {which!r} expert")
        self.latents = traj.latents[:, steps]
        self.timesteps = traj.timesteps[steps].float()
        self.clean = traj.latents[:, -1]
        self.cond, self.uncond = traj.cond, traj.uncond
        b = 0.0 if boundary_ratio is None else boundary_ratio
        self.sigma_lo, self.sigma_hi = (b, 1.0) if which == "high" else (0.0, b)

    def batch(self, size: int, renoise: float, gen: torch.Generator):
        """-> x (2B, C, F, H, W), t (2B,), text (2B, L, D): B latents, each twice (the
        caption's embedding, then the empty prompt's)."""
        n, s = self.latents.shape[:2]
        idx = torch.randint(n, (size,), generator=gen)
        step = torch.randint(s, (size,), generator=gen)
        x, t = self.latents[idx, step].clone(), self.timesteps[step].clone()
        fresh = torch.rand(size, generator=gen) < renoise
        if fresh.any():
            k = int(fresh.sum())
            sigma = self.sigma_lo + (self.sigma_hi - self.sigma_lo) * torch.rand(k, generator=gen)
            noise = torch.randn((k, *x.shape[1:]), generator=gen)
            s5 = sigma.view(-1, 1, 1, 1, 1)
            x[fresh] = (1 - s5) * self.clean[idx[fresh]] + s5 * noise  # flow matching's x_t
            t[fresh] = sigma * 1000
        text = torch.cat([self.cond[idx], self.uncond.expand(size, -1, -1)])
        return torch.cat([x, x]), torch.cat([t, t]), text


def teacher_inputs(base: WanT2V, prompts: list[str], seed: int, settings: RecoverySettings,
                   cache: Path | None = None, reuse: bool = False) -> Trajectories:
    """The base's renders of ``settings.captions`` training captions (seeded), written to
    ``cache``; ``reuse`` (a resumed run) reads them back instead of rendering again."""
    key = {"seed": seed, "prompts": prompts, **settings.as_dict()}
    if reuse and cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            return saved["traj"]
    captions = training_captions(prompts, seed, settings.captions)
    seeds = [seed * 100_003 + i for i in range(settings.captions)]
    traj = trajectories(base, captions, seeds, settings.sampler_steps,
                        (settings.guidance, settings.guidance), settings.frames,
                        settings.size, settings.size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "traj": traj}, cache)
    return traj


def forward_features(model: WanTransformer3DModel, x, t, text):
    """-> (output, [hidden state after each block, (B, tokens, dim)])."""
    feats = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: feats.append(out))
             for b in model.blocks]
    try:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                    return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return out, feats


def feature_targets(origin: list[int] | None, teacher_layers: int) -> list[int | None]:
    """Which teacher block's output each student block should reproduce.

    Student block j started as teacher block ``origin[j]``; it takes over the teacher blocks
    dropped after it, so it is matched to the last teacher block before ``origin[j + 1]``
    (the last student block to the teacher's last). Without an origin only the last
    block is matched."""
    if origin is None:
        return [teacher_layers - 1]
    return [origin[j + 1] - 1 for j in range(len(origin) - 1)] + [teacher_layers - 1]


def distil_loss(student, teacher, origin, x, t, text, guidance, feature_weight):
    """Outputs (caption and empty prompt), the guidance direction and block features."""
    with torch.no_grad():
        t_out, t_feats = forward_features(teacher, x, t, text)
    s_out, s_feats = forward_features(student, x, t, text)
    half = x.shape[0] // 2
    output = F.mse_loss(s_out, t_out)
    # CFG multiplies (cond - uncond) by the guidance scale: its error is weighed as it lands.
    direction = F.mse_loss(s_out[:half] - s_out[half:], t_out[:half] - t_out[half:])
    targets = feature_targets(origin, len(teacher.blocks))
    pairs = list(zip(s_feats[-len(targets):], targets))
    features = sum(F.mse_loss(s, t_feats[k]) / t_feats[k].pow(2).mean() for s, k in pairs)
    features = features / len(pairs)
    loss = output + (guidance - 1) ** 2 * direction + feature_weight * features
    return loss, {"output": output.item(), "direction": direction.item(),
                  "features": features.item()}


@torch.no_grad()
def measure_loss(student, teacher, origin, batch, settings: RecoverySettings) -> dict:
    """The distillation loss on a fixed calibration batch (reported before and after)."""
    loss, parts = distil_loss(student, teacher, origin, *batch, settings.guidance,
                              settings.feature_weight)
    return {"total": round(loss.item(), 6), **{k: round(v, 6) for k, v in parts.items()}}


def _lr_factor(step: int, total: int, warmup: int = 10) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def rebuild(config: dict, weights: dict) -> WanTransformer3DModel:
    """An expert of ``config`` holding copies of ``weights``, each in its own dtype (diffusers
    keeps norms and modulation in float32 under a bfloat16 model)."""
    model = WanTransformer3DModel.from_config(config)
    model.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    return model.eval().requires_grad_(False)


class StageCheckpoint:
    """``scratch/<key>.pt``: the student after a shrink (config and weights), the steps of
    its recovery done, the optimizer and generator, and the records of finished stages.
    ``signature`` (the operation's settings) must match for a checkpoint to be resumed."""

    def __init__(self, scratch: Path, key: str, resume: bool, signature: dict):
        self.path = Path(scratch) / f"{key}.pt"
        self.resume = resume
        self.signature = signature

    def load(self) -> dict | None:
        if self.resume and self.path.is_file():
            state = torch.load(self.path, weights_only=False)
            if state.get("signature") == self.signature:
                return state
        return None

    def save(self, **state) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "signature": self.signature}, tmp)
        tmp.replace(self.path)  # a crash mid-write leaves the last checkpoint whole


Shrink = Callable[[WanTransformer3DModel, list[int] | None, tuple],
                  tuple[WanTransformer3DModel, list[int] | None, dict]]


def train(student, teacher, origin, inputs: ExpertInputs, steps: int, settings: RecoverySettings,
          gen: torch.Generator, curve: list[float], start: int = 0,
          opt_state: dict | None = None,
          on_checkpoint: Callable[[int, dict], None] | None = None) -> None:
    """``steps`` AdamW steps of distillation (continuing at ``start``); the mean training loss
    of every 25 steps is appended to ``curve``. ``on_checkpoint(step, optimizer state)`` every
    ``settings.checkpoint_every`` steps."""
    student.train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=0.0)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    window = []
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, steps)
        x, t, text = inputs.batch(settings.batch, settings.renoise, gen)
        loss, _ = distil_loss(student, teacher, origin, x, t, text, settings.guidance,
                              settings.feature_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if len(window) == 25 or step == steps - 1:
            curve.append(round(sum(window) / len(window), 6))
            window = []
        if on_checkpoint is not None and (step + 1) % settings.checkpoint_every == 0 \
                and step + 1 < steps:
            on_checkpoint(step + 1, opt.state_dict())
    student.eval().requires_grad_(False)


def run_stages(student, origin, stages: list[tuple[Shrink, int]], teacher, inputs: ExpertInputs,
               settings: RecoverySettings, seed: int, checkpoint: StageCheckpoint,
               note: Callable[[str], None] = lambda _m: None):
    """Shrink, recover, shrink again: ``stages`` is [(shrink, recovery steps)]. A shrink
    takes (student, origin, calibration batch) and returns the smaller student, its blocks'
    origin in the teacher and a record (scores measured, what it kept). Returns (student,
    origin, records), each record with the training's steps, seconds, losses."""
    gen = torch.Generator().manual_seed(seed)
    calib = inputs.batch(settings.calibration, settings.renoise,
                         torch.Generator().manual_seed(seed + 1))  # fixed: scores, losses
    state = checkpoint.load()
    records, first, start, opt_state, current = [], 0, 0, None, None
    if state is not None:
        student = rebuild(state["config"], state["weights"])
        origin, records = state["origin"], state["records"]
        if state["done"]:
            return student, origin, records
        first, start, opt_state, current = (state["stage"], state["step"], state["opt"],
                                            state["current"])
        gen.set_state(state["gen"])
        note(f"resuming stage {first + 1}/{len(stages)} at step {start}")

    def save(stage, step, opt, record, done=False):
        checkpoint.save(config=dict(student.config), weights=student.state_dict(),
                        origin=origin, records=records, stage=stage, step=step, opt=opt,
                        current=record, gen=gen.get_state(), done=done)

    for i in range(first, len(stages)):
        shrink, steps = stages[i]
        if current is None:  # not resumed inside this stage: shrink now
            student, origin, current = shrink(student, origin, calib)
            current.update(loss_before=measure_loss(student, teacher, origin, calib, settings),
                           steps=steps, batch=settings.batch, lr=settings.lr, seconds=0.0,
                           loss_curve=[])
            start, opt_state = 0, None
            save(i, 0, None, current)
        began, earlier = time.monotonic(), current["seconds"]  # earlier: before a resume

        def progress(step, opt):
            current["seconds"] = round(earlier + time.monotonic() - began, 1)
            save(i, step, opt, current)

        train(student, teacher, origin, inputs, steps, settings, gen, current["loss_curve"],
              start, opt_state, progress)
        current["seconds"] = round(earlier + time.monotonic() - began, 1)
        current["loss_after"] = measure_loss(student, teacher, origin, calib, settings)
        note(f"stage {i + 1}/{len(stages)}: loss {current['loss_before']['total']:.4f} -> "
             f"{current['loss_after']['total']:.4f} in {current['seconds']:.0f} s")
        # Saved after the note: a run stopped there resumes from the last mid-stage checkpoint.
        records.append(current)
        current = None
        save(i + 1, 0, None, None, done=(i + 1 == len(stages)))
    return student, origin, records
