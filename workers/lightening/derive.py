"""Derive a variant: copy the base folder, run each operation on the copy, write derive.json.

The operations run in a fixed order whatever the command line's: structure first (pruning,
dropping blocks, a shallower student), then the few-step student, then a smaller low-noise
expert, then a narrower VAE decoder, and quantization last (it is applied to the weights
the others trained). Each operation gets its own scratch folder beside OUT (``OUT.scratch/N-name``) for training
checkpoints, so ``resume`` continues where a stopped run left off.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.lightening.manifest import MANIFEST, write_manifest
from workers.lightening.ops import DeriveContext, DeriveError, Operation

ORDER = ("prune-heads", "prune-ffn", "drop-blocks", "student-layers", "distill", "low-expert",
         "light-decoder", "quantize")
EXPERTS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class Derived:
    folder: Path  # where the variant's weights are (the base's, for quantize-on-load only)
    manifest: dict
    shape: dict  # what the catalog needs: layers, ffn_dim, params_b, bytes_per_param


def ordered(operations: list[Operation]) -> list[Operation]:
    names = [op.name for op in operations]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise DeriveError(f"unknown operation(s) {unknown}; known: {', '.join(ORDER)}")
    if len(set(names)) != len(names):
        raise DeriveError(f"an operation appears twice: {names}")
    return sorted(operations, key=lambda op: ORDER.index(op.name))


def derive(base: Path, out: Path, operations: list[Operation], seed: int = 0,
           resume: bool = False, prompts: list[str] | None = None, threads: int = 1) -> Derived:
    """Write the variant to ``out`` (a fresh copy of ``base`` each run; training resumes
    from ``out.scratch`` when ``resume``) and its manifest."""
    base, out = Path(base).resolve(), Path(out).resolve()
    if not (base / "model_index.json").is_file():
        raise DeriveError(f"BASE {str(base)!r} is not a diffusers folder (no model_index.json)")
    if not operations:
        raise DeriveError("no operation given: pass at least one of --quantize, --prune-ffn, "
                          "--drop-blocks, --student-layers, --distill-steps, --low-expert, "
                          "--light-decoder")
    if out == base or base in out.parents:
        raise DeriveError(f"OUT {str(out)!r} must not be BASE or inside it")
    if out.exists() and not resume and any(out.iterdir()):
        raise DeriveError(f"OUT {str(out)!r} exists and is not empty; pass --resume to "
                          f"continue a derive there, or choose another folder")
    scratch = out.with_name(out.name + ".scratch")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(MANIFEST))
    entries = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, op in enumerate(ordered(operations)):
            ctx = DeriveContext(base=base, work=out, seed=seed, resume=resume,
                                scratch=scratch / f"{i}-{op.name}", prompts=list(prompts or []),
                                threads=threads)
            ctx.scratch.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            entry = {"operation": op.name, "settings": op.settings(), **op.apply(ctx)}
            entry.setdefault("seconds", round(time.monotonic() - started, 1))
            entries.append(entry)
    finally:
        torch.set_num_threads(threads_before)
    manifest = write_manifest(out, base, seed, entries)
    return Derived(out, manifest, expert_shape(out))


def expert_shape(folder: Path) -> dict:
    """layers, ffn_dim (the larger expert's), params_b per expert (the larger), and bytes
    per parameter as stored (weights' bytes / parameters, over the experts' files)."""
    params, stored, layers, ffn = 0, 0, 0, 0
    for name in EXPERTS:
        config_path = Path(folder) / name / "config.json"
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        layers, ffn = max(layers, config["num_layers"]), max(ffn, config["ffn_dim"])
        count = _parameter_count(Path(folder) / name)
        params = max(params, count)
        stored += sum(p.stat().st_size for p in (Path(folder) / name).iterdir()
                      if p.suffix in (".safetensors", ".bin"))
    experts = sum((Path(folder) / n / "config.json").is_file() for n in EXPERTS)
    return {"layers": layers, "ffn_dim": ffn, "params_b": params / 1e9,
            "bytes_per_param": round(stored / max(1, params * experts), 3)}


def _parameter_count(expert_dir: Path) -> int:
    """Parameters of an expert folder's weights, counted from the tensors' shapes (a
    quantized weight counts its logical elements, not its bytes or its scales)."""
    from workers.wan_pipeline import WanT2V  # noqa: F401  (torchao's tensors register here)

    total = 0
    for path in expert_dir.iterdir():
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                for key in fh.keys():
                    # torchao's layout stores a weight as ._weight_qdata (its elements) with
                    # ._weight_scale / ._weight_zero_point beside it: storage, not parameters.
                    if key.endswith(("._weight_scale", "._weight_zero_point")):
                        continue
                    total += _numel(fh.get_slice(key).get_shape())
        elif path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=False)
            total += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
