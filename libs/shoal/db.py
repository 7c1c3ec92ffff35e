"""One database per service: engine, sessions, migrations, off the event loop.

The same code runs on SQLite (the embedded default: WAL, synchronous=NORMAL, one file per
service) and PostgreSQL (`<SERVICE>_DATABASE_URL`). Work runs in a thread through `Database.run`
so a query never blocks the gRPC or NATS loop; on SQLite that thread is a single writer, which
is what SQLite wants anyway (no "database is locked" between our own connections).

Each service declares its tables on its own registry (`new_registry()`), so tests that host
several services in one process never create one service's tables in another's database.
Schema changes go through alembic migrations kept beside each service (`migrations/`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import registry
from sqlmodel import Session

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def new_registry() -> registry:
    """A registry with its own MetaData, for one service's tables."""
    return registry(metadata=MetaData())


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and use the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalise_url(url)).get_backend_name() == "sqlite"


SQLITE_WAL_AUTOCHECKPOINT_PAGES = 10_000


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    url = normalise_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers run beside the writer; NORMAL syncs at checkpoints, not per commit.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Checkpoint every 10,000 WAL pages (~40 MB, reused, not regrown) instead of SQLite's
            # 1,000: a hot batch (1,000 claims, holds or events over random-key indexes) dirties
            # ~1,000 pages, so the default ran a checkpoint (two fsyncs, and the same hot pages
            # copied back again) after nearly every commit, stalling the one database thread.
            # The price: with synchronous=NORMAL, a power loss (not a process crash) can roll
            # back the commits since the last checkpoint, a few seconds of them (design.md §6).
            cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
            cursor.close()

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _plan_afresh(dbapi_connection: Any, _record: Any) -> None:
        # psycopg prepares a statement server-side after 5 runs, and PostgreSQL may then keep a
        # generic plan made while a table was small: a sequential scan for a key lookup that
        # grows with the table (measured on billing's holds: 20 ms -> 900 ms per 500-key batch
        # within one run). Planning each statement afresh costs far less than that.
        dbapi_connection.prepare_threshold = None

    return engine


def migrate(engine: Engine, migrations_dir: Path) -> None:
    """Bring the schema to the newest revision of `migrations_dir` (alembic upgrade head)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def run_migrations_env(target_metadata: MetaData) -> None:
    """The body of every service's migrations/env.py (online mode, connection handed in)."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        # `alembic` run by hand: take the URL from -x url=... .
        url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///:memory:")
        engine = make_engine(url)
        with engine.begin() as conn:
            _configure_and_run(context, conn, target_metadata)
        return
    _configure_and_run(context, connection, target_metadata)


def _configure_and_run(context: Any, connection: Any, target_metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


class Database:
    """An engine plus an executor that runs session work off the event loop."""

    def __init__(self, url: str, *, migrations_dir: Path | None = None, threads: int | None = None) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.sqlite = is_sqlite(self.url)
        workers = threads or (1 if self.sqlite else 8)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")
        self.migrations_dir = migrations_dir

    def migrate(self) -> None:
        if self.migrations_dir is not None:
            migrate(self.engine, self.migrations_dir)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(session, *args, **kwargs)` in one transaction, in the database thread."""

        def work() -> T:
            with self.session() as session:
                return fn(session, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` (no session) in the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def revision(service: str, message: str) -> None:
    """Autogenerate a migration for `services.<service>` against an up-to-date scratch database."""
    import importlib
    import tempfile

    models = importlib.import_module(f"services.{service}.models")
    migrations_dir = Path(str(models.__file__)).parent / "migrations"
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/scratch.db")
        migrate(engine, migrations_dir)
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir))
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.revision(cfg, message=message, autogenerate=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "revision":
        print("usage: python -m shoal.db revision <service> <message>", file=sys.stderr)  # noqa: T201
        raise SystemExit(2)
    revision(sys.argv[2], sys.argv[3])
