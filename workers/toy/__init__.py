"""The farm's small model: a procedural world, its judge, training and evaluation."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"  # weights shipped with the project
