"""`--quantize` on the shipped toy model (workers/lightening/quantize.py): the saved folder
holds int8 weights in diffusers' torchao layout at under 0.3x the fp32 bytes, loads through
`WanT2V.from_folder` and renders close to fp32; quantizing at load gives the same weights and
frames; bad modes and fp8 without a GPU fail naming the option and the value."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from torchao.quantization import Int8Tensor

from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.quantize import Quantize, check_mode
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import ModelFolderError, RenderRequest, WanT2V

TOY = BUNDLED_DIR / "wan-toy"
MODES = ("int8-weight", "int8-dynamic")
# PSNR against fp32 at the toy's defaults (17 frames of 32 x 32, 20 steps, guidance 4),
# measured over eight captions: int8-weight 46.5-58.3 dB, int8-dynamic 41.5-51.9 dB (over
# these four: >= 50.3 and >= 46.3). At 8 steps a render drifts further (21 dB at worst): an
# early step's small change moves the whole trajectory. The floors leave 6-10 dB.
PSNR_FLOOR = {"int8-weight": 40.0, "int8-dynamic": 35.0}
CASES = [("a red circle moving right on a black background", 11),
         ("a blue square moving left on a gray background", 12),
         ("a red triangle moving up on a navy background", 13),  # held out of training
         ("棕色背景上一个黄色圆形向下移动", 14)]  # held out, in Chinese


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/workers/conftest.py


def request(prompt: str, seed: int, frames: int = 17, steps: int = 20) -> RenderRequest:
    return RenderRequest(prompt, "", frames=frames, height=32, width=32, steps=steps,
                         guidance_high=4.0, guidance_low=4.0, seed=seed)


def render(pipe: WanT2V, prompt: str, seed: int, **size) -> np.ndarray:
    return np.concatenate(list(pipe.decode_chunks(pipe.denoise(request(prompt, seed, **size)))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def derive_quantized(tmp_path_factory, mode: str):
    work = tmp_path_factory.mktemp(mode) / "wan-toy"
    shutil.copytree(TOY, work)
    ctx = DeriveContext(base=TOY, work=work, seed=0, resume=False,
                        scratch=work.with_name("scratch"))
    ctx.scratch.mkdir()
    return work, Quantize(mode).apply(ctx)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict:
    """mode -> (folder, manifest entry): copies of the toy, quantized by the operation."""
    return {mode: derive_quantized(tmp_path_factory, mode) for mode in MODES}


@pytest.fixture(scope="module")
def fp32_frames() -> list[np.ndarray]:
    pipe = WanT2V.from_folder(TOY)
    return [render(pipe, prompt, seed) for prompt, seed in CASES]


def tensor_bytes(path) -> tuple[int, int]:
    """(file bytes, tensor bytes): a safetensors file is an 8-byte length, a JSON header
    (names, shapes, offsets, torchao's per-tensor metadata), then the tensors' bytes."""
    with open(path, "rb") as fh:
        header = struct.unpack("<Q", fh.read(8))[0]
    size = path.stat().st_size
    return size, size - 8 - header


@pytest.mark.parametrize("mode", MODES)
def test_saved_weights_are_int8_and_under_03x(quantized, mode):
    folder, entry = quantized[mode]
    files = fp32_files = data = fp32_data = 0
    for expert in ("transformer", "transformer_2"):
        config = json.loads((folder / expert / "config.json").read_text())
        quant = config["quantization_config"]
        assert quant["quant_method"] == "torchao"
        assert set(quant["modules_to_not_convert"]) >= {"proj_out", "time_embedder", "norm2"}
        path = folder / expert / "diffusion_pytorch_model.safetensors"
        size, tensors = tensor_bytes(path)
        base_size, base_tensors = tensor_bytes(TOY / expert / path.name)
        files, data = files + size, data + tensors
        fp32_files, fp32_data = fp32_files + base_size, fp32_data + base_tensors
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            keys = set(fh.keys())
            qdata = fh.get_tensor("blocks.0.ffn.net.0.proj._weight_qdata")
            assert qdata.dtype == torch.int8 and tuple(qdata.shape) == (256, 128)
            # Kept at full precision: the time embedder and the output projection.
            assert fh.get_tensor("condition_embedder.time_embedder.linear_1.weight").dtype == \
                torch.float32
            assert "proj_out.weight" in keys and "proj_out._weight_qdata" not in keys
        # Every block's ten Linears plus the text embedder's two and the time projection.
        assert sum(k.endswith("._weight_qdata") for k in keys) == 4 * 10 + 3
    print(f"{mode}: files {files} / {fp32_files} = {files / fp32_files:.4f}; tensors "
          f"{data} / {fp32_data} = {data / fp32_data:.4f}")
    # The tensors' bytes (what the weights take, on disk and in memory) are under 0.3x. The
    # files' JSON headers carry torchao's per-tensor metadata, about 20 KB per expert: 1% of
    # the toy's 3.8 MB (0.305x with them, measured), nothing at A14B's 28 GB per expert.
    assert data <= 0.30 * fp32_data
    assert files <= 0.31 * fp32_files
    assert entry["weight_bytes"] == {"before": fp32_files, "after": files,
                                     "ratio": round(files / fp32_files, 4)}
    assert entry["quantized_linears"] == 2 * 43


@pytest.mark.parametrize("mode", MODES)
def test_quantized_folder_renders_close_to_fp32(quantized, fp32_frames, mode):
    pipe = WanT2V.from_folder(quantized[mode][0])
    for expert in pipe.experts:
        assert isinstance(expert.blocks[0].attn1.to_q.weight, Int8Tensor)
        assert not isinstance(expert.proj_out.weight, Int8Tensor)
        assert expert.dtype == torch.float32
    scores = [psnr(render(pipe, prompt, seed), ref)
              for (prompt, seed), ref in zip(CASES, fp32_frames)]
    print(f"{mode}: PSNR against fp32 {[round(float(s), 1) for s in scores]} dB")
    assert min(scores) > PSNR_FLOOR[mode]
    assert max(scores) < float("inf")  # the weights did change


def own_memory(pipe: WanT2V) -> None:
    """Copy every expert tensor out of the file it was mapped from. CPU kernels sum in an
    order that depends on a tensor's address alignment, and the two folders place the same
    fp32 tensors (the kept time embedder) at other offsets: ~1e-7 apart, which int8 dynamic
    activations can round to another step. Fresh memory on both sides compares the math."""
    for expert in pipe.experts:
        for module in expert.modules():
            for name, param in module.named_parameters(recurse=False):
                fresh = (param.data._apply_fn_to_data(torch.clone)
                         if isinstance(param.data, Int8Tensor) else param.data.clone())
                setattr(module, name, torch.nn.Parameter(fresh, requires_grad=False))


@pytest.mark.parametrize("mode", MODES)
def test_quantize_on_load_equals_the_saved_folder(quantized, mode):
    saved = WanT2V.from_folder(quantized[mode][0])
    on_load = WanT2V.from_folder(TOY, quantize=mode)
    for a, b in zip(saved.experts, on_load.experts):
        params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
        assert params_a.keys() == params_b.keys()
        for name, pa in params_a.items():
            pb = params_b[name]
            assert type(pa) is type(pb) and isinstance(pa, Int8Tensor) == \
                isinstance(pb, Int8Tensor), name
            if isinstance(pa, Int8Tensor):
                assert torch.equal(pa.qdata, pb.qdata) and torch.equal(pa.scale, pb.scale)
                assert pa.act_quant_kwargs == pb.act_quant_kwargs
            else:
                assert torch.equal(pa, pb), name
    own_memory(saved)
    own_memory(on_load)
    prompt, seed = CASES[0]
    small = dict(frames=9, steps=8)
    assert np.array_equal(render(saved, prompt, seed, **small),
                          render(on_load, prompt, seed, **small))


def test_unknown_mode_names_the_option_and_value(tmp_path):
    with pytest.raises(DeriveError, match=r"--quantize 'int4' is not a quantization mode"):
        Quantize("int4")
    with pytest.raises(DeriveError, match=r"quantize_on_load 'int4' is not a quantization mode"):
        WanT2V.from_folder(TOY, quantize="int4")


def test_fp8_needs_a_recent_gpu():
    with pytest.raises(DeriveError, match=r"--quantize 'fp8' needs a CUDA GPU of compute "
                                          r"capability >= 8\.9 .*this runs on cpu"):
        check_mode("fp8", "cpu")
    with pytest.raises(DeriveError, match=r"quantize_on_load 'fp8' needs a CUDA GPU"):
        WanT2V.from_folder(TOY, device="cpu", quantize="fp8")
    if not torch.cuda.is_available():  # this machine: the operation refuses at once
        with pytest.raises(DeriveError, match=r"--quantize 'fp8' needs a CUDA GPU"):
            Quantize("fp8")


def test_a_quantized_folder_is_not_quantized_twice(quantized, tmp_path):
    folder = quantized["int8-weight"][0]
    with pytest.raises(ModelFolderError, match=r"quantize_on_load 'int8-dynamic': .* is "
                                               r"already quantized \(torchao\)"):
        WanT2V.from_folder(folder, quantize="int8-dynamic")
    work = tmp_path / "again"
    shutil.copytree(folder, work)
    ctx = DeriveContext(base=folder, work=work, seed=0, resume=False, scratch=tmp_path / "s")
    with pytest.raises(DeriveError, match=r"--quantize 'int8-weight': .* already quantized"):
        Quantize("int8-weight").apply(ctx)
