"""Derived variants in the catalog: the entry `farm models derive` registers (issue #12).

The entry is the base's, with what the derive changed: its folder, shape (layers, FFN
width, parameters, bytes per parameter as stored, so `farm rules check` sizes its memory
from the real weights), the steps and guidance its training says to render with, and a
quantization applied at load time. It goes into FARM_VARIANTS_FILE (an overlay the policy
reads over models.yaml); ``for_track`` also makes it the base's variant for that track.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from scheduler.catalog import ModelVariant

# Bytes per parameter of a quantization applied at load time (int8 data; fp8 likewise).
QUANTIZED_BYTES = {"int8-weight": 1.0, "int8-dynamic": 1.0, "fp8": 1.0}


def entry_for(base: ModelVariant, folder: Path, shape: dict, manifest: dict,
              quantize_on_load: str | None = None) -> dict:
    """The catalog entry of a variant derived from ``base`` (a plain dict, as in YAML)."""
    entry = base.model_dump(exclude={"name", "tracks", "bundled"}, exclude_none=True)
    entry.update(folder=str(folder), derived_from=base.name, layers=shape["layers"],
                 ffn_dim=shape["ffn_dim"],
                 params_b=max(shape["params_b"], 1e-9), bytes_per_param=shape["bytes_per_param"])
    for op in manifest["operations"]:
        render = op.get("render") or {}
        if "steps" in render:
            entry["default_steps"] = int(render["steps"])
        if "guidance" in render:
            entry["guidance"] = {"high": float(render["guidance"]),
                                 "low": float(render["guidance"])}
        if op.get("operation") == "quantize" and not op.get("on_load"):
            entry.pop("quantize_on_load", None)
            entry["quantized"] = op["settings"]["mode"]
    # A base quantized at load keeps being so (its derived folder holds float weights).
    quantize_on_load = quantize_on_load or entry.get("quantize_on_load")
    if quantize_on_load:
        entry["quantize_on_load"] = quantize_on_load
        entry["bytes_per_param"] = QUANTIZED_BYTES[quantize_on_load]
    return entry


def register(variants_file: Path, name: str, entry: dict, base: str,
             for_track: str | None = None,
             validate: Callable[[Path], None] = lambda _path: None) -> None:
    """Add (or replace) ``name`` in the variants file; with ``for_track``, the base renders
    that track with it. The new file is written beside the old one and ``validate``d (a
    policy load) before it replaces it: a bad entry never reaches the farm."""
    variants_file = Path(variants_file)
    doc = yaml.safe_load(variants_file.read_text()) if variants_file.is_file() else None
    doc = doc or {}
    models = doc.setdefault("models", {})
    models[name] = entry
    if for_track:
        tracks = models.setdefault(base, {}).setdefault("tracks", {})
        tracks[for_track] = name
    variants_file.parent.mkdir(parents=True, exist_ok=True)
    new = variants_file.with_name(variants_file.name + ".new")
    new.write_text(
        "# Variants registered by `farm models derive` (issue #12); read over models.yaml.\n"
        + yaml.safe_dump(doc, sort_keys=False))
    try:
        validate(new)
    except Exception:
        new.unlink()
        raise
    new.replace(variants_file)
