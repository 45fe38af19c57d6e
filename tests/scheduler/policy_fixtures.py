"""The shipped tiers, models and rules, parsed; and small rule files for the tests."""

from __future__ import annotations

from pathlib import Path

import scheduler
from scheduler.catalog import parse_catalog
from scheduler.rules import parse_rules

CONFIG = Path(scheduler.__file__).parent / "config"


def shipped_catalog():
    return parse_catalog((CONFIG / "tiers.yaml").read_text(), (CONFIG / "models.yaml").read_text())


def shipped_rules(catalog=None):
    return parse_rules((CONFIG / "rules.yaml").read_text(), catalog or shipped_catalog())
