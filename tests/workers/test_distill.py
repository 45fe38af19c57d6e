"""--distill-steps (issue #12, item 3): a few-step student of the shipped toy model.

The trainings here are seconds long (a handful of teacher renders, a few steps); whether the
4-step student keeps the base's accuracy is measured by benchmarks/lightening.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from workers.lightening.distill import CHECKPOINT, DistillSteps, student_scheduler, teacher_grid
from workers.lightening.ops import DeriveContext, DeriveError
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import RenderRequest, WanT2V

BASE = BUNDLED_DIR / "wan-toy"
EXPERTS = ("transformer", "transformer_2")
# Seconds, not minutes: 8 + 4 teacher renders, 8 steps of 4 samples per expert.
SHORT = dict(steps=4, trajectories=8, validation=4, train_steps=8, batch=4, checkpoint_every=4)


class Interrupted(Exception):
    pass


class StopAtFirstCheckpoint(DeriveContext):
    """A run killed right after its first checkpoint (the note that reports it)."""

    def note(self, message: str) -> None:
        super().note(message)
        if "distill step" in message:
            raise Interrupted(message)


def _context(tmp_path, name, resume=False, cls=DeriveContext) -> DeriveContext:
    work = tmp_path / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(BASE, work)
    scratch = tmp_path / f"{name}.scratch"
    scratch.mkdir(exist_ok=True)
    return cls(base=BASE, work=work, seed=7, resume=resume, scratch=scratch)


def _weights(folder) -> dict:
    return {name: load_file(folder / name / "diffusion_pytorch_model.safetensors")
            for name in EXPERTS}


@pytest.mark.parametrize("steps", [0, -2, 21, 2.5])
def test_bad_step_counts_name_the_option_and_value(steps):
    with pytest.raises(DeriveError) as err:
        DistillSteps(steps=steps)
    assert "--distill-steps" in str(err.value) and repr(steps) in str(err.value)


def test_bad_training_settings_name_the_setting():
    with pytest.raises(DeriveError, match="batch.*got 0"):
        DistillSteps(batch=0)
    with pytest.raises(DeriveError, match="lr must be positive, got -0.1"):
        DistillSteps(lr=-0.1)
    with pytest.raises(DeriveError, match=r"guidance.*got \(4.0, 3.0, 2.0\)"):
        DistillSteps(guidance=(4.0, 3.0, 2.0))
    assert DistillSteps(guidance=3).guidance == (3.0, 3.0)


def test_student_sampler_is_euler_on_a_subset_of_the_teacher_grid():
    base = WanT2V.from_folder(BASE).scheduler
    student = student_scheduler(base)
    student.set_timesteps(4)
    sigmas = student.sigmas
    assert teacher_grid(base, sigmas, 4, 20) == (20, [0, 5, 10, 15, 20])
    # Three steps do not divide 20: the teacher runs 21, and holds all three levels.
    three = student_scheduler(base)
    three.set_timesteps(3)
    assert teacher_grid(base, three.sigmas, 3, 20) == (21, [0, 7, 14, 21])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 5, 8, 8, generator=gen)
    for k, t in enumerate(student.timesteps):
        v = torch.randn(x.shape, generator=gen)
        stepped = student.step(v, t, x, return_dict=False)[0]
        euler = x + (sigmas[k + 1] - sigmas[k]) * v
        assert torch.allclose(stepped, euler, atol=1e-5), k
        x = stepped


def test_short_training_writes_a_loadable_four_step_student(tmp_path):
    ctx = _context(tmp_path, "student")
    entry = DistillSteps(**SHORT).apply(ctx)

    assert entry["render"] == {"steps": 4, "guidance": 1.0}
    assert entry["student"]["experts"] == ["high", "high", "low", "low"]
    assert entry["teacher"]["levels_kept"] == [0, 5, 10, 15, 20]
    assert "softmax" in entry["notes"] and entry["why"]
    # Measured over whole trajectories, not batches: each expert's velocity error at the
    # teacher's states, and how far its 4-step render lands from the teacher's 20-step one.
    # (Eight steps fit the trained renders; the held-back ones need the full run.)
    before, after = entry["losses"]["trained_before"], entry["losses"]["trained_after"]
    for key in ("high", "low", "final_latent_mse"):
        assert after[key] < before[key], (key, before, after)

    base, student = _weights(BASE), _weights(ctx.work)
    for name in EXPERTS:  # both experts trained, same architecture
        assert base[name].keys() == student[name].keys()
        assert any(not torch.equal(base[name][k], student[name][k]) for k in base[name])

    pipe = WanT2V.from_folder(ctx.work)
    assert pipe.scheduler.config.solver_order == 1
    req = RenderRequest("a red circle moving left", "", 17, 32, 32, 4, 1.0, 1.0, 5)
    calls = []
    latents = pipe.denoise(req, on_step=lambda i, n, which: calls.append(which))
    assert calls == ["high", "high", "low", "low"] and torch.isfinite(latents).all()
    # diffusers' own pipeline loads the folder and renders the same latents.
    diffusers_pipe = WanPipeline.from_pretrained(ctx.work)
    same = diffusers_pipe(prompt=req.prompt, negative_prompt="", height=32, width=32,
                          num_frames=17, num_inference_steps=4, guidance_scale=1.0,
                          guidance_scale_2=1.0, output_type="latent", max_sequence_length=32,
                          generator=torch.Generator().manual_seed(5)).frames
    assert torch.allclose(same, latents, atol=1e-5)


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, caplog):
    whole = _context(tmp_path, "whole")
    DistillSteps(**SHORT).apply(whole)

    cut = _context(tmp_path, "cut", cls=StopAtFirstCheckpoint)
    with pytest.raises(Interrupted, match="step 4/8"):
        DistillSteps(**SHORT).apply(cut)
    assert (cut.scratch / CHECKPOINT).is_file()
    # A fresh copy of the base, as `farm models derive --resume` makes; training continues.
    resumed = _context(tmp_path, "cut", resume=True)
    with caplog.at_level("INFO", logger="workers.lightening.ops"):
        DistillSteps(**SHORT).apply(resumed)
    assert "resumes at step 4 of 8" in caplog.text

    a, b = _weights(whole.work), _weights(resumed.work)
    for name in EXPERTS:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)

    other = _context(tmp_path, "cut", resume=True)
    with pytest.raises(DeriveError, match="--resume"):
        DistillSteps(**{**SHORT, "lr": 5e-4}).apply(other)
