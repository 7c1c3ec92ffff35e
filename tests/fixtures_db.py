"""Database fixtures: every storage test runs on SQLite, and on PostgreSQL when
SHOAL_TEST_POSTGRES_URL is set (skipped visibly otherwise).

Each PostgreSQL test gets a database of its own, created from the server URL and dropped after,
so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shoal.db import Database, normalise_url

POSTGRES_URL = os.environ.get("SHOAL_TEST_POSTGRES_URL", "")


def postgres_database() -> Iterator[str]:
    base = make_url(normalise_url(POSTGRES_URL))
    name = f"shoal_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    yield from postgres_database()


@pytest.fixture
def new_database_url(tmp_path: Path) -> Iterator[object]:
    """A factory for more fresh databases of the same kind inside one test (one per service)."""
    made: list[Iterator[str]] = []

    def make(kind: str, name: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'{name}.db'}"
        gen = postgres_database()
        made.append(gen)
        return next(gen)

    yield make
    for gen in made:
        for _ in gen:
            pass


def module_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, migrations: Path, name: str
) -> Iterator[Database]:
    """The body of a module-scoped, migrated database fixture parametrised `sqlite`/`postgres`:
    tests that store into workspaces of their own share it, and PostgreSQL pays for CREATE
    DATABASE and the migrations once per module."""
    made: Iterator[str] | None = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp(name) / f'{name}.db'}"
    elif not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    else:
        made = postgres_database()
        url = next(made)
    database = Database(url, migrations_dir=migrations)
    database.migrate()
    yield database
    database.engine.dispose()
    if made is not None:
        for _ in made:
            pass
