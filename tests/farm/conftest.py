"""Databases of a test module's own, for tests of the job service and what writes beside it:
their half-finished jobs must not hold the session farm's GPUs (admission counts them)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from farm.db.migrate import upgrade
from farm.db.session import get_engine
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


@pytest.fixture()
def db(own_pg):
    """The module's PostgreSQL database emptied of jobs (and what hangs off them) and group
    leases: each test sees only its own (a module may define its own ``db``)."""
    with get_engine(own_pg).begin() as conn:
        conn.execute(text("TRUNCATE jobs, group_leases CASCADE"))
    return own_pg


@pytest.fixture()
def own(settings, db):
    """The session's settings on ``db`` (a module may define its own ``own``)."""
    return settings.model_copy(update={"database_url": db})
