"""Batched renders on one actor group (issue #15, item 2)."""

from __future__ import annotations


class BatchGroupMixin:
    """ActorGroup's batched render (workers/group.py inherits it)."""
