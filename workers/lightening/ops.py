"""What every derive operation gets and gives (workers/lightening/derive.py runs them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass
class DeriveContext:
    base: Path  # the base variant's folder (diffusers layout); never written
    work: Path  # the folder being derived: the previous operation's result, rewritten in place
    seed: int  # every random draw of an operation comes from this
    resume: bool  # continue a training run from its last checkpoint in ``scratch``
    scratch: Path  # the operation's own folder for training checkpoints (kept for --resume)
    prompts: list[str] = field(default_factory=list)  # training captions; [] = the op's default
    threads: int = 1  # torch threads for training

    def note(self, message: str) -> None:
        log.info("%s: %s", self.work.name, message)


class Operation(Protocol):
    """One step of a derive: a name, its settings, and ``apply`` that rewrites ``ctx.work``
    and returns its manifest entry (settings, method, training data and steps, seconds)."""

    name: str

    def settings(self) -> dict: ...

    def apply(self, ctx: DeriveContext) -> dict: ...


class DeriveError(ValueError):
    """An operation that cannot run on this folder; the message names the option and value."""
