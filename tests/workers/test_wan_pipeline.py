"""The Wan runtime on the tiny checkpoint: real layout, real diffusers classes, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.wan_pipeline import ModelFolderError, RenderRequest, WanT2V, _to_uint8


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return WanT2V.from_folder(tiny_model)


def request(**overrides) -> RenderRequest:
    base = dict(prompt="a red circle moving left", negative_prompt="", frames=9, height=64,
                width=112, steps=8, guidance_high=4.0, guidance_low=3.0, seed=11)
    return RenderRequest(**(base | overrides))


def test_checkpoint_has_the_diffusers_wan22_layout(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    for name in ("transformer", "transformer_2", "vae"):
        assert (tiny_model / name / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model / "text_encoder" / "model.safetensors").is_file()
    assert (tiny_model / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny_model / "scheduler" / "scheduler_config.json").is_file()


def test_loads_both_experts_from_the_folder(pipe):
    assert len(pipe.experts) == 2 and pipe.boundary_ratio == 0.875
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLWan"
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"


def test_expert_switch_at_the_boundary(pipe):
    seen = []
    pipe.denoise(request(steps=8), on_step=lambda i, n, which: seen.append((i, which)))
    experts = [w for _, w in seen]
    assert [i for i, _ in seen] == list(range(1, 9))
    # High-noise steps first, then low-noise, one switch.
    assert experts[0] == "high" and experts[-1] == "low"
    assert experts == sorted(experts, key=lambda w: w != "high")
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(8)
    expected = ["high" if float(t) >= 875 else "low" for t in sched.timesteps]
    assert experts == expected


def test_same_seed_same_latents_other_seed_other(pipe):
    a, b = pipe.denoise(request()), pipe.denoise(request())
    c = pipe.denoise(request(seed=12))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (1, 16, 3, 8, 14)


def test_chunked_decode_equals_whole_decode(pipe):
    latents = pipe.denoise(request(frames=17, steps=2))
    chunks = list(pipe.decode_chunks(latents, latent_frames_per_chunk=2))
    assert [c.shape[0] for c in chunks] == [5, 8, 4]
    whole = pipe.vae.decode(pipe._denormalise(latents), return_dict=False)[0]
    np.testing.assert_array_equal(np.concatenate(chunks), _to_uint8(whole, None))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="no model_index.json"):
        WanT2V.from_folder(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"]}))
    with pytest.raises(ModelFolderError, match="lacks component"):
        WanT2V.from_folder(tmp_path)
