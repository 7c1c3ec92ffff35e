"""The durable log of accepted messages, and de-duplication by idempotency key across restarts.

stdlib sqlite3 on one dedicated thread: SQLite allows one writer anyway, a single thread keeps
the connection private to it, and the event loop never blocks on disk. WAL with
synchronous=NORMAL survives a killed process (a committed transaction is in the WAL file before
COMMIT returns); it may lose the last transactions on power loss, which a simulator can accept.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from services.sandbox.carrier import Message

T = TypeVar("T")

SCHEMA_VERSION = 1
# 64 MiB of page cache: the idempotency-key index takes inserts at random places, and with
# SQLite's 2 MiB default a long run keeps re-reading its pages.
_CACHE_KIB = 65536
# Checkpoint every 16k pages (64 MiB of WAL) instead of 1k: pages written again and again in
# between (index pages above all) are copied to the database once. Durability is the WAL's either way.
_CHECKPOINT_PAGES = 16384
# Below SQLite's bound-variable limit, with room to spare.
_IN_CHUNK = 500
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    provider_message_id TEXT NOT NULL UNIQUE,
    workspace_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    to_address TEXT NOT NULL,
    subject TEXT,
    text TEXT,
    html TEXT,
    payload TEXT NOT NULL,
    accepted_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_messages_to ON messages (to_address, seq);
CREATE INDEX IF NOT EXISTS ix_messages_workspace ON messages (workspace_id, seq);
"""
_COLUMNS = (
    "seq, idempotency_key, provider_message_id, workspace_id, channel, to_address, subject, text, html,"
    " payload, accepted_at"
)
_INSERT = (
    "INSERT INTO messages (idempotency_key, provider_message_id, workspace_id, channel, to_address,"
    " subject, text, html, payload, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)


class SchemaMismatch(RuntimeError):
    """The database file was written by a different version of the sandbox."""


def new_provider_message_ids(count: int) -> list[str]:
    """`count` fresh ids: `msg_`, the time in milliseconds (12 hex digits), 48 random bits.

    Time first, so each batch's ids land at the end of their unique index instead of at random
    pages all over it (a third of the insert cost with random ids); the random part keeps ids
    unique within a millisecond and across processes. One read of the random source per batch.
    """
    prefix = f"msg_{time.time_ns() // 1_000_000:012x}"
    noise = secrets.token_hex(6 * count)
    return [prefix + noise[i : i + 12] for i in range(0, 12 * count, 12)]


# Compact JSON without building an encoder per call (json.dumps does, given any option).
_dumps = json.JSONEncoder(separators=(",", ":")).encode


class Admission(NamedTuple):
    """The outcome of offering one message to the log."""

    idempotency_key: str
    provider_message_id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    idempotency_key: str
    provider_message_id: str
    workspace_id: str
    channel: str
    to: str
    subject: str | None
    text: str | None
    html: str | None
    payload: dict[str, Any]
    accepted_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "idempotency_key": self.idempotency_key,
            "provider_message_id": self.provider_message_id,
            "workspace_id": self.workspace_id,
            "channel": self.channel,
            "to": self.to,
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "payload": self.payload,
            "accepted_at": self.accepted_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """What `find` and `count` select; every field narrows the result when set."""

    key: str | None = None
    to: str | None = None
    workspace_id: str | None = None
    channel: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("idempotency_key", self.key),
            ("to_address", self.to),
            ("workspace_id", self.workspace_id),
            ("channel", self.channel),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        return (" AND ".join(clauses) or "1 = 1"), params


class MessageLog:
    """Async front of the SQLite log; every call runs on the log's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-store")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def admit(self, messages: Sequence[Message]) -> list[Admission]:
        """Store the messages whose keys are new, in one transaction; answer in input order."""
        if not messages:
            return []
        return await self._run(self._admit, list(messages))

    async def find(self, flt: MessageFilter, *, after: int = 0, limit: int = 100) -> list[StoredMessage]:
        return await self._run(self._find, flt, after, limit)

    async def count(self, flt: MessageFilter) -> int:
        return await self._run(self._count, flt)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("message log is not open")
        return self._conn

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and ended explicitly below, so one batch
        # is exactly one transaction.
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            conn.close()
            raise SchemaMismatch(
                f"{self.path} has schema version {version}, this sandbox writes {SCHEMA_VERSION}"
            )
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _admit(self, messages: list[Message]) -> list[Admission]:
        conn = self._connection()
        accepted_at = datetime.now(UTC).isoformat()
        offered = new_provider_message_ids(len(messages))
        rows = [
            (
                m.idempotency_key,
                offered_id,
                m.workspace_id,
                m.channel.value,
                m.to,
                m.subject,
                m.text,
                m.html,
                _dumps(m.payload),
                accepted_at,
            )
            for m, offered_id in zip(messages, offered, strict=True)
        ]
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            conn.executemany(_INSERT, rows)
            inserted = conn.total_changes - before
            stored: dict[str, str] | None = None
            if inserted < len(rows):
                # Some keys were known (earlier batch, earlier process, or twice in this batch):
                # read back which id each key holds; ours won exactly where the ids match.
                stored = self._ids_for([m.idempotency_key for m in messages])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if stored is None:
            return [
                Admission(m.idempotency_key, offered_id, False)
                for m, offered_id in zip(messages, offered, strict=True)
            ]
        return [
            Admission(m.idempotency_key, stored[m.idempotency_key], stored[m.idempotency_key] != offered_id)
            for m, offered_id in zip(messages, offered, strict=True)
        ]

    def _ids_for(self, keys: list[str]) -> dict[str, str]:
        conn = self._connection()
        unique = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for start in range(0, len(unique), _IN_CHUNK):
            chunk = unique[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            cursor = conn.execute(
                "SELECT idempotency_key, provider_message_id FROM messages"
                f" WHERE idempotency_key IN ({marks})",
                chunk,
            )
            found.update(cursor.fetchall())
        return found

    def _find(self, flt: MessageFilter, after: int, limit: int) -> list[StoredMessage]:
        where, params = flt.where()
        cursor = self._connection().execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
            [*params, after, limit],
        )
        return [
            StoredMessage(
                seq=row[0],
                idempotency_key=row[1],
                provider_message_id=row[2],
                workspace_id=row[3],
                channel=row[4],
                to=row[5],
                subject=row[6],
                text=row[7],
                html=row[8],
                payload=json.loads(row[9]),
                accepted_at=datetime.fromisoformat(row[10]),
            )
            for row in cursor.fetchall()
        ]

    def _count(self, flt: MessageFilter) -> int:
        where, params = flt.where()
        row = self._connection().execute(f"SELECT count(*) FROM messages WHERE {where}", params).fetchone()
        return int(row[0])
