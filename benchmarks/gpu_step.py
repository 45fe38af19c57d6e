"""One denoising step (with CFG) of a Wan2.2-T2V-A14B expert, for a lent GPU; tiny on CPU.

    .venv/bin/python benchmarks/gpu_step.py            # on a GPU: the real A14B expert shape
    .venv/bin/python benchmarks/gpu_step.py --tiny     # anywhere: a small shape, same code

Everything in one call (the device is lent for minutes): builds the expert with random bf16
weights (5120 wide, 40 layers, 40 heads, FFN 13824: 14B parameters), checks a 2-layer copy
against an fp32 reference on a small input, then times one step = two forwards (conditional
and unconditional) at 720P x 81 frames (75,600 tokens) and 480P x 81:
  - stock: diffusers' WanTransformer3DModel eager, default attention dispatch;
  - ours: the same module under torch.compile, with each SDPA backend forced in turn
    (flash, cuDNN, memory-efficient) where the device has it.
Prints step time, achieved TFLOP/s and MFU against the bf16 matmul peak measured here, and
the measured peak memory beside the router's estimate; the last line is stock over our best.

Then the expert quantized (issue #12: workers/lightening/quantize.py, the code an actor runs
for ``quantize_on_load``), int8-weight, int8-dynamic and fp8 in turn, each built afresh
after the bf16 one is freed, timed the same way (compiled unless --no-compile) with its peak
memory: per mode, its step time and peak against bf16's in this run. fp8 needs compute
capability 8.9 (H100/H200); elsewhere its row says why it did not run.

First, memory per placement (issue #11.3): a two-expert checkpoint at A14B's expert width
(``--placement-layers`` blocks; tiny on CPU) is loaded the actor's way for each placement
(workers/parallel/placement.py) and renders 4 steps; the peak device memory of the load and
of the render is printed beside the model tensors the placement keeps on the device and
scheduler/memory.py's estimate for this checkpoint (without the CUDA context, which the
allocator does not count). On CPU the peaks are nan: only the tensors are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent

A14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
            in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
TINY = dict(A14B, num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=2,
            text_dim=64, freq_dim=32)
TEXT_TOKENS = 512


def build(config: dict, layers: int | None, device, dtype) -> WanTransformer3DModel:
    torch.manual_seed(0)
    cfg = dict(config, num_layers=layers or config["num_layers"])
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(config: dict, frames: int, height: int, width: int, device, dtype):
    g = torch.Generator("cpu").manual_seed(1)
    latent = (1, config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(latent, generator=g).to(device, dtype)
    cond = torch.randn(1, TEXT_TOKENS, config["text_dim"], generator=g).to(device, dtype)
    uncond = torch.randn(1, TEXT_TOKENS, config["text_dim"], generator=g).to(device, dtype)
    return x, torch.tensor([900.0], device=device), cond, uncond


def step_flops(config: dict, tokens: int) -> float:
    """Matmul FLOPs of one step (two forwards): projections, attention and FFN per block."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, layers = config["ffn_dim"], config["num_layers"]
    per_block = (2 * tokens * d * d * 4  # self-attention q, k, v, out
                 + 2 * tokens * d * d * 2 + 2 * TEXT_TOKENS * d * d * 2  # cross q/out, k/v
                 + 4 * tokens * tokens * d  # self-attention scores and values
                 + 4 * tokens * TEXT_TOKENS * d  # cross-attention
                 + 4 * tokens * d * f)  # FFN
    return 2 * layers * per_block


def check_against_fp32(config: dict, device) -> float:
    """Relative error of bf16 against fp32 on a 2-layer copy at a small size."""
    ref = build(config, 2, device, torch.float32)
    low = build(config, 2, device, torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    x, t, cond, _ = inputs(config, 5, 64, 64, device, torch.float32)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
        got = low(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=cond.bfloat16(),
                  return_dict=False)[0].float()
    return ((got - want).norm() / want.norm()).item()


def matmul_peak_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, device, repeats=10)
    return 2 * n ** 3 / seconds / 1e12


def timed(fn, device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def sdpa_backends(device) -> dict:
    if device.type != "cuda":
        return {"default": None}
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def one_step(model, x, t, cond, uncond):
    with torch.no_grad():
        c = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
        u = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
        return u + 4.0 * (c - u)


def run_case(name, model, size, config, device, backend, peak, repeats) -> dict:
    from torch.nn.attention import sdpa_kernel

    frames, height, width = size
    x, t, cond, uncond = inputs(config, frames, height, width, device, torch.bfloat16)
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    guard = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with guard:
            one_step(model, x, t, cond, uncond)  # warm-up (and compilation)
            seconds = timed(lambda: one_step(model, x, t, cond, uncond), device, repeats)
    except RuntimeError as exc:  # a backend the device or shape does not support
        return {"case": name, "size": f"{width}x{height}x{frames}", "error": str(exc)[:80]}
    tflops = step_flops(config, tokens) / seconds / 1e12
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return {"case": name, "size": f"{width}x{height}x{frames}", "tokens": tokens,
            "step_s": seconds, "tflops": tflops, "mfu": tflops / peak, "peak_gb": peak_gb,
            "est_gb": estimate_gb(model, f"{width}x{height}")}


def estimate_gb(model, size: str) -> float:
    """The router's estimate for what this run holds: one expert's bf16 weights plus the
    catalog's activation memory at that size (which also covers the VAE decode, so it is
    an upper bound here), scaled from 81 frames."""
    import yaml

    models = yaml.safe_load((ROOT / "scheduler" / "config" / "models.yaml").read_text())
    activation = models["models"]["wan2.2-t2v-a14b"]["activation_gb"].get(size, float("nan"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    return weights + activation


def checkpoint(folder: Path, config: dict, layers: int, device) -> Path:
    """The tiny checkpoint's encoders, VAE and scheduler with two random bf16 experts of
    ``config`` (text width: the tiny text encoder's)."""
    from workers.tiny_model import make_tiny_checkpoint

    make_tiny_checkpoint(folder)
    text_dim = json.loads((folder / "text_encoder" / "config.json").read_text())["d_model"]
    for name in ("transformer", "transformer_2"):
        expert = build(dict(config, text_dim=text_dim), layers, device, torch.bfloat16)
        shutil.rmtree(folder / name)
        expert.to("cpu").save_pretrained(folder / name)
        del expert
    return folder


def device_gb(modules, device) -> float:
    """Bytes of ``modules``' tensors on ``device``, each tensor once (offload's experts
    share their device buffers)."""
    seen = {id(t): t.numel() * t.element_size() for m in modules
            for t in [*m.parameters(), *m.buffers()] if t.device.type == device.type}
    return sum(seen.values()) / 1e9


def load_and_render(folder: Path, device, placement: str, role: str | None) -> dict:
    """One actor's load and a 4-step render (its phase of it, when split)."""
    from workers.parallel.placement import apply_placement, expert_loader
    from workers.wan_pipeline import RenderRequest, WanT2V

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as workers/actor.py loads
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    peak = (lambda: (torch.cuda.max_memory_allocated() - base) / 1e9) if cuda else (
        lambda: float("nan"))
    pipeline = WanT2V.from_folder(folder, device, dtype,
                                  load_expert=expert_loader(placement, role))
    apply_placement(pipeline, placement, role, device)
    load_gb = peak()
    modules = [*pipeline.experts, pipeline.text_encoder, pipeline.vae]
    tensors_gb = device_gb(modules, device)
    req = RenderRequest(prompt="a red circle moving left", negative_prompt="", frames=5,
                        height=64, width=64, steps=4, guidance_high=4.0, guidance_low=3.0,
                        seed=0)
    state = pipeline.start(req)
    timesteps = state.scheduler.timesteps
    if role == "low":  # the phase after the handover: skip the high-noise steps
        while (state.step < len(timesteps)
               and pipeline.expert_for(float(timesteps[state.step]))[1] == "high"):
            state.step += 1
    for _ in pipeline.denoise_steps(req, state, "low" if role == "high" else None):
        pass
    return {"load_gb": load_gb, "render_gb": peak(), "tensors_gb": tensors_gb,
            "encoders_gb": device_gb([pipeline.text_encoder, pipeline.vae], device),
            "bytes_per_param": torch.finfo(dtype).bits // 8}


def router_estimate(placement: str, expert_params: int, bytes_per_param: int,
                    encoders_gb: float) -> float:
    """scheduler/memory.py's estimate for the benchmark's checkpoint on one GPU: A14B's entry
    with this checkpoint's parameters per expert and encoders, activations zero at the
    bench's 64x64 (a few MB), without the CUDA context (runtime overhead)."""
    from farm.policy import load_policy
    from scheduler.memory import plan_memory
    from scheduler.parallel_cost import parse_plan

    catalog = load_policy().catalog
    variant = catalog.model("wan2.2-t2v-a14b").model_copy(update=dict(
        params_b=expert_params / 1e9, bytes_per_param=bytes_per_param,
        extra_gb=encoders_gb, native="64x64", activation_gb={"64x64": 0.0}))
    need = plan_memory(catalog, variant, parse_plan("single"), placement, frames=5)
    return need.total_gb - need.overhead_gb


def placement_memory(config: dict, layers: int, device) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint(Path(tmp) / "two-experts", config, layers, device)
        params = 0  # per expert, from its checkpoint
        for path in (folder / "transformer").glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                params += sum(torch.Size(fh.get_slice(k).get_shape()).numel()
                              for k in fh.keys())
        rows = []
        for placement, roles in (("resident", [None]), ("offload", [None]),
                                 ("split", ["high", "low"])):
            runs = [load_and_render(folder, device, placement, role) for role in roles]
            row = {k: max(r[k] for r in runs) for k in runs[0]}  # split: each group's GPU
            row.update(placement=placement, est_gb=router_estimate(
                placement, params, row["bytes_per_param"], row["encoders_gb"]))
            rows.append(row)
    return rows


def print_placements(rows: list[dict]) -> None:
    """Per GPU (split: the larger of its two groups): peaks from the allocator, the model's
    tensors on the device after loading, the router's weights + encoders + activations."""
    print(f"{'placement':<20}{'load peak GB':>14}{'render peak GB':>16}{'tensors GB':>12}"
          f"{'est GB':>10}")
    for r in rows:
        print(f"placement {r['placement']:<10}{r['load_gb']:>14.3f}{r['render_gb']:>16.3f}"
              f"{r['tensors_gb']:>12.4f}{r['est_gb']:>10.4f}")


QUANTIZED = ("int8-weight", "int8-dynamic", "fp8")


def quantized_cases(config, size, device, peak, repeats, compile_it: bool) -> list[dict]:
    """One row per quantization mode at ``size``: a fresh bf16 expert, quantized in place."""
    from workers.lightening.ops import DeriveError
    from workers.lightening.quantize import quantize_expert

    rows = []
    for mode in QUANTIZED:
        label = f"{mode} {'compiled' if compile_it else 'eager'}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build(config, None, device, torch.bfloat16)
        try:
            quantize_expert(model, mode, option="--quantize")
        except DeriveError as exc:  # fp8 without an sm_89 GPU
            rows.append({"case": label, "size": f"{size[2]}x{size[1]}x{size[0]}",
                         "error": str(exc)[:80]})
            continue
        runnable = torch.compile(model) if compile_it else model
        rows.append(run_case(label, runnable, size, config, device, None, peak, repeats))
        del model, runnable
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small shape (CPU, CI)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--placement-layers", type=int, default=4,
                        help="blocks per expert of the placement-memory checkpoint (GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    config = TINY if tiny else A14B
    sizes = ([(5, 64, 112), (5, 48, 80)] if tiny else [(81, 720, 1280), (81, 480, 832)])

    error = check_against_fp32(config, device)
    print(f"device {device}; shape {'tiny' if tiny else 'A14B expert'}; bf16 vs fp32 "
          f"relative error (2 layers): {error:.2e}")
    assert error < 2e-2, "bf16 output differs from the fp32 reference"
    print_placements(placement_memory(config, 2 if tiny else args.placement_layers, device))
    peak = matmul_peak_tflops(device, torch.bfloat16, 512 if tiny else 8192)
    print(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s")

    model = build(config, None, device, torch.bfloat16)
    rows = []
    for size in sizes:
        rows.append(run_case("stock eager", model, size, config, device, None, peak,
                             args.repeats))
        compiled = model if args.no_compile else torch.compile(model)
        label = "ours eager" if args.no_compile else "ours compiled"
        for backend_name, backend in sdpa_backends(device).items():
            rows.append(run_case(f"{label} {backend_name}", compiled, size, config, device,
                                 backend, peak, args.repeats))
    bf16 = next(r for r in rows if r["case"].startswith("ours") and "error" not in r
                and r["size"] == f"{sizes[0][2]}x{sizes[0][1]}x{sizes[0][0]}")
    del model, compiled
    quantized = quantized_cases(config, sizes[0], device, peak, args.repeats,
                                not args.no_compile)
    rows += quantized
    print(f"{'case':<28}{'size':>16}{'step s':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GB':>9}"
          f"{'est GB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<28}{r['size']:>16}  unsupported: {r['error']}")
            continue
        print(f"{r['case']:<28}{r['size']:>16}{r['step_s']:>10.3f}{r['tflops']:>10.2f}"
              f"{r['mfu']:>8.1%}{r['peak_gb']:>9.1f}{r['est_gb']:>8.1f}")
    for r in quantized:
        if "error" not in r:
            print(f"{r['case']} / {bf16['case']} at {r['size']}: step "
                  f"{r['step_s'] / bf16['step_s']:.2f}x, peak memory "
                  f"{r['peak_gb'] / bf16['peak_gb']:.2f}x")
    first = sizes[0]
    tag = f"{first[2]}x{first[1]}x{first[0]}"
    stock = next(r for r in rows if r["case"] == "stock eager" and r["size"] == tag)
    ours = min((r for r in rows if r["case"].startswith("ours") and r["size"] == tag
                and "error" not in r), key=lambda r: r["step_s"])
    print(f"stock eager / {ours['case']} at {tag}: {stock['step_s'] / ours['step_s']:.2f}x")


if __name__ == "__main__":
    main()
