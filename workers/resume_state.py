"""A render's denoising state as bytes, to resume it later on any group (issue #15, item 1).

A preempted segment's state is stored (farm/tasks/preemption.py) and a group of the same
variant continues it from the same step; the resumed video must be byte-identical to an
uninterrupted render, so everything the sampler carries between two steps is kept exactly:
the latents, the continued segment's condition and its noise, the step index, and every
attribute of the multistep solver (UniPC: ``model_outputs``, ``timestep_list``,
``lower_order_nums``, ``last_sample``, ``_step_index``, ``sigmas``, ``timesteps``, ...;
FlowMatch Euler: ``_step_index``, ``sigmas``, ...).

Format: one safetensors blob (no pickle: a state read back from storage runs no code). The
tensors are named ``latents``, ``condition``, ``condition_noise`` and ``scheduler/<attr>``
(``scheduler/<attr>/<i>`` for a list's tensors); the rest is JSON in the safetensors header's
metadata under ``farm.resume_state``: the format version, the step, the solver's class and
config (a state is refused by a pipeline whose solver differs), its plain attributes, and the
caller's ``info`` (steps, the expert that ran the last step, the one that runs the next).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from workers.wan_pipeline import DenoiseState

FORMAT = 1
META_KEY = "farm.resume_state"
SCALARS = (bool, int, float, str, type(None))
NOT_SAVED = ("_internal_dict",)  # the solver's config: rebuilt from the pipeline's


class ResumeStateError(ValueError):
    """The bytes are not a resume state this pipeline can continue; the message says why."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(state: DenoiseState, **info) -> bytes:
    """The state (its tensors copied to the CPU) as bytes; ``info``: JSON values kept beside
    it (`describe` reads them without loading a tensor)."""
    tensors = {"latents": state.latents}
    if state.condition is not None:
        tensors["condition"] = state.condition
        tensors["condition_noise"] = state.condition_noise
    solver = {}
    for name, value in vars(state.scheduler).items():
        if name not in NOT_SAVED:
            solver[name] = _encode(f"scheduler/{name}", value, tensors)
    header = {"format": FORMAT, "step": state.step, "info": info,
              "scheduler_class": type(state.scheduler).__name__,
              "scheduler_config": _plain_config(state.scheduler), "scheduler": solver}
    # Copies: the solver's history holds views of its own timesteps (safetensors refuses
    # tensors that share memory); values are what resuming needs, not the aliasing.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return save_tensors(tensors, metadata={META_KEY: json.dumps(header)})


def _encode(name: str, value, tensors: dict):
    """A solver attribute as JSON; its tensors go into ``tensors`` under ``name``."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        # Where it lived: UniPC keeps ``sigmas`` on the CPU and ``timesteps`` on the device,
        # and a step's float math must run where it ran uninterrupted (CPU and GPU kernels
        # may round differently).
        return {"tensor": name, "on_device": value.device.type != "cpu"}
    if isinstance(value, SCALARS):
        return {"value": value}
    if isinstance(value, list):
        return {"list": [_encode(f"{name}/{i}", v, tensors) for i, v in enumerate(value)]}
    raise ResumeStateError(f"solver attribute {name!r} is a {type(value).__name__}: a resume "
                           "state holds tensors, numbers, strings and lists of them only")


def _decode(encoded: dict, tensors: dict, name: str, device):
    if "tensor" in encoded:
        if encoded["tensor"] not in tensors:
            raise ResumeStateError(f"resume state lacks tensor {encoded['tensor']!r}")
        tensor = tensors[encoded["tensor"]]
        return tensor.to(device) if encoded.get("on_device") else tensor
    if "value" in encoded:
        return encoded["value"]
    if "list" in encoded:
        return [_decode(e, tensors, f"{name}/{i}", device) for i, e in enumerate(encoded["list"])]
    raise ResumeStateError(f"resume state: solver attribute {name!r} is not encoded: {encoded!r}")


def _plain_config(scheduler) -> dict:
    """The solver's config as JSON reads it back (tuples as lists)."""
    return json.loads(json.dumps(dict(scheduler.config)))


def describe(data: bytes) -> dict:
    """The header (format, step, info, solver class and config) without loading a tensor:
    what the driver reads to route a resume (workers/split_group.py) and to check a stored
    state before using it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ResumeStateError(f"resume state must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise ResumeStateError(f"resume state is {len(data)} bytes: too short for safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ResumeStateError(f"resume state header claims {size} bytes, the data has "
                               f"{len(data) - 8}: truncated or not safetensors")
    try:
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        header = json.loads(meta[META_KEY])
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ResumeStateError(f"resume state has no readable {META_KEY!r} header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ResumeStateError(f"resume state format {got!r}, this farm reads {FORMAT}")
    return header


def load(data: bytes, scheduler, sha256: str | None = None,
         device: str | torch.device = "cpu") -> DenoiseState:
    """The state ``save`` wrote, with a fresh solver of ``scheduler``'s class and config (the
    pipeline's) holding exactly the saved attributes. ``sha256``: the digest stored beside
    it, checked first. ``device``: the latents' and condition's, and the solver tensors'
    that were on a device when saved (those saved from the CPU stay there)."""
    if sha256 is not None and sha256_of(bytes(data)) != sha256:
        raise ResumeStateError(f"resume state sha256 {sha256_of(bytes(data))} is not the "
                               f"stored {sha256}: the state is corrupt")
    header = describe(data)
    if header["scheduler_class"] != type(scheduler).__name__:
        raise ResumeStateError(f"resume state was saved by a {header['scheduler_class']}, this "
                               f"pipeline's solver is a {type(scheduler).__name__}")
    if header["scheduler_config"] != _plain_config(scheduler):
        diff = sorted(k for k in set(header["scheduler_config"]) | set(scheduler.config)
                      if header["scheduler_config"].get(k) != _plain_config(scheduler).get(k))
        raise ResumeStateError(f"resume state's solver config differs from this pipeline's "
                               f"in {diff}")
    try:
        tensors = load_tensors(bytes(data))
    except SafetensorError as exc:
        raise ResumeStateError(f"resume state tensors unreadable: {exc}") from None
    if "latents" not in tensors:
        raise ResumeStateError("resume state lacks tensor 'latents'")
    solver = _rebuilt_solver(scheduler, header["scheduler"], tensors, device)
    step = header["step"]
    if not isinstance(step, int) or not 0 <= step <= len(solver.timesteps):
        raise ResumeStateError(f"resume state step {step!r} is outside the solver's "
                               f"{len(solver.timesteps)} steps")
    condition = [tensors.get(k) for k in ("condition", "condition_noise")]
    return DenoiseState(tensors["latents"].to(device), solver, step,
                        *(c.to(device) if c is not None else None for c in condition))


def check_fits(state: DenoiseState, steps: int, latent_shape: tuple[int, ...]) -> None:
    """The state belongs to a render of this many steps and this latent shape (a state
    resumed into another request would run without an error and make another video)."""
    if len(state.scheduler.timesteps) != steps:
        raise ResumeStateError(f"resume state has {len(state.scheduler.timesteps)} steps, the "
                               f"request {steps}")
    if tuple(state.latents.shape) != tuple(latent_shape):
        raise ResumeStateError(f"resume state latents {tuple(state.latents.shape)}, the request "
                               f"needs {tuple(latent_shape)}")


def _rebuilt_solver(template, saved: dict, tensors: dict, device):
    """A solver of ``template``'s class and config, its attributes set to the saved ones
    (also those a solver sets while stepping, such as UniPC's ``this_order``). Every
    attribute a fresh solver has must have been saved: one of a diffusers version with
    other solver state cannot continue this one."""
    solver = type(template).from_config(template.config)
    steps = saved.get("num_inference_steps", {}).get("value")
    if not isinstance(steps, int) or steps < 1:
        raise ResumeStateError(f"resume state: num_inference_steps {steps!r} is not a step count")
    solver.set_timesteps(steps, device="cpu")
    missing = set(vars(solver)) - set(NOT_SAVED) - set(saved)
    if missing:
        raise ResumeStateError(f"resume state lacks solver attributes {sorted(missing)} of this "
                               f"diffusers' {type(solver).__name__}")
    for name, encoded in saved.items():
        setattr(solver, name, _decode(encoded, tensors, name, device))
    return solver
