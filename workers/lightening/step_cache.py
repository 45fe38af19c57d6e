"""Training-free step caching on the farm's own sampler (issue #12, item 6).

Adjacent denoising steps change the transformer's work little, so part of it can be reused
from the step before instead of recomputed. Two of diffusers' cache hooks are offered,
applied to both experts of a loaded `WanT2V` (workers/wan_pipeline.py):

- ``first_block``: the first block always runs; when its residual changed by less than
  ``threshold`` (mean absolute change relative to the previous step's) the other blocks are
  skipped and the previous step's residual of those blocks is added back.
- ``mag``: the whole block stack is skipped while the error accumulated from the model's
  residual-magnitude ratios stays under ``threshold`` (at most ``max_skip`` steps in a row).
  The ratios belong to a checkpoint: `calibrate_mag_ratios` measures them per expert from
  one uncached render, and they travel in the config as plain lists.

TaylorSeer (diffusers' third hook) is refused, for two measured reasons: it keeps Taylor
factors of every block's attention and feed-forward outputs per pass (on A14B at 720p, 81
frames: 75,600 tokens x 5,120 x 2 bytes = 0.77 GB each, 40 blocks x 3 modules x 2 factors
x 2 passes = 370 GB per expert), and on the toy model its extrapolation lost colour accuracy
(84 of 96 against 96) where the other two kept every attribute at similar savings. Its
light mode (only the output extrapolated) fits in memory but rendered further from the
uncached frames still. It also has no threshold, only a fixed interval.

`enable` hooks the experts and replaces ``pipe.guide`` and ``pipe.denoise_steps`` on the
instance (as a CFG-parallel plan replaces ``guide``, workers/parallel/cfg_parallel.py):
every transformer call runs inside its own cache context, "cond" or "uncond", so a skip
decision never compares a conditional pass with an unconditional one; every call of
``denoise_steps`` (a render, or one group's phase of a split render) starts from empty
caches. `last_render_counts` says how many passes and blocks ran in full and how many were
reused. The config travels as a plain dict: ``StepCacheConfig.from_dict(route["cache"])``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
from diffusers.hooks.mag_cache import nearest_interp

KINDS = ("first_block", "mag")
NOT_OFFERED = {"taylorseer": "its per-block Taylor factors do not fit in memory at A14B's "
                             "size and it lost attributes on the toy model (step_cache.py)"}
EXPERTS = ("high", "low")
# What each kind reads besides ``kind``; anything else in a route's dict is refused.
FIELDS = {"first_block": {"threshold"},
          "mag": {"threshold", "max_skip", "warmup", "ratios"}}


def _bad(name: str, value, why: str) -> ValueError:
    return ValueError(f"cache.{name} {value!r}: {why}")


@dataclass(frozen=True)
class StepCacheConfig:
    """A route's ``cache`` option. ``threshold``: 0 never skips, larger skips more.
    ``warmup`` (mag; default 2): steps of each expert always run in full first. ``max_skip`` (mag; default 3): most steps reused in a row. ``ratios`` (mag):
    {"high": [...], "low": [...]}, each expert's residual-magnitude ratio per step of its
    own phase, as `calibrate_mag_ratios` returns them."""
    kind: str
    threshold: float | None = None
    warmup: int | None = None
    max_skip: int | None = None
    ratios: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        _check_kind(self.kind)
        given = {k for k, v in asdict(self).items() if v is not None and k != "kind"}
        for name in sorted(given - FIELDS[self.kind]):
            raise _bad(name, getattr(self, name), f"does not apply to kind {self.kind!r} "
                       f"(it takes {sorted(FIELDS[self.kind])})")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
                math.isfinite(t) and t >= 0):
            raise _bad("threshold", t, "must be a number >= 0 (0: never skip)")
        _check_int("warmup", self.warmup, 0)
        _check_int("max_skip", self.max_skip, 1)
        if self.kind == "mag":
            _check_ratios(self.ratios)

    @classmethod
    def from_dict(cls, options: dict) -> "StepCacheConfig":
        """A route's ``cache: {kind, threshold, ...}``; unknown keys are refused by name."""
        if not isinstance(options, dict):
            raise ValueError(f"cache {options!r}: must be a mapping like "
                             "{kind: first_block, threshold: 0.1}")
        kind = options.get("kind")
        _check_kind(kind)
        unknown = sorted(set(options) - {"kind", *FIELDS[kind]})
        if unknown:
            raise _bad(unknown[0], options[unknown[0]],
                       f"is not an option of kind {options['kind']!r}")
        return cls(**options)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _check_kind(kind) -> None:
    if isinstance(kind, str) and kind in NOT_OFFERED:
        raise _bad("kind", kind, f"is not offered: {NOT_OFFERED[kind]}; use one of "
                   f"{list(KINDS)}")
    if kind not in KINDS:
        raise _bad("kind", kind, f"must be one of {list(KINDS)}")


def _check_int(name: str, value, low: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(name, value, f"must be a whole number >= {low}")


def _check_ratios(ratios) -> None:
    if not isinstance(ratios, dict) or not ratios or set(ratios) - set(EXPERTS):
        raise _bad("ratios", ratios, "must map 'high' (and 'low' for two experts) to the "
                   "ratios calibrate_mag_ratios measured")
    for which, values in ratios.items():
        if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
            raise _bad(f"ratios.{which}", values, "must be a non-empty list of positive numbers")


# ---- applying it to a pipeline ---------------------------------------------------------------

def _diffusers_config(config: StepCacheConfig, which: str):
    if config.kind == "first_block":
        return FirstBlockCacheConfig(threshold=float(config.threshold))
    ratios = config.ratios[which]
    # num_inference_steps, mag_ratios and retention_ratio are set again per render, from the
    # steps this expert runs in it (`_Session.begin`).
    return MagCacheConfig(threshold=float(config.threshold), max_skip_steps=config.max_skip or 3,
                          num_inference_steps=len(ratios), mag_ratios=list(ratios))


def _warmup(config: StepCacheConfig) -> int:
    return 2 if config.warmup is None else config.warmup


def _ffn_linear(block) -> torch.nn.Module:
    """The first Linear of a block's feed-forward: it runs only when the block is computed
    (a skipped block never reaches it)."""
    return next(m for m in block.ffn.modules() if isinstance(m, torch.nn.Linear))


class _Session:
    """What `enable` leaves on a pipeline: the hooked experts, the replaced methods, and the
    counts of the render in progress (or the last one)."""

    def __init__(self, pipe, config: StepCacheConfig, experts: dict):
        self.config, self.experts = config, experts
        self.diffusers_configs = {}
        self.state = None  # the DenoiseState of the render in progress
        self.running = None  # the expert ("high"/"low") of the last pass
        self.passes: list[dict] = []  # one per transformer call of the last render
        self._blocks_run = 0
        self._handles = []
        for which, expert in experts.items():
            self.diffusers_configs[which] = _diffusers_config(config, which)
            expert.enable_cache(self.diffusers_configs[which])
            for block in expert.blocks:
                self._handles.append(_ffn_linear(block).register_forward_pre_hook(self._count))
        self.own = {name: vars(pipe)[name] for name in ("guide", "denoise_steps")
                    if name in vars(pipe)}  # instance attributes to restore on `disable`
        self.guide, self.denoise_steps = pipe.guide, pipe.denoise_steps

    def _count(self, module, args) -> None:
        self._blocks_run += 1

    def begin(self, pipe, state, stop_before: str | None) -> None:
        """A render (or this group's phase of one) starts: empty caches, zero counts, and
        MagCache told how many steps each expert runs in it."""
        self.state, self.passes, self.running = state, [], None
        for expert in self.experts.values():
            expert._reset_stateful_cache()
        if self.config.kind != "mag":
            return
        # The class's switch rule, not the instance's: an offload placement's ``expert_for``
        # copies the expert's weights in on every call (workers/parallel/placement.py).
        switch = type(pipe).expert_for
        ahead = [switch(pipe, float(t))[1] for t in state.scheduler.timesteps[state.step:]]
        for which, cfg in self.diffusers_configs.items():
            steps = ahead.count(which)
            if steps == 0 or which == stop_before:
                continue
            cfg.num_inference_steps = steps
            cfg.mag_ratios = nearest_interp(torch.tensor(self.config.ratios[which]), steps)
            cfg.retention_ratio = min(1.0, _warmup(self.config) / steps)

    def call(self, expert, name: str, args, kwargs):
        """One transformer pass inside its own cache context, counted."""
        which = next(w for w, e in self.experts.items() if e is expert)
        if self.running not in (None, which):
            # The high-noise expert is done for this render: its cached tensors go now
            # (on A14B at 720p, a few GB per expert), not at the next render's start.
            self.experts[self.running]._reset_stateful_cache()
        self.running = which
        step = self.state.step
        sigmas = self.state.scheduler.sigmas
        before = self._blocks_run
        with expert.cache_context(name, step_index=step, sigma=float(sigmas[step]),
                                  num_inference_steps=len(self.state.scheduler.timesteps)):
            out = expert(*args, **kwargs)
        self.passes.append({"step": step, "expert": which, "context": name,
                            "blocks": self._blocks_run - before,
                            "of": len(expert.blocks)})
        return out

    def close(self, pipe) -> None:
        for handle in self._handles:
            handle.remove()
        for expert in self.experts.values():
            expert.disable_cache()
        for name in ("guide", "denoise_steps"):
            if name in self.own:
                setattr(pipe, name, self.own[name])
            else:
                delattr(pipe, name)


class _InContext:
    """Stands for an expert inside a guide: each call runs in the "cond" or "uncond" cache
    context, told apart by which text embedding the guide passes (works for the plain guide
    and for a CFG-parallel one alike)."""

    def __init__(self, session: _Session, expert, cond, uncond):
        self.session, self.expert, self.cond, self.uncond = session, expert, cond, uncond

    def __call__(self, *args, **kwargs):
        text = kwargs.get("encoder_hidden_states")
        name = "uncond" if text is self.uncond and text is not self.cond else "cond"
        return self.session.call(self.expert, name, args, kwargs)

    def __getattr__(self, name):  # dtype, config, ... of the expert itself
        return getattr(self.expert, name)


def enable(pipe, config: StepCacheConfig | dict) -> None:
    """Cache steps on ``pipe`` (a loaded `WanT2V`, after any parallel plan replaced its
    guide): both experts hooked, each pass in its own context, caches emptied per render."""
    if isinstance(config, dict):
        config = StepCacheConfig.from_dict(config)
    if getattr(pipe, "_step_cache", None) is not None:
        raise ValueError(f"cache.kind {config.kind!r}: step caching is already enabled on this "
                         "pipeline (disable it first)")
    experts = {which: expert for which, expert in zip(EXPERTS, (pipe.transformer,
                                                               pipe.transformer_2))
               if expert is not None and hasattr(expert, "cache_context")}
    for which, expert in experts.items():
        if expert.is_cache_enabled:
            raise ValueError(f"cache.kind {config.kind!r}: the {which}-noise expert already "
                             f"has a cache ({type(expert._cache_config).__name__})")
        if getattr(expert, "sp_world", 1) > 1:
            # Each rank holds other tokens, so ranks would skip at different steps and the
            # skipped blocks' all-to-alls would not meet.
            raise ValueError(f"cache.kind {config.kind!r}: step caching cannot run with "
                             f"sequence parallelism ({which}-noise expert over "
                             f"{expert.sp_world} ranks)")
        if config.kind == "mag" and which not in config.ratios:
            raise _bad("ratios", config.ratios, f"has no ratios for the {which}-noise expert")
    session = _Session(pipe, config, experts)

    def guide(expert, x, timestep, cond, uncond, guidance):
        if expert not in experts.values():
            return session.guide(expert, x, timestep, cond, uncond, guidance)
        return session.guide(_InContext(session, expert, cond, uncond), x, timestep, cond,
                             uncond, guidance)

    def denoise_steps(req, state=None, stop_before=None):
        state = state or pipe.start(req)
        session.begin(pipe, state, stop_before)
        yield from session.denoise_steps(req, state, stop_before)

    pipe.guide, pipe.denoise_steps = guide, denoise_steps
    pipe._step_cache = session


def disable(pipe) -> None:
    """Remove the hooks and restore ``guide`` and ``denoise_steps``; a no-op if not enabled."""
    session = getattr(pipe, "_step_cache", None)
    if session is not None:
        session.close(pipe)
        pipe._step_cache = None


def last_render_counts(pipe) -> dict:
    """The last (or current) render's transformer passes: how many ran every block in full,
    and blocks computed against blocks a full render would compute; ``per_pass`` lists each
    pass (step, expert, context, blocks run of how many)."""
    session = getattr(pipe, "_step_cache", None)
    if session is None:
        raise ValueError("step caching is not enabled on this pipeline")
    passes = session.passes
    return {"passes": len(passes),
            "full_passes": sum(p["blocks"] == p["of"] for p in passes),
            "blocks_run": sum(p["blocks"] for p in passes),
            "blocks_total": sum(p["of"] for p in passes),
            "per_pass": [dict(p) for p in passes]}


@torch.no_grad()
def calibrate_mag_ratios(pipe, req) -> dict[str, list[float]]:
    """MagCache's ratios for ``pipe``'s checkpoint, from one uncached render of ``req``.

    For each expert, the residual of its block stack (last block's output minus first
    block's input, (batch, tokens, dim)) at each of its steps; the ratio at step k is the
    mean over tokens of |residual_k| / |residual_(k-1)| (1.0 at the expert's first step),
    averaged over the conditional and unconditional passes. Other step counts resample the
    lists (nearest step). Needs the plain guide (no CFG-parallel plan, no cache enabled):
    its passes come cond first, then uncond, in every step.
    """
    if getattr(pipe, "_step_cache", None) is not None or "guide" in vars(pipe):
        raise ValueError("calibrate_mag_ratios needs a pipeline without step caching or a "
                         "CFG-parallel guide")
    residuals = {}  # which -> residual of each pass, in call order
    handles = []
    for which, expert in zip(EXPERTS, (pipe.transformer, pipe.transformer_2)):
        if expert is None or not hasattr(expert, "blocks"):
            continue
        seen, inputs = residuals.setdefault(which, []), []
        handles.append(expert.blocks[0].register_forward_pre_hook(
            lambda module, args, inputs=inputs: inputs.append(args[0])))
        handles.append(expert.blocks[-1].register_forward_hook(
            lambda module, args, out, seen=seen, inputs=inputs:
                seen.append((out - inputs.pop()).float())))
    try:
        pipe.denoise(req)
    finally:
        for handle in handles:
            handle.remove()
    ratios = {}
    for which, seen in residuals.items():
        if not seen:
            continue
        guidance = req.guidance_high if which == "high" else req.guidance_low
        passes = 2 if guidance > 1.0 else 1
        per_context = [seen[i::passes] for i in range(passes)]
        steps = len(per_context[0])
        ratios[which] = [1.0] + [
            round(sum(float((torch.linalg.norm(ctx[k], dim=-1)
                             / (torch.linalg.norm(ctx[k - 1], dim=-1) + 1e-8)).mean())
                      for ctx in per_context) / passes, 5)
            for k in range(1, steps)]
    return ratios
