"""``--light-decoder R`` (workers/lightening/light_decoder.py) on the shipped toy: a narrower
decoder in the same diffusers class, the base's encoder kept, trained on the base's own
latents, resumable. A few training steps here (the mechanics); quality after the full run
is measured by benchmarks/lightening.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from workers.lightening.light_decoder import LightDecoder, decode_raw, render_settings
from workers.lightening.ops import DeriveContext, DeriveError
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import RenderRequest, WanT2V

BASE = BUNDLED_DIR / "wan-toy"


def quick(**changes) -> LightDecoder:
    return LightDecoder(**{**dict(ratio=0.5, renders=6, validation=2, train_steps=30, batch=2,
                                  checkpoint_every=10, steps=4), **changes})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/workers/conftest.py


class Stopped(Exception):
    pass


class Recording(DeriveContext):
    """Keeps the run's progress notes."""

    notes: list = []

    def note(self, message: str) -> None:
        Recording.notes.append(message)


class StopAt(DeriveContext):
    """Stops the run when it reports its first checkpoint."""

    def note(self, message: str) -> None:
        if "step 10/" in message:
            raise Stopped(message)


def derive_with(op, tmp_path: Path, resume: bool = False, ctx_cls=DeriveContext):
    work = tmp_path / "variant"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(BASE, work)
    ctx = ctx_cls(base=BASE, work=work, seed=2, resume=resume, scratch=tmp_path / "scratch")
    return work, op.apply(ctx)


def test_the_variant_has_a_narrower_decoder_the_bases_encoder_and_renders(tmp_path):
    work, entry = derive_with(quick(), tmp_path)
    base = AutoencoderKLWan.from_pretrained(BASE / "vae")
    light = AutoencoderKLWan.from_pretrained(work / "vae")
    assert light.config.decoder_base_dim == 8 and light.config.base_dim == 16
    assert entry["decoder_base_dim"] == [16, 8]
    assert entry["decoder_params"]["student"] < entry["decoder_params"]["teacher"] / 3
    for key, value in base.state_dict().items():
        if not key.startswith("decoder."):
            assert torch.equal(value, light.state_dict()[key]), key
    curve = entry["training"]["loss_curve"]
    assert len(curve) == 2 and curve[-1] < curve[0], curve
    assert entry["held_back_psnr_db"] > 0
    pipe = WanT2V.from_folder(work)
    req = RenderRequest("a red circle moving right on a black background", "", 5, 32, 32, 3,
                        4.0, 4.0, 1)
    frames = next(pipe.decode_chunks(pipe.denoise(req)))
    assert frames.shape[1:] == (32, 32, 3) and frames.dtype == np.uint8
    # diffusers' own WanPipeline builds the narrower decoder from the same config.json.
    from tests.workers.test_real_shapes import _diffusers_frames, _farm_frames

    ours, farm = _farm_frames(work, 9, 32, 32)
    theirs = _diffusers_frames(work, farm, 9, 32, 32)
    assert ours.shape == theirs.shape and int(np.abs(ours.astype(np.int16) - theirs).max()) <= 1


def test_decode_raw_is_the_pipelines_decode_before_the_clamp():
    pipe = WanT2V.from_folder(BASE)
    latents = pipe.denoise(RenderRequest("a blue square moving left on a gray background", "",
                                         9, 32, 32, 3, 4.0, 4.0, 5))
    raw = decode_raw(pipe.vae, pipe._denormalise(latents))
    frames = np.concatenate(list(pipe.decode_chunks(latents)))
    again = ((raw.clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(again.numpy(), frames)


def test_a_stopped_run_resumes_to_the_same_decoder(tmp_path):
    whole, _ = derive_with(quick(), tmp_path / "whole")
    with pytest.raises(Stopped):
        derive_with(quick(), tmp_path / "stopped", ctx_cls=StopAt)
    Recording.notes = []
    resumed, entry = derive_with(quick(), tmp_path / "stopped", resume=True,
                                 ctx_cls=Recording)
    # It continued from the checkpoint: the seeded run from scratch would end the same.
    # ... from its saved data: no "rendering" note.
    assert Recording.notes[0] == "--light-decoder resumes at step 10 of 30", Recording.notes
    assert [n.split(" loss")[0] for n in Recording.notes[1:]] == \
        ["--light-decoder step 20/30", "--light-decoder step 30/30"]
    a = AutoencoderKLWan.from_pretrained(whole / "vae").state_dict()
    b = AutoencoderKLWan.from_pretrained(resumed / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert entry["training"]["steps"] == 30
    with pytest.raises(DeriveError, match="other settings"):
        derive_with(quick(train_steps=40), tmp_path / "stopped", resume=True)


def test_it_renders_training_latents_the_way_the_base_renders():
    assert render_settings(BASE, None, None) == (20, 4.0)
    assert render_settings(BUNDLED_DIR / "wan-toy-4step", None, None) == (4, 1.0)
    assert render_settings(BUNDLED_DIR / "wan-toy-draft", None, None) == (4, 1.0)  # a chain
    assert render_settings(BASE, 8, 2.0) == (8, 2.0)


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.5, True])
def test_a_bad_width_names_the_option_and_value(ratio):
    with pytest.raises(DeriveError, match=rf"--light-decoder {ratio!r}"):
        LightDecoder(ratio)
