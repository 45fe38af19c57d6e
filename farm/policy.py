"""The routing policy in force: tiers, catalog and rules read from the files in settings.

Loaded once per process (``get_policy``); every job records the rules file's sha256, so a
later change of rules can be audited against the routes jobs got.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import scheduler
from scheduler.catalog import Catalog, parse_catalog
from scheduler.rules import RuleSet, parse_rules

CONFIG_DIR = Path(scheduler.__file__).resolve().parent / "config"  # the shipped policy


@dataclass(frozen=True)
class Policy:
    catalog: Catalog
    rules: RuleSet


SHIPPED_VARIANTS = CONFIG_DIR / "variants.yaml"  # the toy's derived variants (issue #12)


def load_policy(tiers_file: Path | None = None, models_file: Path | None = None,
                rules_file: Path | None = None, variants_file: Path | None = None) -> Policy:
    """Read and validate the files (bundled defaults where None); PolicyError if bad.
    Variants: the shipped derived ones, then ``variants_file`` (what `farm models derive`
    registered on this machine) when it exists."""
    tiers_file = Path(tiers_file or CONFIG_DIR / "tiers.yaml")
    models_file = Path(models_file or CONFIG_DIR / "models.yaml")
    rules_file = Path(rules_file or CONFIG_DIR / "rules.yaml")
    overlays = tuple((path.read_text(), str(path)) for path in (SHIPPED_VARIANTS, variants_file)
                     if path is not None and Path(path).is_file())
    catalog = parse_catalog(tiers_file.read_text(), models_file.read_text(),
                            str(tiers_file), str(models_file), overlays)
    return Policy(catalog, parse_rules(rules_file.read_text(), catalog, str(rules_file)))


@lru_cache(maxsize=1)
def get_policy() -> Policy:
    from farm.settings import get_settings

    settings = get_settings()
    return load_policy(settings.tiers_file, settings.models_file, settings.rules_file,
                       settings.variants_file)
