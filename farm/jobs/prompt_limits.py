"""Prompts longer than the model's text encoder reads are refused, not silently cut.

The count comes from the model's own tokenizer (`tokenizer/tokenizer.json`, read with the
`tokenizers` library: no torch in the API process); the limit is the tokenizer's
`model_max_length`, at most Wan's 512.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

WAN_TEXT_LEN = 512


@lru_cache(maxsize=16)
def _tokenizer(folder: str):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        return None, WAN_TEXT_LEN
    config = path / "tokenizer_config.json"
    limit = WAN_TEXT_LEN
    if config.is_file():
        limit = min(WAN_TEXT_LEN, int(json.loads(config.read_text()).get("model_max_length",
                                                                          WAN_TEXT_LEN)))
    return Tokenizer.from_file(str(path / "tokenizer.json")), limit


def too_long(folder: Path, text: str) -> tuple[int, int] | None:
    """(tokens, limit) when ``text`` is over the limit of the model in ``folder``; None when
    it fits or the model has no tokenizer file here (the worker checks no more)."""
    tokenizer, limit = _tokenizer(str(folder))
    if tokenizer is None:
        return None
    count = len(tokenizer.encode(text).ids)
    return (count, limit) if count > limit else None
