"""The Alembic revisions build exactly the models' schema, and downgrade cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from farm.db.migrate import downgrade, upgrade
from farm.db.tables import Base
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


def test_upgrading_keeps_existing_jobs_and_segments(empty_db):
    """0001 -> head on a database with data: nothing is lost (on SQLite the jobs table is
    rebuilt, which must not cascade into segments)."""
    from sqlalchemy import text

    upgrade(empty_db, "0001")
    engine = get_engine(empty_db)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, state, prompt, negative_prompt, model, width, height, frames,"
            " fps, steps, guidance_high, guidance_low, seed, priority, route, progress,"
            " created_at, updated_at) VALUES ('j1', 'succeeded', 'p', '', 'wan-tiny', 64, 64, 5,"
            " 16, 2, 4, 3, 1, 50, '{}', 1, '2026-11-21 10:00:00+00', '2026-11-21 10:00:00+00')"))
        conn.execute(text(
            "INSERT INTO segments (job_id, \"index\", state, frame_start, render_frames,"
            " skip_frames, seed, progress, attempts, chunk_keys) VALUES"
            " ('j1', 0, 'done', 0, 5, 0, 1, 1, 1, '[]')"))
    upgrade(empty_db)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM segments")).scalar() == 1
        row = conn.execute(text("SELECT project, dispatched_at FROM jobs")).one()
        assert row.project == "default" and row.dispatched_at is not None
    downgrade(empty_db, "0001")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM segments")).scalar() == 1
    engine.dispose()


# Migration 0006 (jobs.continuous): existing jobs stay independent clips; downgrade drops it.
JOB = ("INSERT INTO jobs (id, state, prompt, negative_prompt, model, width, height, frames,"
       " fps, steps, guidance_high, guidance_low, seed, priority, route, progress,"
       " created_at, updated_at) VALUES ('j1', 'succeeded', 'p', '', 'wan-tiny', 64, 64, 33,"
       " 16, 2, 4, 3, 1, 50, '{}', 1, '2026-11-21 10:00:00+00', '2026-11-21 10:00:00+00')")


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
