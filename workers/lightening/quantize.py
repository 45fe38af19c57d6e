"""`--quantize int8-weight | int8-dynamic | fp8`: torchao quantization of the experts' Linears.

What is quantized: every ``nn.Linear`` of each transformer expert (attention q/k/v/out, FFN,
the text embedder and the time projection), with per-output-channel symmetric scales. What
stays in full precision: what diffusers' WanTransformer3DModel keeps in fp32
(``_keep_in_fp32_modules``: the time embedder, the norms, the scale-shift tables, rope),
modules that are not Linears (the patch-embedding Conv3d, the norms' affine weights), and
``proj_out``, our choice: it writes the predicted velocity with nothing after it to absorb
its error, and it is tiny (in 5120 x out 64 on A14B, 0.002% of an expert's weights).

Modes (torchao configs; per-row weight scales everywhere):
- ``int8-weight``: Int8WeightOnlyConfig, int8 weights dequantized in the matmul (the memory
  win; eager speed is the float matmul's plus a cast).
- ``int8-dynamic``: Int8DynamicActivationInt8WeightConfig, each token's activations quantized
  on the fly (symmetric, per token) and an int8 x int8 matmul.
- ``fp8``: Float8DynamicActivationFloat8WeightConfig (e4m3, per-row), only on a CUDA GPU of
  compute capability >= 8.9, where float8 matmuls exist.

On disk: diffusers' own torchao layout, so any diffusers loads the folder (``from_pretrained``
reads ``quantization_config`` from the expert's config.json) and so do the farm's loaders
(workers/wan_pipeline.py, workers/parallel/placement.py, and the tensor-parallel shard loader
workers/parallel/tensor_parallel.py, which slices the int8 data and keeps each row's scale).
The safetensors hold torchao's flattened parts (``<module>._weight_qdata`` int8,
``_weight_scale`` fp32, ``_weight_zero_point``) with their tensor types in the file's metadata.

`quantize_expert` applies the same quantization to an expert already loaded (the catalog's
``quantize_on_load``: a 57 GB A14B folder is never rewritten); it gives the same tensors as the
saved folder, and on a tensor-parallel shard each row-parallel Linear takes its rows' scales
over all ranks' columns, so a sharded quantized expert holds slices of the unsharded one's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from workers.lightening.ops import DeriveContext, DeriveError

MODES = ("int8-weight", "int8-dynamic", "fp8")
EXPERTS = ("transformer", "transformer_2")
# Linears kept in full precision beyond diffusers' own _keep_in_fp32_modules (see above).
ALSO_KEPT = ("proj_out",)
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores


def _config_class(mode: str) -> str:
    return {"int8-weight": "Int8WeightOnlyConfig",
            "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
            "fp8": "Float8DynamicActivationFloat8WeightConfig"}[mode]


def check_mode(mode: str, device: str | torch.device | None = None,
               option: str = "--quantize") -> None:
    """Raise DeriveError unless ``mode`` is known and can run on ``device`` (default: this
    machine's first GPU, else the CPU). The message names ``option`` and quotes the value."""
    if mode not in MODES:
        raise DeriveError(f"{option} {mode!r} is not a quantization mode; expected one of "
                          f"{', '.join(MODES)}")
    if mode != "fp8":
        return
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeriveError(f"{option} 'fp8' needs a CUDA GPU of compute capability >= "
                          f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (float8 matmuls); "
                          f"this runs on {device.type}: use int8-weight or int8-dynamic")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise DeriveError(f"{option} 'fp8' needs a GPU of compute capability >= "
                          f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (float8 matmuls); {name} "
                          f"is {capability[0]}.{capability[1]}: use int8-weight or int8-dynamic")


def torchao_config(mode: str):
    """The torchao config of ``mode`` (torchao imported only when quantizing). The inductor
    settings torchao would change globally are left alone: the farm renders eagerly."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig, PerRow,
    )

    if mode == "int8-weight":
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    if mode == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(granularity=PerRow(),
                                                     set_inductor_config=False)
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                         set_inductor_config=False)
    raise DeriveError(f"--quantize {mode!r} is not a quantization mode; expected one of "
                      f"{', '.join(MODES)}")


def kept_modules(cls) -> list[str]:
    """Module names (path parts) whose Linears stay in full precision."""
    return sorted(set(getattr(cls, "_keep_in_fp32_modules", None) or ()) | set(ALSO_KEPT))


def _quantizable(kept: list[str]):
    from workers.parallel.tensor_parallel import ColumnParallelLinear

    def accept(module: nn.Module, fqn: str) -> bool:
        # Column-parallel shards hold whole rows: their per-row scales are the unsharded ones.
        return (isinstance(module, (nn.Linear, ColumnParallelLinear))
                and not any(part in kept for part in fqn.split(".")))

    return accept


def is_quantized(expert: nn.Module) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return any(isinstance(p, TorchAOBaseTensor) for p in expert.parameters())


def quantize_expert(expert: nn.Module, mode: str, option: str = "quantize_on_load") -> int:
    """Quantize a loaded expert in place, on the device it is on; returns how many Linears
    were quantized. A tensor-parallel shard's row-parallel Linears are quantized with their
    rows' scales taken over every rank (workers/parallel/tensor_parallel.py)."""
    from torchao.quantization import quantize_

    from workers.parallel.tensor_parallel import RowParallelLinear, quantize_row_parallel

    device = next(expert.parameters()).device
    check_mode(mode, device, option)
    if is_quantized(expert):
        raise DeriveError(f"{option} {mode!r}: the expert is already quantized")
    if mode == "fp8" and getattr(expert, "tp_world", 1) > 1:
        raise DeriveError(f"{option} 'fp8' with tensor parallelism is not supported: its "
                          "row-parallel activations would be scaled per shard")
    config = torchao_config(mode)
    kept = kept_modules(type(expert))
    count = 0
    # Rows first, in module order: each is one all-reduce every rank makes in the same order.
    for fqn, module in expert.named_modules():
        if isinstance(module, RowParallelLinear) and not any(p in kept for p in fqn.split(".")):
            quantize_row_parallel(module, config)
            count += 1
    accept = _quantizable(kept)
    count += sum(accept(m, fqn) for fqn, m in expert.named_modules())
    quantize_(expert, config, filter_fn=accept)
    return count


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


class Quantize:
    """The derive operation: rewrites each expert of ``ctx.work`` with quantized weights."""

    name = "quantize"

    def __init__(self, mode: str, check_device: bool = True):
        """``check_device=False``: the name only (a variant quantized when the workers load
        it is registered from a machine that need not have their GPUs)."""
        if mode not in MODES:
            raise DeriveError(f"--quantize {mode!r} is not a quantization mode; expected one "
                              f"of {', '.join(MODES)}")
        if check_device:
            check_mode(mode, "cpu" if mode != "fp8" else None)  # fp8: this machine's GPU
        self.mode = mode

    def check(self, device: str | torch.device | None = None) -> None:
        """Whether this machine (or ``device``) can apply the mode; raises DeriveError."""
        check_mode(self.mode, device)

    def settings(self) -> dict:
        return {"mode": self.mode, "torchao": _config_class(self.mode),
                "granularity": "per output channel (weights)" + (
                    ", per token (activations)" if self.mode != "int8-weight" else ""),
                "kept_full_precision": kept_modules(_expert_class())}

    def apply(self, ctx: DeriveContext) -> dict:
        from diffusers import TorchAoConfig

        started = time.monotonic()
        self.check()
        # fp8 is quantized where it runs (a GPU, bf16); int8 on the CPU from fp32 weights.
        device, dtype = (("cuda", torch.bfloat16) if self.mode == "fp8"
                         else ("cpu", torch.float32))
        index = json.loads((ctx.work / "model_index.json").read_text())
        experts, before, after, linears = [], 0, 0, 0
        for name in EXPERTS:
            spec = index.get(name)
            if not isinstance(spec, list) or spec[0] is None:
                continue
            folder = ctx.work / name
            existing = json.loads((folder / "config.json").read_text()).get("quantization_config")
            if existing:
                raise DeriveError(f"--quantize {self.mode!r}: {folder} is already quantized "
                                  f"({existing.get('quant_method')})")
            cls = _expert_class(spec)
            # A fresh list each time: diffusers extends it in place with _keep_in_fp32_modules.
            quant = TorchAoConfig(torchao_config(self.mode), modules_to_not_convert=list(ALSO_KEPT))
            # diffusers quantizes each Linear as it is read: peak memory is the quantized
            # expert plus one layer, never the whole expert at full precision.
            model = cls.from_pretrained(folder, torch_dtype=dtype, quantization_config=quant,
                                        device_map=device if device != "cpu" else None)
            linears += sum(is_quantized(m) for m in model.modules() if isinstance(m, nn.Linear))
            fresh = ctx.scratch / name
            shutil.rmtree(fresh, ignore_errors=True)
            model.save_pretrained(fresh, safe_serialization=True)
            before += _weight_bytes(folder)
            shutil.rmtree(folder)  # old shards and their index go with it
            shutil.move(str(fresh), str(folder))
            after += _weight_bytes(folder)
            experts.append(name)
            ctx.note(f"quantized {name} {self.mode}")
        if not experts:
            raise DeriveError(f"--quantize {self.mode!r}: {ctx.work} has no transformer expert")
        return {"method": f"torchao quantize_ with {_config_class(self.mode)}; saved in "
                          "diffusers' torchao layout (config.json quantization_config)",
                "experts": experts, "quantized_linears": linears,
                "weight_bytes": {"before": before, "after": after,
                                 "ratio": round(after / before, 4)},
                "training": None, "seconds": round(time.monotonic() - started, 1)}


def _expert_class(spec: list | None = None):
    import importlib

    library, name = spec or ("diffusers", "WanTransformer3DModel")
    return getattr(importlib.import_module(library), name)
