"""Storage of runs, executions and sends: Core bulk statements, compare-and-set moves.

Every function takes the session of the caller's transaction. Run counters are moved in the same
transaction as the executions they count, so `GetRunCounts` is one row read at any scale.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Dialect,
    and_,
    bindparam,
    insert,
    literal,
    or_,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement
from sqlmodel import Session

from services.execution.models import PENDING_STATE, PROCESSING_STATE, Execution, Run, Send
from shoal.v1 import execution_pb2 as epb

PENDING = epb.EXECUTION_STATE_PENDING
PROCESSING = epb.EXECUTION_STATE_PROCESSING
COMPLETED = epb.EXECUTION_STATE_COMPLETED
FAILED = epb.EXECUTION_STATE_FAILED
SKIPPED = epb.EXECUTION_STATE_SKIPPED
TERMINAL = (COMPLETED, FAILED, SKIPPED)
_COUNTER: dict[int, str] = {
    PENDING: "pending",
    PROCESSING: "processing",
    COMPLETED: "completed",
    FAILED: "failed",
    SKIPPED: "skipped",
}

E = Execution.__table__  # type: ignore[attr-defined]
R = Run.__table__  # type: ignore[attr-defined]
S = Send.__table__  # type: ignore[attr-defined]


def now() -> datetime:
    return datetime.now(UTC)


if (PENDING, PROCESSING) != (PENDING_STATE, PROCESSING_STATE):
    raise RuntimeError("models.py's literal states no longer match shoal.v1.ExecutionState")


def state_is(state: int) -> Any:
    """`state = <literal>`: the partial indexes (models.py) are only usable with a literal, since
    a planner cannot prove that a bound parameter matches the index's WHERE."""
    return E.c.state == literal(state, literal_execute=True)


@dataclass
class ExecRow:
    """The fields of an executions row a worker needs (a plain object, not an ORM instance)."""

    id: str
    workspace_id: str
    campaign_id: str
    run_id: str
    contact_id: str
    state: int
    node_id: str
    step_seq: int
    reason: str
    ab_variant: str
    wake_at: datetime | None
    traceparent: str


_EXEC_COLUMNS = (
    E.c.id,
    E.c.workspace_id,
    E.c.campaign_id,
    E.c.run_id,
    E.c.contact_id,
    E.c.state,
    E.c.node_id,
    E.c.step_seq,
    E.c.reason,
    E.c.ab_variant,
    E.c.wake_at,
    E.c.traceparent,
)


def _row(r: Any) -> ExecRow:
    return ExecRow(*r)


class BulkStatement:
    """A statement compiled once per dialect and run with the driver's own executemany.

    SQLAlchemy's executemany processes every parameter of every row in Python (bind processors,
    insertmanyvalues batching); on the hot paths that cost more than the database work. Here the
    rows are handed to `cursor.executemany` as they are, so callers pass only values the driver
    takes natively (str, int, None) and timestamps already converted with `db_time`, which
    applies the column type's own bind processing once per batch instead of once per value.
    """

    def __init__(self, stmt: ClauseElement, names: Sequence[str]) -> None:
        self.stmt = stmt
        self.names = tuple(names)
        self._compiled: dict[str, _Compiled] = {}

    def _sql(self, dialect: Dialect) -> _Compiled:
        hit = self._compiled.get(dialect.name)
        if hit is None:
            compiled = cast(SQLCompiler, self.stmt.compile(dialect=dialect))
            # Literals in the statement (state=PENDING, ...) became bind parameters: their values
            # are fixed, so they are converted once here.
            constants: dict[str, Any] = {}
            for name, value in compiled.params.items():
                if name in self.names:
                    continue
                processor = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                constants[name] = processor(value) if processor is not None else value
            if compiled.positional:
                order = tuple(compiled.positiontup or ())
                if order == self.names:
                    hit = _Compiled(compiled.string, None, (), None)
                else:
                    # Each placeholder picks from the row followed by the constants (itemgetter
                    # is C: no Python loop per value).
                    extra = tuple(n for n in order if n not in self.names)
                    pool = self.names + extra
                    index = [pool.index(n) for n in order]
                    # itemgetter of one index returns the value itself, not a 1-tuple.
                    pick = operator.itemgetter(*index) if len(index) > 1 else lambda r: (r[index[0]],)
                    hit = _Compiled(compiled.string, pick, tuple(constants[n] for n in extra), None)
            else:
                hit = _Compiled(compiled.string, None, (), constants)
            self._compiled[dialect.name] = hit
        return hit

    def run(self, session: Session, rows: Sequence[tuple[Any, ...]]) -> int:
        """Execute for every row (a tuple of values in `names` order); the driver's rowcount
        (on SQLite the sum over the rows; other drivers may report only the last row's)."""
        if not rows:
            return 0
        conn: Connection = session.connection()
        c = self._sql(conn.dialect)
        params: Sequence[Any]
        if c.named is not None:
            params = [dict(zip(self.names, r, strict=True)) | c.named for r in rows]
        elif c.pick is None:
            params = rows
        else:
            pick, constants = c.pick, c.constants
            params = [pick(r + constants) for r in rows]
        return int(cast(CursorResult[Any], conn.exec_driver_sql(c.sql, params)).rowcount)


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    # Positional drivers: builds a row's parameters from (row + constants); None when the
    # placeholders are exactly the row's values in order.
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None
    constants: tuple[Any, ...]
    # Named drivers: the constants to add to every row's dict.
    named: dict[str, Any] | None


def db_time(session: Session, value: datetime | None) -> Any:
    """A timestamp as the UTCDateTime columns store it on this dialect (for `BulkStatement`)."""
    if value is None:
        return None
    dialect = session.connection().dialect
    processor = _TIME_PROCESSORS.get(dialect.name)
    if processor is None:
        # dialect_impl: the dialect's own type (on SQLite it renders the stored string format).
        processor = _TIME_PROCESSORS[dialect.name] = E.c.created_at.type.dialect_impl(dialect).bind_processor(
            dialect
        ) or (lambda v: v)
    return processor(value)


_TIME_PROCESSORS: dict[str, Any] = {}


# -- set-based batch statements ------------------------------------------------------------------
#
# The claim and the finish of a batch are one statement each, written once per dialect: the
# batch travels as a single parameter (a JSON array read by `json_each` on SQLite, one array per
# column `unnest`ed on PostgreSQL) and is joined to the executions by primary key. No IN list is
# expanded and nothing is compiled per batch, and RETURNING says exactly which rows moved.

_DIALECTS = ("sqlite", "postgresql")


def _batch_statement(
    template: str, columns: Sequence[tuple[str, str]], scalars: Sequence[str]
) -> dict[str, str]:
    """`template` with `{batch}` (a table `b` of `columns`, given as (name, PostgreSQL type)) and
    `{name}` placeholders for the scalar parameters, written out for each dialect."""
    names = [n for n, _ in columns]
    sqlite_batch = (
        "(SELECT "
        + ", ".join(f"value ->> {i} AS {n}" for i, n in enumerate(names))
        + " FROM json_each(:batch)) AS b"
    )
    pg_batch = "unnest(" + ", ".join(f"%({n})s::{t}[]" for n, t in columns) + f") AS b({', '.join(names)})"
    return {
        "sqlite": template.format(batch=sqlite_batch, **{s: f":{s}" for s in scalars}),
        "postgresql": template.format(batch=pg_batch, **{s: f"%({s})s" for s in scalars}),
    }


def _dialect(session: Session) -> str:
    """The session's dialect name, if the execution service supports it."""
    name = session.connection().dialect.name
    if name not in _DIALECTS:
        raise RuntimeError(f"the execution service supports {', '.join(_DIALECTS)}, not {name}")
    return name


def _sql(statement: dict[str, str], dialect: str) -> str:
    try:
        return statement[dialect]
    except KeyError:
        raise RuntimeError(f"the execution service supports {', '.join(_DIALECTS)}, not {dialect}") from None


def _batch_params(
    dialect: str, scalars: dict[str, Any], *columns: tuple[str, str, list[Any]]
) -> dict[str, Any]:
    """Parameters of a `_batch_statement`: the scalars plus the batch, column by column."""
    if dialect == "sqlite":
        return scalars | {"batch": json.dumps(list(zip(*(values for _, _, values in columns), strict=True)))}
    return scalars | {name: values for name, _, values in columns}


_EXEC_SQL_COLUMNS = ", ".join(f"{E.name}.{c.name}" for c in _EXEC_COLUMNS)
_RESULT_TIME: dict[str, Any] = {}


def _exec_rows(conn: Connection, rows: Sequence[Any]) -> list[ExecRow]:
    """ExecRows from a driver-level RETURNING of `_EXEC_SQL_COLUMNS` (timestamps converted as
    the ORM converts them)."""
    dialect = conn.dialect
    convert = _RESULT_TIME.get(dialect.name)
    if convert is None:
        convert = _RESULT_TIME[dialect.name] = E.c.wake_at.type.dialect_impl(dialect).result_processor(
            dialect, None
        ) or (lambda v: v)
    out = []
    for r in rows:
        row = ExecRow(*r)
        if row.wake_at is not None:
            row.wake_at = convert(row.wake_at)
        out.append(row)
    return out


# Both plans loop over the batch and find each execution by primary key (EXPLAIN QUERY PLAN on
# SQLite: SCAN json_each, SEARCH executions USING INDEX sqlite_autoindex_executions_1 (id=?)),
# never over the pending rows of a partial index, however many are pending.
_CLAIM = _batch_statement(
    f"UPDATE {E.name} SET state = {PROCESSING}, lease_until = {{lease}}, updated_at = {{t}} "
    "FROM {batch} "
    f"WHERE {E.name}.id = b.cid AND {E.name}.step_seq = b.cseq AND {E.name}.state = {PENDING} "
    f"RETURNING {_EXEC_SQL_COLUMNS}",
    [("cid", "text"), ("cseq", "bigint")],
    ["lease", "t"],
)

_FINISH = _batch_statement(
    f"UPDATE {E.name} SET state = b.fstate, node_id = b.fnode, step_seq = {E.name}.step_seq + 1, "
    "reason = b.freason, ab_variant = b.fab, wake_at = b.fwake, nudge_at = b.fnudge, "
    "lease_until = NULL, updated_at = {t} "
    "FROM {batch} "
    # A worker whose lease expired (another took the execution over) writes nothing.
    f"WHERE {E.name}.id = b.fid AND {E.name}.state = {PROCESSING} AND {E.name}.step_seq = b.fseq "
    f"RETURNING {E.name}.id",
    [
        ("fid", "text"),
        ("fseq", "bigint"),
        ("fstate", "integer"),
        ("fnode", "text"),
        ("freason", "text"),
        ("fab", "text"),
        ("fwake", "timestamptz"),
        ("fnudge", "timestamptz"),
    ],
    ["t"],
)


# -- runs ----------------------------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    run_id: str,
    workspace_id: str,
    campaign_id: str,
    flow_version: int,
    flow: bytes,
    segment_id: str,
    recipients: Sequence[str],
    data: dict[str, Any],
    open_ended: bool,
) -> bool:
    """Register a run; False when it already exists (StartRun is idempotent per run id)."""
    if session.execute(select(R.c.id).where(R.c.id == run_id)).first() is not None:
        return False
    session.execute(
        insert(R).values(
            id=run_id,
            workspace_id=workspace_id,
            campaign_id=campaign_id,
            flow_version=flow_version,
            flow=flow,
            segment_id=segment_id,
            recipients=json.dumps(list(recipients)) if recipients else "",
            data=json.dumps(data),
            open_ended=open_ended,
            fanout_cursor="",
            fanout_done=False,
            fanout_owner="",
            pending=0,
            processing=0,
            completed=0,
            failed=0,
            skipped=0,
            sent=0,
            created_at=now(),
            updated_at=now(),
        )
    )
    return True


def get_run(session: Session, *, run_id: str, workspace_id: str | None = None) -> Any:
    q = select(R).where(R.c.id == run_id)
    if workspace_id is not None:
        q = q.where(R.c.workspace_id == workspace_id)
    return session.execute(q).first()


def runs_needing_fanout(session: Session) -> list[str]:
    return [r[0] for r in session.execute(select(R.c.id).where(R.c.fanout_done.is_(False))).all()]


def claim_fanout(session: Session, *, run_id: str, owner: str, lease: timedelta) -> bool:
    """Take (or renew) the right to fan out a run, so two processes never fan out one run."""
    t = now()
    result = session.execute(
        update(R)
        .where(
            R.c.id == run_id,
            R.c.fanout_done.is_(False),
            or_(R.c.fanout_owner == owner, R.c.fanout_owner == "", R.c.fanout_lease_until < t),
        )
        .values(fanout_owner=owner, fanout_lease_until=t + lease)
    )
    return bool(cast(CursorResult[Any], result).rowcount)


_COUNTERS = ("pending", "processing", "completed", "failed", "skipped", "sent")
# Every counter moves by its delta (zero for most): one statement compiled once, for any delta.
_MOVE_COUNTERS = BulkStatement(
    update(R)
    .where(R.c.id == bindparam("run_id"))
    .values({n: getattr(R.c, n) + bindparam(f"d_{n}") for n in _COUNTERS} | {"updated_at": bindparam("t")}),
    (*(f"d_{n}" for n in _COUNTERS), "t", "run_id"),
)


def move_counters(session: Session, deltas: dict[str, Counter[str]]) -> None:
    """Apply counter deltas per run: {run_id: Counter({"pending": -3, "completed": 3})}."""
    unknown = {name for delta in deltas.values() for name in delta} - set(_COUNTERS)
    if unknown:
        raise ValueError(f"unknown run counters {sorted(unknown)}")
    t = db_time(session, now())
    rows = [
        (*(delta.get(n, 0) for n in _COUNTERS), t, run_id)
        for run_id, delta in deltas.items()
        if any(delta.values())
    ]
    _MOVE_COUNTERS.run(session, rows)


def counters_of(session: Session, run_ids: Iterable[str]) -> list[Any]:
    ids = list(run_ids)
    if not ids:
        return []
    return list(
        session.execute(
            select(
                R.c.id,
                R.c.workspace_id,
                R.c.campaign_id,
                R.c.pending,
                R.c.processing,
                R.c.completed,
                R.c.failed,
                R.c.skipped,
                R.c.sent,
                R.c.fanout_done,
                R.c.open_ended,
            ).where(R.c.id.in_(ids))
        ).all()
    )


# -- executions ----------------------------------------------------------------------------------


# Only what varies per row is a parameter; the rest is the same for the whole page.
_INSERT_EXECUTION_COLUMNS = (
    "id",
    "workspace_id",
    "campaign_id",
    "run_id",
    "contact_id",
    "entry",
    "node_id",
    "nudge_at",
    "traceparent",
    "created_at",
)
# An execution already there (a fan-out page read again after a crash: same deterministic id)
# is left as it is; the driver's row count says how many rows are new.
_INSERT_EXECUTIONS = {
    dialect: BulkStatement(
        insert_of(E)
        .values(
            {c: bindparam(c) for c in _INSERT_EXECUTION_COLUMNS}
            | {
                "state": PENDING,
                "step_seq": 0,
                "reason": "",
                "ab_variant": "",
                "wake_at": None,
                "lease_until": None,
                "updated_at": bindparam("created_at"),
            }
        )
        .on_conflict_do_nothing(),
        _INSERT_EXECUTION_COLUMNS,
    )
    for dialect, insert_of in (("sqlite", sqlite_insert), ("postgresql", postgresql_insert))
}


@dataclass
class NewExecution:
    id: str
    contact_id: str
    entry: int


def insert_executions(
    session: Session,
    *,
    run: Any,
    node_id: str,
    rows: Sequence[NewExecution],
    nudge_at: datetime,
    traceparent: str,
) -> int:
    """Insert pending executions of one run at its entry node (step_seq 0); how many were new
    (an execution already inserted, same id, is skipped)."""
    if not rows:
        return 0
    t = db_time(session, now())
    nudge = db_time(session, nudge_at)
    ws, cid, rid = run.workspace_id, run.campaign_id, run.id
    return _INSERT_EXECUTIONS[_dialect(session)].run(
        session, [(r.id, ws, cid, rid, r.contact_id, r.entry, node_id, nudge, traceparent, t) for r in rows]
    )


def load(session: Session, ids: Sequence[str]) -> dict[str, ExecRow]:
    if not ids:
        return {}
    return {r[0]: _row(r) for r in session.execute(select(*_EXEC_COLUMNS).where(E.c.id.in_(list(ids)))).all()}


def claim(session: Session, *, candidates: Sequence[tuple[str, int]], lease: timedelta) -> list[ExecRow]:
    """Move pending executions whose step_seq still matches to processing; the rest were stale.

    One UPDATE ... RETURNING: under concurrent workers each row is claimed by exactly one.
    """
    if not candidates:
        return []
    t = now()
    conn = session.connection()
    # A duplicate message in the batch names its execution twice; the statement wants it once.
    pairs = dict(candidates)
    params = _batch_params(
        conn.dialect.name,
        {"lease": db_time(session, t + lease), "t": db_time(session, t)},
        ("cid", "text", list(pairs)),
        ("cseq", "bigint", list(pairs.values())),
    )
    claimed = _exec_rows(conn, conn.exec_driver_sql(_sql(_CLAIM, conn.dialect.name), params).fetchall())
    deltas: dict[str, Counter[str]] = {}
    for c in claimed:
        d = deltas.setdefault(c.run_id, Counter())
        d["pending"] -= 1
        d["processing"] += 1
    move_counters(session, deltas)
    return claimed


@dataclass
class Outcome:
    """Where a claimed execution ends this batch."""

    row: ExecRow
    state: int
    node_id: str
    reason: str = ""
    wake_at: datetime | None = None


def finish(session: Session, outcomes: Sequence[Outcome], *, renudge: timedelta) -> None:
    """Write each claimed execution's new state; a parked one gets the next step_seq.

    A pending execution without a timer gets a safety nudge time: if nothing moves it before
    then (its campaign paused, a message lost), the timer loop nudges it again.

    Only executions this worker still holds are written and counted: one whose lease expired (the
    timer returned it to pending with a new step_seq, fencing this worker) matches nothing and is
    left alone, and so are the run counters. One statement compares and writes, so there is no
    window between a check and the write, on either database.
    """
    if not outcomes:
        return
    conn = session.connection()
    t = now()
    nudge = db_time(session, t + renudge)
    # Wake times repeat within a batch (one WAIT node, one retry backoff): convert each once.
    wakes: dict[datetime, Any] = {}
    by_id: dict[str, Outcome] = {}
    for o in outcomes:
        by_id[o.row.id] = o
        if o.wake_at is not None and o.wake_at not in wakes:
            wakes[o.wake_at] = db_time(session, o.wake_at)
    todo = list(by_id.values())
    params = _batch_params(
        conn.dialect.name,
        {"t": db_time(session, t)},
        ("fid", "text", [o.row.id for o in todo]),
        ("fseq", "bigint", [o.row.step_seq for o in todo]),
        ("fstate", "integer", [o.state for o in todo]),
        ("fnode", "text", [o.node_id for o in todo]),
        ("freason", "text", [o.reason[:500] for o in todo]),
        ("fab", "text", [o.row.ab_variant[:500] for o in todo]),
        ("fwake", "timestamptz", [None if o.wake_at is None else wakes[o.wake_at] for o in todo]),
        (
            "fnudge",
            "timestamptz",
            [nudge if o.state == PENDING and o.wake_at is None else None for o in todo],
        ),
    )
    written = conn.exec_driver_sql(_sql(_FINISH, conn.dialect.name), params).fetchall()
    deltas: dict[str, Counter[str]] = {}
    for (ex_id,) in written:
        o = by_id[ex_id]
        d = deltas.get(o.row.run_id)
        if d is None:
            d = deltas[o.row.run_id] = Counter()
        d["processing"] -= 1
        d[_COUNTER[o.state]] += 1
    move_counters(session, deltas)


def due_campaigns(session: Session) -> list[str]:
    """Campaigns with pending executions whose timer or safety nudge is due."""
    t = now()
    # Two range searches, one per partial index, instead of one OR that scans every pending row
    # (this runs every timer tick, also while a million executions are pending).
    woken = select(E.c.campaign_id).where(state_is(PENDING), E.c.wake_at <= t)
    nudged = select(E.c.campaign_id).where(state_is(PENDING), E.c.nudge_at <= t, E.c.wake_at.is_(None))
    return [r[0] for r in session.execute(union(woken, nudged)).all()]


# Where a paged nudge continues: (run_id, contact_id, entry) of the last execution it nudged.
NudgeCursor = tuple[str, str, int]


def nudge_due(
    session: Session,
    *,
    campaign_ids: Sequence[str],
    resume: bool,
    after: NudgeCursor | None,
    limit: int,
    renudge: timedelta,
) -> tuple[list[ExecRow], NudgeCursor | None]:
    """Pending executions to nudge now, marked so the next nudge is `renudge` away, and the
    cursor of the next page (None when this page was the last).

    Timer mode: those whose WAIT is over or whose safety nudge is due. Resume mode: every
    pending execution not parked at a future WAIT. The step_seq does not change: a duplicate
    nudge is harmless (one claim wins) and a queued message stays current.

    Paged by (run, contact, entry), the key of ix_executions_pending_run_contact (models.py),
    not by id: the page is read in the database's own order and the cursor is its last row, so
    the next page starts right after it under any collation.
    """
    t = now()
    if resume:
        due = or_(E.c.wake_at.is_(None), E.c.wake_at <= t)
    else:
        due = or_(E.c.wake_at <= t, and_(E.c.wake_at.is_(None), E.c.nudge_at <= t))
    key = (E.c.run_id, E.c.contact_id, E.c.entry)
    page = select(E.c.id, *key).where(state_is(PENDING), E.c.campaign_id.in_(list(campaign_ids)), due)
    if after is not None:
        page = page.where(tuple_(*key) > tuple_(*(literal(v) for v in after)))
    picked = session.execute(page.order_by(*key).limit(limit)).all()
    if not picked:
        return [], None
    # Same transaction: on SQLite nothing else writes in between; on PostgreSQL a row claimed
    # meanwhile is no longer pending and is left out by the state check.
    result = session.execute(
        update(E)
        .where(E.c.state == PENDING, E.c.id.in_([r.id for r in picked]))
        .values(wake_at=None, nudge_at=t + renudge, updated_at=t)
        .returning(*_EXEC_COLUMNS)
    )
    rows = {r.id: _row(r) for r in result.all()}
    last = picked[-1]
    cursor = (last.run_id, last.contact_id, last.entry) if len(picked) == limit else None
    return [rows[r.id] for r in picked if r.id in rows], cursor


def expire_leases(session: Session, *, limit: int) -> list[ExecRow]:
    """Executions whose worker died mid-node go back to pending with a new step_seq."""
    t = now()
    expired = select(E.c.id).where(state_is(PROCESSING), E.c.lease_until < t).limit(limit).scalar_subquery()
    result = session.execute(
        update(E)
        .where(E.c.state == PROCESSING, E.c.lease_until < t, E.c.id.in_(expired))
        .values(
            state=PENDING, step_seq=E.c.step_seq + 1, lease_until=None, wake_at=None, nudge_at=t, updated_at=t
        )
        .returning(*_EXEC_COLUMNS)
    )
    rows = [_row(r) for r in result.all()]
    deltas: dict[str, Counter[str]] = {}
    for r in rows:
        d = deltas.setdefault(r.run_id, Counter())
        d["processing"] -= 1
        d["pending"] += 1
    move_counters(session, deltas)
    return rows


# -- sends ---------------------------------------------------------------------------------------


_SEND_COLUMNS = (
    "key",
    "workspace_id",
    "execution_id",
    "run_id",
    "campaign_id",
    "node_id",
    "channel",
    "provider",
    "provider_message_id",
    "status",
    "billing_unit",
    "units",
    "cost_cents",
    "traceparent",
    "created_at",
)
# A send already recorded (a redelivered batch, a retry after a crash) is left as it is; the
# driver's row count says how many were new, which is what the run's `sent` counter adds.
_INSERT_SENDS = {
    dialect: BulkStatement(
        insert_of(S)
        .values({c: bindparam(c) for c in _SEND_COLUMNS} | {"updated_at": bindparam("created_at")})
        .on_conflict_do_nothing(index_elements=[S.c.key]),
        _SEND_COLUMNS,
    )
    for dialect, insert_of in (("sqlite", sqlite_insert), ("postgresql", postgresql_insert))
}


def known_sends(session: Session, keys: Sequence[str]) -> dict[str, Any]:
    """The recorded sends among `keys`: key -> row with `key` and `channel`."""
    if not keys:
        return {}
    return {
        r.key: r
        for r in session.connection()
        .execute(select(S.c.key, S.c.channel).where(S.c.key.in_(list(keys))))
        .all()
    }


def sends_of(conn: Connection, *, execution_id: str, send_nodes: Sequence[str]) -> list[Any]:
    """An execution's sends, oldest first, found by their keys (`execution_id:node_id` for each
    SEND node of its run's flow) in the primary key. An index on sends.execution_id would cost
    every recorded send a write on a page of its own (hashed ids) for this one rare read."""
    if not send_nodes:
        return []
    keys = [f"{execution_id}:{node}" for node in send_nodes]
    # One SEND node is the common flow: `key = ?` skips the expanding IN's per-call rendering
    # (~30 us of Python, and the gateway asks once per receipt).
    match = S.c.key == keys[0] if len(keys) == 1 else S.c.key.in_(keys)
    rows = conn.execute(select(S).where(match)).all()
    return sorted(rows, key=lambda r: (r.created_at, r.key))


@dataclass
class NewSend:
    """A send the provider accepted, to record (`record_sends`)."""

    key: str
    workspace_id: str
    execution_id: str
    run_id: str
    campaign_id: str
    node_id: str
    channel: int
    provider: str
    provider_message_id: str
    status: int
    billing_unit: int
    units: int
    cost_cents: int
    # The sending execution's span (W3C traceparent), "" when not traced.
    traceparent: str = ""


def record_sends(session: Session, sends: Sequence[NewSend]) -> None:
    """Insert sends not yet recorded (a redelivered batch finds its earlier rows) and count them."""
    if not sends:
        return
    statement = _INSERT_SENDS[_dialect(session)]
    t = db_time(session, now())
    by_run: dict[str, list[tuple[Any, ...]]] = {}
    for r in sends:
        by_run.setdefault(r.run_id, []).append(
            (
                r.key,
                r.workspace_id,
                r.execution_id,
                r.run_id,
                r.campaign_id,
                r.node_id,
                r.channel,
                r.provider,
                r.provider_message_id,
                r.status,
                r.billing_unit,
                r.units,
                r.cost_cents,
                r.traceparent,
                t,
            )
        )
    deltas: dict[str, Counter[str]] = {}
    for run_id, rows in by_run.items():
        # Both drivers report the rows inserted over the whole executemany.
        fresh = statement.run(session, rows)
        if fresh:
            deltas[run_id] = Counter(sent=fresh)
    move_counters(session, deltas)


# -- funnel --------------------------------------------------------------------------------------


def run_funnel(session: Session, *, run_id: str) -> tuple[list[Any], list[Any]]:
    """A run's executions counted by (node_id, state, reason, ab_variant), and its sends by
    (node_id, status): two GROUP BY reads (the run_id prefix of the executions' unique key and
    ix_sends_run find the rows)."""
    from sqlalchemy import func

    conn = session.connection()
    executions = conn.execute(
        select(E.c.node_id, E.c.state, E.c.reason, E.c.ab_variant, func.count().label("count"))
        .where(E.c.run_id == run_id)
        .group_by(E.c.node_id, E.c.state, E.c.reason, E.c.ab_variant)
    ).all()
    sends = conn.execute(
        select(S.c.node_id, S.c.status, func.count().label("count"))
        .where(S.c.run_id == run_id)
        .group_by(S.c.node_id, S.c.status)
    ).all()
    return list(executions), list(sends)
