"""Migration 0005 (jobs.continuous): existing jobs stay independent clips; downgrade drops it."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from farm.db.migrate import downgrade, upgrade
from farm.db.session import get_engine
from tests.conftest import RUN_ID, drop_database, make_database

JOB = ("INSERT INTO jobs (id, state, prompt, negative_prompt, model, width, height, frames,"
       " fps, steps, guidance_high, guidance_low, seed, priority, route, progress,"
       " created_at, updated_at) VALUES ('j1', 'succeeded', 'p', '', 'wan-tiny', 64, 64, 33,"
       " 16, 2, 4, 3, 1, 50, '{}', 1, '2026-11-21 10:00:00+00', '2026-11-21 10:00:00+00')")


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    name = f"farm_mig5_{RUN_ID}"
    url = make_database(name)
    yield url
    drop_database(name)


def _columns(engine) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("jobs")}


def test_continuous_column_up_and_down(empty_db):
    upgrade(empty_db, "0005")
    engine = get_engine(empty_db)
    with engine.begin() as conn:
        conn.execute(text(JOB))
    upgrade(empty_db, "0006")
    assert "continuous" in _columns(engine)
    with engine.connect() as conn:
        # Rendered before continuations existed: independent clips.
        assert conn.execute(text("SELECT continuous FROM jobs WHERE id = 'j1'")).scalar() \
            in (False, 0)
    downgrade(empty_db, "0005")
    assert "continuous" not in _columns(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
    engine.dispose()
