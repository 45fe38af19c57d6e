"""A preempted render's state saved to bytes and continued later (issue #15, item 1): the
result must equal an uninterrupted render bit for bit, for every stop step, across the
expert boundary, for the solvers the farm's models use; bad bytes are refused clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from workers import resume_state
from workers.resume_state import ResumeStateError
from workers.wan_pipeline import RenderRequest, WanT2V

TOY_SCHEDULER = Path(__file__).parents[2] / "workers/toy/checkpoints/wan-toy/scheduler"
STEPS = 8


@pytest.fixture(scope="module")
def pipe(tiny_model, one_thread):
    return WanT2V.from_folder(tiny_model)


def request(**overrides) -> RenderRequest:
    base = dict(prompt="a red circle moving left", negative_prompt="blurry", frames=5,
                height=32, width=48, steps=STEPS, guidance_high=4.0, guidance_low=3.0, seed=7)
    return RenderRequest(**(base | overrides))


def with_solver(pipe: WanT2V, scheduler) -> WanT2V:
    """The same model with another solver (the pipeline object only: weights are shared)."""
    other = copy.copy(pipe)
    other.scheduler = scheduler
    return other


def straight(pipe: WanT2V, req: RenderRequest) -> torch.Tensor:
    return pipe.denoise(req)


def stopped_and_resumed(pipe: WanT2V, req: RenderRequest, k: int) -> tuple[torch.Tensor, bytes]:
    """k steps, the state to bytes and back (a fresh solver), then the rest."""
    state = pipe.start(req)
    steps = pipe.denoise_steps(req, state)
    for _ in range(k):
        next(steps)
    steps.close()
    data = resume_state.save(state, steps=req.steps)
    del state
    resumed = resume_state.load(data, pipe.scheduler, resume_state.sha256_of(data))
    assert resumed.step == k
    latents = None
    for _, _, _, latents in pipe.denoise_steps(req, resumed):
        pass
    return latents, data


def boundary_step(pipe: WanT2V, steps: int) -> int:
    """Steps done when the low-noise expert takes over."""
    solver = type(pipe.scheduler).from_config(pipe.scheduler.config)
    solver.set_timesteps(steps)
    return next(i for i, t in enumerate(solver.timesteps) if pipe.expert_for(float(t))[1] == "low")


def test_the_tiny_model_switches_experts_mid_render(pipe):
    assert 1 < boundary_step(pipe, STEPS) < STEPS - 1


@pytest.mark.parametrize("k", range(1, STEPS))
def test_resume_at_every_step_is_bit_identical(pipe, k):
    req = request()
    expected = straight(pipe, req)
    got, _ = stopped_and_resumed(pipe, req, k)
    assert torch.equal(got, expected), f"resumed after step {k} differs"


def test_resume_after_the_last_step_is_the_result(pipe):
    req = request()
    got, data = stopped_and_resumed(pipe, req, STEPS)
    assert got is None  # nothing left to run: the saved latents are the result
    state = resume_state.load(data, pipe.scheduler)
    assert torch.equal(state.latents, straight(pipe, req))


def test_solver_history_is_restored_exactly(pipe):
    req = request()
    state = pipe.start(req)
    for _ in zip(range(3), pipe.denoise_steps(req, state)):
        pass
    back = resume_state.load(resume_state.save(state), pipe.scheduler)
    assert back.scheduler is not state.scheduler
    for name, value in vars(state.scheduler).items():
        restored = getattr(back.scheduler, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored, value) and restored.dtype == value.dtype, name
        elif isinstance(value, list):
            assert len(restored) == len(value), name
            for a, b in zip(restored, value):
                assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), name
        elif name != "_internal_dict":
            assert restored == value and type(restored) is type(value), name
    assert back.scheduler.lower_order_nums == 2 and back.scheduler.step_index == 3


@pytest.mark.parametrize("solver", ["toy", "flowmatch-euler"])
def test_resume_across_the_boundary_with_other_solvers(pipe, solver):
    """The toy's own UniPC config (the wan-toy variants' and A14B's class) and diffusers'
    FlowMatch Euler (the other solver class Wan checkpoints ship with)."""
    scheduler = (UniPCMultistepScheduler.from_pretrained(TOY_SCHEDULER) if solver == "toy"
                 else FlowMatchEulerDiscreteScheduler(shift=3.0))
    other = with_solver(pipe, scheduler)
    req = request(seed=3)
    expected = straight(other, req)
    boundary = boundary_step(other, STEPS)
    for k in (boundary - 1, boundary, boundary + 1):
        got, _ = stopped_and_resumed(other, req, k)
        assert torch.equal(got, expected), f"{solver}: resumed after step {k} differs"


def test_continued_segment_keeps_its_held_first_frame(pipe):
    frame = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    req = request(first_frame=frame, seed=5)
    expected = straight(pipe, req)
    for k in (2, boundary_step(pipe, STEPS) + 1):
        got, data = stopped_and_resumed(pipe, req, k)
        assert torch.equal(got, expected)
        back = resume_state.load(data, pipe.scheduler)
        assert back.condition is not None and back.condition_noise is not None


def test_describe_reads_the_header_alone(pipe):
    req = request()
    state = pipe.start(req)
    for _ in zip(range(2), pipe.denoise_steps(req, state)):
        pass
    data = resume_state.save(state, steps=STEPS, expert="high", next_expert="high")
    header = resume_state.describe(data)
    assert header["step"] == 2 and header["format"] == resume_state.FORMAT
    assert header["info"] == {"steps": STEPS, "expert": "high", "next_expert": "high"}
    assert header["scheduler_class"] == "UniPCMultistepScheduler"
    assert b"__reduce__" not in data and data[8:9] == b"{"  # safetensors: a JSON header first


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(pipe) -> bytes:
    req = request()
    state = pipe.start(req)
    for _ in zip(range(2), pipe.denoise_steps(req, state)):
        pass
    return resume_state.save(state, steps=STEPS)


@pytest.mark.parametrize("bad, why", [
    (b"", "too short"),
    (b"\xff" * 64, "truncated or not safetensors"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "no readable"),
    ("not bytes", "must be bytes"),
])
def test_garbage_is_refused(pipe, bad, why):
    with pytest.raises(ResumeStateError, match=why):
        resume_state.load(bad, pipe.scheduler)


def test_truncated_state_is_refused(pipe, saved):
    with pytest.raises(ResumeStateError, match="tensors unreadable"):
        resume_state.load(saved[:-100], pipe.scheduler)


def test_a_flipped_byte_fails_the_sha256(pipe, saved):
    digest = resume_state.sha256_of(saved)
    broken = bytearray(saved)
    broken[-5] ^= 0xFF
    with pytest.raises(ResumeStateError, match="sha256 .* is not the stored"):
        resume_state.load(bytes(broken), pipe.scheduler, digest)
    assert resume_state.load(saved, pipe.scheduler, digest).step == 2


def test_another_solver_config_is_refused(pipe, saved):
    other = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    with pytest.raises(ResumeStateError, match=r"config differs .*\['flow_shift'\]"):
        resume_state.load(saved, other)
    with pytest.raises(ResumeStateError, match="saved by a UniPCMultistepScheduler"):
        resume_state.load(saved, FlowMatchEulerDiscreteScheduler())


def test_an_attribute_it_cannot_save_is_named(pipe):
    state = pipe.start(request())
    state.scheduler.odd = object()
    with pytest.raises(ResumeStateError, match="solver attribute 'scheduler/odd' is a object"):
        resume_state.save(state)


def test_a_solver_of_another_diffusers_version_is_refused(pipe):
    state = pipe.start(request())
    del state.scheduler.lower_order_nums  # as a solver without that attribute would save it
    with pytest.raises(ResumeStateError, match=r"lacks solver attributes \['lower_order_nums'\]"):
        resume_state.load(resume_state.save(state), pipe.scheduler)


def test_a_state_of_another_request_is_refused(pipe, saved):
    state = resume_state.load(saved, pipe.scheduler)
    resume_state.check_fits(state, STEPS, pipe.latent_shape(request()))
    with pytest.raises(ResumeStateError, match=f"has {STEPS} steps, the request 12"):
        resume_state.check_fits(state, 12, pipe.latent_shape(request()))
    with pytest.raises(ResumeStateError, match=r"latents \(1, 16, 2, 4, 6\), the request needs"):
        resume_state.check_fits(state, STEPS, pipe.latent_shape(request(frames=9)))
