"""The Alembic revisions build exactly the models' schema, and downgrade cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from farm.db.migrate import downgrade, upgrade
from farm.db.models import Base
from farm.db.session import get_engine
from tests.conftest import RUN_ID, drop_database, make_database


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    name = f"farm_mig_{RUN_ID}"
    url = make_database(name)
    yield url
    drop_database(name)


def test_upgrade_matches_models_and_downgrade_removes_all(empty_db):
    upgrade(empty_db)
    engine = get_engine(empty_db)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert {"jobs", "segments"} <= set(inspect(engine).get_table_names())
    downgrade(empty_db, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(empty_db)
    assert {"jobs", "segments"} <= set(inspect(engine).get_table_names())
    engine.dispose()
