"""Batched renders on one actor (issue #15, item 2): like requests through the transformer
together, along the batch dimension."""

from __future__ import annotations


class BatchRenderMixin:
    """RenderWorker's batched render (workers/actor.py inherits it)."""
