"""derive.json: where a derived variant came from and what it measured (issue #12).

{"format": 1, "base": {"folder", "sha256"}, "seed", "operations": [entry, ...],
 "measured": {...} | null, "sha256": weights of this folder}. A weights sha256 is over every
weight file of the folder (``*.safetensors``, ``*.bin``, ``*.pt``) in sorted path order, path
and bytes, so a renamed or changed file changes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "derive.json"
FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(folder: Path) -> str:
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(folder: Path, base: Path, seed: int, operations: list[dict],
                   measured: dict | None = None) -> dict:
    """Write OUT/derive.json; a base that is itself derived keeps its chain (``base.derive``)."""
    base = Path(base)
    manifest = {"format": FORMAT,
                "base": {"folder": str(base.resolve()), "sha256": weights_sha256(base),
                         "derive": read_manifest(base)},
                "seed": seed, "operations": operations, "measured": measured,
                "sha256": weights_sha256(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
