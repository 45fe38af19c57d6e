"""Databases of a test module's own, for tests of the job service and what writes beside it:
their half-finished jobs must not hold the session farm's GPUs (admission counts them)."""

from __future__ import annotations

import pytest

from farm.db.migrate import upgrade
from tests.conftest import RUN_ID, drop_database, make_database


@pytest.fixture(scope="module")
def own_pg(request):
    """A PostgreSQL database for this module alone, migrated to head, dropped after it."""
    name = f"farm_{request.module.__name__.rsplit('.', 1)[-1]}_{RUN_ID}"
    url = make_database(name)
    upgrade(url)
    yield url
    drop_database(name)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request, tmp_path):
    """The module's PostgreSQL database, then a fresh SQLite one: the same code on both."""
    if request.param == "postgresql":
        return request.getfixturevalue("own_pg")
    url = f"sqlite:///{tmp_path}/farm.db"
    upgrade(url)
    return url
