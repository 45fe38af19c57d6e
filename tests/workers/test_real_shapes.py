"""Real model shapes held against stock diffusers (issue #11, item 4).

Each tiny checkpoint (A14B's layout, TI2V-5B's layout, and the shipped toy) is rendered by
the farm's `WanT2V` and by diffusers' own `WanPipeline` from the same folder with the same
caption, seed, steps and guidance; the decoded frames agree within 1 level of 255 (the two
round [-1, 1] to uint8 a hair apart).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from scheduler.latents import latent_shape, vae_strides
from workers.tiny_model import make_tiny_checkpoint
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import RenderRequest, WanT2V

CAPTION = "a red circle moving right on a black background"


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("a14b"), like="t2v-a14b")


@pytest.fixture(scope="module")
def ti2v_5b(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("5b"), like="ti2v-5b")


def _config(folder, name: str) -> dict:
    return json.loads((folder / name / "config.json").read_text())


def test_a14b_layout_has_two_experts_and_the_wan21_vae(a14b):
    index = json.loads((a14b / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and not index["expand_timesteps"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    vae = _config(a14b, "vae")
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["scale_factor_temporal"]) == (16, 8, 4)
    assert vae["patch_size"] is None and not vae["is_residual"]
    assert _config(a14b, "transformer")["patch_size"] == [1, 2, 2]
    assert vae_strides(vae) == (4, 8)


def test_5b_layout_has_one_expert_per_token_timesteps_and_the_wan22_vae(ti2v_5b):
    index = json.loads((ti2v_5b / "model_index.json").read_text())
    assert index["boundary_ratio"] is None and index["expand_timesteps"] is True
    assert index["transformer_2"] == [None, None]
    vae = _config(ti2v_5b, "vae")
    assert (vae["z_dim"], vae["patch_size"], vae["scale_factor_spatial"],
            vae["scale_factor_temporal"], vae["is_residual"]) == (48, 2, 16, 4, True)
    assert _config(ti2v_5b, "transformer")["in_channels"] == 48
    assert vae_strides(vae) == (4, 16)
    pipe = WanT2V.from_folder(ti2v_5b)
    assert pipe.expand_timesteps and len(pipe.experts) == 1
    req = RenderRequest(CAPTION, "", frames=9, height=64, width=96, steps=1, guidance_high=4.0,
                        guidance_low=4.0, seed=0)
    assert pipe.latent_shape(req) == (1, 48, 3, 4, 6) == (1, *latent_shape(48, (4, 16), 9, 64, 96))


def test_checkpoints_are_small(a14b, ti2v_5b):
    for folder in (a14b, ti2v_5b):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 5 * 2**20, (folder, size)


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="like must be one of .*'sdxl'"):
        make_tiny_checkpoint(tmp_path, like="sdxl")


def _farm_frames(folder, frames: int, height: int, width: int) -> tuple[np.ndarray, WanT2V]:
    pipe = WanT2V.from_folder(folder)
    req = RenderRequest(CAPTION, "", frames=frames, height=height, width=width, steps=4,
                        guidance_high=4.0, guidance_low=3.0, seed=7)
    return np.concatenate(list(pipe.decode_chunks(pipe.denoise(req)))), pipe


def _diffusers_frames(folder, farm: WanT2V, frames: int, height: int, width: int) -> np.ndarray:
    pipe = WanPipeline.from_pretrained(folder)
    # Both experts' guidance for A14B; the 5B has one expert and takes one scale.
    two = {"guidance_scale_2": 3.0} if farm.transformer_2 is not None else {}
    out = pipe(CAPTION, negative_prompt="", height=height, width=width, num_frames=frames,
               num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator("cpu").manual_seed(7), output_type="np",
               max_sequence_length=farm.text_len, **two).frames[0]  # (T, H, W, 3) in [0, 1]
    return np.round(out * 255).astype(np.int16)


@pytest.mark.parametrize("which,frames,height,width", [
    ("a14b", 9, 64, 96), ("ti2v_5b", 9, 64, 96), ("wan-toy", 17, 32, 32)])
def test_farm_and_diffusers_render_the_same_frames(request, which, frames, height, width):
    folder = BUNDLED_DIR / "wan-toy" if which == "wan-toy" else request.getfixturevalue(which)
    ours, farm = _farm_frames(folder, frames, height, width)
    theirs = _diffusers_frames(folder, farm, frames, height, width)
    assert ours.shape == theirs.shape == (frames, height, width, 3)
    assert ours.std() > 5  # a real picture, not a flat one that would agree trivially
    assert int(np.abs(ours.astype(np.int16) - theirs).max()) <= 1


def test_shipped_toy_declares_its_real_stride():
    """The toy's VAE has two downsampling levels: a 5x8x8 latent decodes to 17x32x32."""
    pipe = WanT2V.from_folder(BUNDLED_DIR / "wan-toy")
    with torch.no_grad():
        video = pipe.vae.decode(torch.zeros(1, 8, 5, 8, 8)).sample
    assert tuple(video.shape[2:]) == (17, 32, 32)
    assert (pipe.vae_stride_t, pipe.vae_stride_s) == vae_strides(pipe.vae.config) == (4, 4)


@pytest.mark.parametrize("variant,which", [
    ("wan-tiny", "a14b"), ("wan2.2-t2v-a14b", "a14b"), ("wan2.2-ti2v-5b", "ti2v_5b"),
    ("wan-toy", "wan-toy")])
def test_catalog_latents_are_what_the_checkpoints_say(request, variant, which):
    """The catalog's latent fields (scheduler/config/models.yaml), which routing and the cost
    model size memory and time from, against the VAE and transformer configs of a folder
    of that layout."""
    from pathlib import Path

    from scheduler.catalog import Latent, parse_catalog

    config = Path(__file__).resolve().parents[2] / "scheduler" / "config"
    catalog = parse_catalog((config / "tiers.yaml").read_text(),
                            (config / "models.yaml").read_text())
    folder = BUNDLED_DIR / "wan-toy" if which == "wan-toy" else request.getfixturevalue(which)
    latent = Latent.from_checkpoint(_config(folder, "vae"), _config(folder, "transformer"))
    entry = catalog.model(variant)
    assert entry.latent == latent
    native = entry.native_width, entry.native_height, entry.max_frames
    pipe_shape = WanT2V.from_folder(folder).latent_shape(RenderRequest(
        "x", "", frames=native[2], height=native[1], width=native[0], steps=1,
        guidance_high=1.0, guidance_low=1.0, seed=0))
    assert pipe_shape[1:] == entry.latent.shape(*native)


@pytest.mark.parametrize("which", ["a14b", "ti2v_5b"])
def test_a_continued_render_holds_its_first_frame_in_both_layouts(request, which):
    """Re-noised to each step's level (A14B) or clean at timestep 0 (5B's per-token
    timesteps): after the last step the first latent frame is the encoded frame itself,
    and the rest still differs from a text-only render of the same seed."""
    pipe = WanT2V.from_folder(request.getfixturevalue(which))
    frame = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    fields = dict(prompt=CAPTION, negative_prompt="", frames=9, height=64, width=96, steps=3,
                  guidance_high=4.0, guidance_low=3.0, seed=5)
    held = pipe.denoise(RenderRequest(**fields, first_frame=frame))
    free = pipe.denoise(RenderRequest(**fields))
    torch.testing.assert_close(held[:, :, :1], pipe.encode_frame(frame), rtol=0, atol=1e-6)
    assert not torch.allclose(held[:, :, 1:], free[:, :, 1:])


@pytest.mark.parametrize("variant", ["wan-toy-pruned", "wan-toy-4step"])
def test_shipped_derived_variants_render_in_diffusers_as_in_the_farm(variant):
    """The toy's derived variants (issue #12) are plain diffusers folders: a shallower expert
    and a 4-step student load in `WanPipeline` and give the farm's frames (the narrower
    decoder, shipped only in the int8 draft, is checked in bfloat16 below)."""
    folder = BUNDLED_DIR / variant
    ours, farm = _farm_frames(folder, 17, 32, 32)
    theirs = _diffusers_frames(folder, farm, 17, 32, 32)
    assert ours.std() > 5
    assert int(np.abs(ours.astype(np.int16) - theirs).max()) <= 1


@pytest.mark.parametrize("variant", ["wan-toy-int8", "wan-toy-draft"])
def test_shipped_int8_variants_render_in_diffusers_close_to_the_farm(variant):
    """diffusers loads a torchao int8 folder in bfloat16 whatever dtype it is asked for, so
    the farm renders it in bfloat16 too; the two differ by bfloat16 rounding only."""
    folder = BUNDLED_DIR / variant
    farm = WanT2V.from_folder(folder, torch.device("cpu"), torch.bfloat16)
    req = RenderRequest(CAPTION, "", frames=17, height=32, width=32, steps=4,
                        guidance_high=4.0, guidance_low=3.0, seed=7)
    ours = np.concatenate(list(farm.decode_chunks(farm.denoise(req)))).astype(np.float64)
    theirs = _diffusers_frames(folder, farm, 17, 32, 32)
    assert ours.std() > 5
    mse = float(np.mean((ours - theirs) ** 2))
    assert 10 * np.log10(255.0 ** 2 / max(mse, 1e-12)) > 35.0
