"""Alembic: an empty database upgrades to head and downgrades back; models match the schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.migrate import current_heads, downgrade, upgrade
from app.db.models import Base

TABLES = {"tenants", "api_keys", "hub_tokens", "uploaded_files", "jobs", "job_events",
          "artifacts", "workers"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def _version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_to_head_creates_every_table(empty_database_url):
    upgrade(empty_database_url)
    assert TABLES <= _tables(empty_database_url)
    assert (_version(empty_database_url),) == current_heads()


def test_downgrade_to_base_removes_every_table_and_upgrade_again_works(empty_database_url):
    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) & TABLES == set()
    assert _version(empty_database_url) is None
    upgrade(empty_database_url)
    assert TABLES <= _tables(empty_database_url)


def test_models_match_the_migrated_schema(empty_database_url):
    upgrade(empty_database_url)
    assert _diff(empty_database_url) == []
