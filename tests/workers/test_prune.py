"""Structured pruning and shallower students on the shipped toy model (issue #12, items 2, 4).

Each derive here trains a few steps on a handful of the base's own renders (seconds), so
the tests check the mechanics (shapes, loading, rendering, scores, resuming, errors); the
quality after a full recovery is measured by benchmarks/lightening.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.prune import (
    ORIGIN_FILE, DropBlocks, PruneFfn, PruneHeads, StudentLayers, block_scores, keep_blocks,
    slice_ffn,
)
from workers.lightening.recovery import (
    ExpertInputs, RecoverySettings, distil_loss, measure_loss, teacher_inputs, train,
)
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import RenderRequest, WanT2V

BASE = BUNDLED_DIR / "wan-toy"
# A handful of short base renders: enough to exercise every path in seconds.
QUICK = RecoverySettings(captions=4, sampler_steps=6, batch=2, calibration=4,
                         checkpoint_every=2)
RENDER = RenderRequest("a red circle moving right on a black background", "", 5, 32, 32, 4,
                       4.0, 4.0, 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/workers/conftest.py


@pytest.fixture(scope="module")
def base(one_thread) -> WanT2V:
    return WanT2V.from_folder(BASE)


@pytest.fixture(scope="module")
def inputs(base):
    """Calibration inputs of each expert from the base's own renders (8 captions)."""
    traj = teacher_inputs(base, [], 0, RecoverySettings(captions=8, sampler_steps=8))
    return {w: ExpertInputs(traj, w, base.boundary_ratio) for w in ("high", "low")}


def derive_with(op, tmp_path: Path, resume: bool = False, ctx_cls=DeriveContext) -> tuple:
    """As workers/lightening/derive.py runs an operation: on a fresh copy of the base."""
    work = tmp_path / "variant"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(BASE, work)
    ctx = ctx_cls(base=BASE, work=work, seed=3, resume=resume, scratch=tmp_path / "scratch")
    return work, op.apply(ctx)


def renders(folder: Path) -> WanT2V:
    pipe = WanT2V.from_folder(folder)
    frames = next(pipe.decode_chunks(pipe.denoise(RENDER)))
    assert frames.dtype.name == "uint8" and frames.shape[1:] == (32, 32, 3)
    assert frames.std() > 0  # a picture, not a constant
    return pipe


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_ffn_slice_keeping_every_channel_is_the_base_exactly(base, inputs):
    x, t, text = inputs["low"].batch(3, 0.5, torch.Generator().manual_seed(0))
    expert = base.transformer_2
    same = slice_ffn(expert, [torch.arange(expert.config.ffn_dim)] * len(expert.blocks))
    want = expert(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    got = same(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(got, want)
    fewer = slice_ffn(expert, [torch.arange(0, expert.config.ffn_dim, 2)] * len(expert.blocks))
    assert fewer.config.ffn_dim == expert.config.ffn_dim // 2
    assert not torch.equal(fewer(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                 return_dict=False)[0], want)


def test_ffn_steps_round_to_whole_tiles():
    assert PruneFfn(0.45, step=0.15).channel_plan(256) == [216, 176, 144]
    assert PruneFfn(0.3).channel_plan(256)[-1] == 176  # 179.2 -> a multiple of 8
    assert PruneFfn(0.3, step=0.3, multiple=1).channel_plan(256) == [179]
    with pytest.raises(DeriveError, match="--prune-ffn 0.01: removes no FFN channel"):
        PruneFfn(0.01).channel_plan(256)


def test_block_importance_predicts_the_damage_on_other_inputs(base, inputs):
    """Scores measured on one batch rank the blocks for another: skipping the least
    important block changes the output on fresh inputs less than skipping the most."""
    for which, expert in (("high", base.transformer), ("low", base.transformer_2)):
        calib = inputs[which].batch(8, 0.5, torch.Generator().manual_seed(1))
        fresh = inputs[which].batch(8, 0.5, torch.Generator().manual_seed(2))
        scores = block_scores(expert, calib)
        assert len(scores) == expert.config.num_layers and min(scores) > 0
        weakest, strongest = scores.index(min(scores)), scores.index(max(scores))
        x, t, text = fresh
        full = expert(hidden_states=x, timestep=t, encoder_hidden_states=text,
                      return_dict=False)[0]

        def damage(block):
            kept = keep_blocks(expert, [b for b in range(len(scores)) if b != block])
            out = kept(hidden_states=x, timestep=t, encoder_hidden_states=text,
                       return_dict=False)[0]
            return ((out - full).pow(2).sum() / full.pow(2).sum()).item()

        assert damage(weakest) < damage(strongest)


def test_a_short_recovery_reduces_the_distillation_loss(base, inputs):
    teacher = base.transformer_2
    student = slice_ffn(teacher, [torch.arange(0, 256, 2)] * 4)  # half the channels, unranked
    settings = RecoverySettings(batch=8, lr=5e-4)
    held = inputs["low"].batch(8, 0.5, torch.Generator().manual_seed(5))  # not trained on
    origin = [0, 1, 2, 3]
    before = measure_loss(student, teacher, origin, held, settings)
    train(student, teacher, origin, inputs["low"], 30, settings,
          torch.Generator().manual_seed(6), curve=[])
    after = measure_loss(student, teacher, origin, held, settings)
    assert after["total"] < 0.8 * before["total"], (before, after)
    assert after["output"] < before["output"]
    loss, _ = distil_loss(teacher, teacher, origin, *held, 4.0, 1.0)
    assert loss.item() == 0.0  # the base against itself


def test_prune_ffn_writes_a_smaller_folder_that_loads_and_renders(tmp_path):
    op = PruneFfn(0.25, step=0.125, stage_steps=2, final_steps=3, recovery=QUICK)
    work, entry = derive_with(op, tmp_path)
    pipe = renders(work)
    base = WanT2V.from_folder(BASE)
    for which, expert, before in (("high", pipe.transformer, base.transformer),
                                  ("low", pipe.transformer_2, base.transformer_2)):
        assert expert.config.ffn_dim == 192 and expert.config.num_layers == 4
        assert param_count(expert) == param_count(before) - 4 * 64 * (2 * 128 + 1)
        record = entry["experts"][which]
        assert [s["ffn_dim"] for s in record["stages"]] == [[256, 224], [224, 192]]
        assert all(len(kept) == 192 for kept in record["stages"][1]["channels_kept"])
        assert len(record["stages"][0]["channel_scores"][0]) == 256
        assert record["stages"][-1]["steps"] == 3 and record["stages"][-1]["seconds"] >= 0
    saved = json.loads((work / "transformer" / "config.json").read_text())
    assert saved["ffn_dim"] == 192
    assert (work / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size < \
        (BASE / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert entry["settings"]["ratio"] == 0.25 and entry["recovery"]["captions"] == 4


def test_drop_blocks_removes_the_least_important_block(tmp_path):
    work, entry = derive_with(DropBlocks(1, final_steps=2, recovery=QUICK), tmp_path)
    pipe = renders(work)
    for which, expert in (("high", pipe.transformer), ("low", pipe.transformer_2)):
        assert expert.config.num_layers == 3 and expert.config.ffn_dim == 256
        stage = entry["experts"][which]["stages"][0]
        scores = stage["block_scores"]
        assert len(scores) == 4 and stage["dropped"] == min(scores, key=scores.get)
        kept = entry["experts"][which]["blocks_from_base"]
        assert len(kept) == 3 and f"base block {set(range(4)).difference(kept).pop()}" == \
            stage["dropped"]
        name = "transformer" if which == "high" else "transformer_2"
        assert json.loads((work / name / ORIGIN_FILE).read_text())["blocks"] == kept
        assert WanTransformer3DModel.from_pretrained(work / name).config.num_layers == 3


def test_student_layers_starts_from_evenly_spaced_blocks(tmp_path):
    work, entry = derive_with(StudentLayers(2, init="even", steps=2, experts="low",
                                            recovery=QUICK), tmp_path)
    pipe = renders(work)
    assert pipe.transformer_2.config.num_layers == 2
    assert pipe.transformer.config.num_layers == 4  # experts="low": the high one untouched
    assert entry["experts"]["low"]["blocks_from_base"] == [0, 3]
    assert list(entry["experts"]) == ["low"]


class Stopped(Exception):
    pass


class StopInLastStage(DeriveContext):
    """A run stopped once its last stage has trained (its last checkpoint: mid-stage)."""

    def note(self, message: str) -> None:
        if "stage 2/2" in message:
            raise Stopped(message)


def test_a_stopped_prune_resumes_to_the_same_weights(tmp_path):
    def op():
        return PruneFfn(0.25, step=0.125, stage_steps=2, final_steps=4, experts="high",
                        recovery=QUICK)

    whole, _ = derive_with(op(), tmp_path / "whole")
    with pytest.raises(Stopped):
        derive_with(op(), tmp_path / "stopped", ctx_cls=StopInLastStage)
    saved = torch.load(tmp_path / "stopped" / "scratch" / "high.pt", weights_only=False)
    assert (saved["stage"], saved["step"]) == (1, 2)  # final stage, checkpoint_every=2
    notes = []

    class Recording(DeriveContext):
        def note(self, message: str) -> None:
            notes.append(message)

    resumed, entry = derive_with(op(), tmp_path / "stopped", resume=True, ctx_cls=Recording)
    # It continued inside the last stage (the seeded run from scratch would end the same).
    assert any(n.endswith("resuming stage 2/2 at step 2") for n in notes), notes
    assert not any("stage 1/2:" in n for n in notes), notes
    a = WanTransformer3DModel.from_pretrained(whole / "transformer").state_dict()
    b = WanTransformer3DModel.from_pretrained(resumed / "transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(entry["experts"]["high"]["stages"]) == 2


@pytest.mark.parametrize("make, option", [
    (lambda: PruneFfn(0), "--prune-ffn 0"), (lambda: PruneFfn(1), "--prune-ffn 1"),
    (lambda: PruneFfn(1.5), "--prune-ffn 1.5"), (lambda: PruneFfn(-0.1), "--prune-ffn -0.1"),
    (lambda: DropBlocks(0), "--drop-blocks 0"), (lambda: StudentLayers(0), "--student-layers 0"),
    (lambda: PruneHeads(0.25), "--prune-heads 0.25"), (lambda: PruneHeads(2), "--prune-heads 2"),
    (lambda: PruneFfn(0.3, experts="middle"), "experts='middle'"),
    (lambda: DropBlocks("high=0"), "--drop-blocks 'high=0'"),
    (lambda: DropBlocks("mid=1"), "--drop-blocks 'mid=1'"),
    (lambda: DropBlocks("high=x"), "--drop-blocks 'high=x'"),
    (lambda: DropBlocks("-1"), "--drop-blocks '-1'"),
])
def test_bad_values_name_the_option_and_value(make, option):
    with pytest.raises(DeriveError) as caught:
        make()
    assert option in str(caught.value)


def test_prune_heads_says_why():
    with pytest.raises(DeriveError, match="width of the whole model"):
        PruneHeads(0.25)


@pytest.mark.parametrize("op, option", [(DropBlocks(4), "--drop-blocks 4"),
                                        (DropBlocks("high=1,low=5"), "--drop-blocks high=1,low=5"),
                                        (StudentLayers(4), "--student-layers 4"),
                                        (StudentLayers(7), "--student-layers 7")])
def test_as_many_blocks_as_the_expert_has_is_refused_before_training(op, option, tmp_path):
    with pytest.raises(DeriveError, match=f"{option}: the (high|low)-noise expert has 4 blocks"):
        derive_with(op, tmp_path)
    assert not (tmp_path / "scratch" / "high.pt").exists()


def test_recovery_steps_reach_the_pruning_operations_and_bad_ones_are_named():
    from farm.cli.models_cmds import operations

    ffn, blocks = operations(None, 0.3, None, "high=2,low=1", None, None, None,
                             recovery_steps=1500)
    assert ffn.settings()["final_steps"] == blocks.settings()["final_steps"] == 1500
    assert operations(None, None, None, "1", None, None, None)[0].settings()["final_steps"] == 600
    with pytest.raises(DeriveError, match=r"--recovery-steps 0: must be at least 1"):
        operations(None, None, None, "1", None, None, None, recovery_steps=0)
    with pytest.raises(DeriveError, match=r"--recovery-steps .* neither is given"):
        operations(None, None, None, None, None, 4, None, recovery_steps=100)
