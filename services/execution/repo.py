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
_COUNTER = {
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
    return bool(result.rowcount)


def move_counters(session: Session, deltas: dict[str, Counter[str]]) -> None:
    """Apply counter deltas per run: {run_id: Counter({"pending": -3, "completed": 3})}."""
    for run_id, delta in deltas.items():
        values = {name: getattr(R.c, name) + amount for name, amount in delta.items() if amount}
        if values:
            session.execute(update(R).where(R.c.id == run_id).values(**values, updated_at=now()))


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


def existing_contacts(session: Session, *, run_id: str, contact_ids: Sequence[str]) -> set[str]:
    rows = (
        session.connection()
        .execute(select(E.c.contact_id).where(E.c.run_id == run_id, E.c.contact_id.in_(list(contact_ids))))
        .all()
    )
    return {r[0] for r in rows}


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
_INSERT_EXECUTIONS = BulkStatement(
    insert(E).values(
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
    ),
    _INSERT_EXECUTION_COLUMNS,
)


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
) -> None:
    """Insert pending executions of one run at its entry node (step_seq 0)."""
    if not rows:
        return
    t = db_time(session, now())
    nudge = db_time(session, nudge_at)
    ws, cid, rid = run.workspace_id, run.campaign_id, run.id
    _INSERT_EXECUTIONS.run(
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
    # On the connection, not the ORM session: a Core statement needs none of its bookkeeping.
    result = session.connection().execute(
        update(E)
        .where(
            # `id IN` lets the primary key find the rows, and the state is compared inside the
            # row value so the planner cannot prefer a (state, ...) index: with `state = ?` as
            # its own term SQLite scanned every pending row of the table for each batch.
            E.c.id.in_([c[0] for c in candidates]),
            tuple_(E.c.id, E.c.step_seq, E.c.state).in_([(i, seq, PENDING) for i, seq in candidates]),
        )
        .values(state=PROCESSING, lease_until=t + lease, updated_at=t)
        .returning(*_EXEC_COLUMNS)
    )
    claimed = [_row(r) for r in result.all()]
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


_FINISH_COLUMNS = (
    "state",
    "node_id",
    "reason",
    "ab_variant",
    "wake_at",
    "nudge_at",
    "t",
    "id",
    "claimed_seq",
)
_FINISH = BulkStatement(
    update(E)
    # A worker whose lease expired (another took the execution over) writes nothing.
    .where(E.c.id == bindparam("id"), E.c.state == PROCESSING, E.c.step_seq == bindparam("claimed_seq"))
    .values(
        state=bindparam("state"),
        node_id=bindparam("node_id"),
        step_seq=E.c.step_seq + 1,
        reason=bindparam("reason"),
        ab_variant=bindparam("ab_variant"),
        wake_at=bindparam("wake_at"),
        nudge_at=bindparam("nudge_at"),
        lease_until=None,
        updated_at=bindparam("t"),
    ),
    _FINISH_COLUMNS,
)


def finish(session: Session, outcomes: Sequence[Outcome], *, renudge: timedelta) -> None:
    """Write each claimed execution's new state; a parked one gets the next step_seq.

    A pending execution without a timer gets a safety nudge time: if nothing moves it before
    then (its campaign paused, a message lost), the timer loop nudges it again.
    """
    if not outcomes:
        return
    # Only executions this worker still holds are written and counted: one whose lease expired
    # (the timer returned it to pending with a new step_seq, fencing this worker) is left alone,
    # and so are the run counters. The rows are locked on PostgreSQL (FOR UPDATE). SQLite has no
    # row locks and its driver reads outside the write transaction, so there the UPDATE's own
    # count is checked below.
    held = {
        r[0]
        for r in session.connection().execute(
            select(E.c.id)
            .where(
                E.c.id.in_([o.row.id for o in outcomes]),
                tuple_(E.c.id, E.c.step_seq, E.c.state).in_(
                    [(o.row.id, o.row.step_seq, PROCESSING) for o in outcomes]
                ),
            )
            .with_for_update()
        )
    }
    if len(held) < len(outcomes):
        outcomes = [o for o in outcomes if o.row.id in held]
        if not outcomes:
            return
    t = now()
    t_db = db_time(session, t)
    nudge = db_time(session, t + renudge)
    # Wake times repeat within a batch (one WAIT node, one retry backoff): convert each once.
    wakes: dict[datetime, Any] = {}
    rows = []
    for o in outcomes:
        wake = None
        if o.wake_at is not None:
            wake = wakes.get(o.wake_at)
            if wake is None:
                wake = wakes[o.wake_at] = db_time(session, o.wake_at)
        rows.append(
            (
                o.state,
                o.node_id,
                o.reason[:500],
                o.row.ab_variant[:500],
                wake,
                nudge if o.state == PENDING and o.wake_at is None else None,
                t_db,
                o.row.id,
                o.row.step_seq,
            )
        )
    written = _FINISH.run(session, rows)
    if written != len(rows) and session.connection().dialect.name == "sqlite":
        # Another process fenced one of these executions between the check and the write: undo
        # the whole batch (the caller's transaction rolls back) and let the redelivery sort it out.
        raise RuntimeError(f"{len(rows) - written} executions changed hands while finishing; retrying")
    deltas: dict[str, Counter[str]] = {}
    for o in outcomes:
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


def nudge_due(
    session: Session,
    *,
    campaign_ids: Sequence[str],
    resume: bool,
    after_id: str,
    limit: int,
    renudge: timedelta,
) -> list[ExecRow]:
    """Pending executions to nudge now, marked so the next nudge is `renudge` away.

    Timer mode: those whose WAIT is over or whose safety nudge is due. Resume mode: every
    pending execution not parked at a future WAIT, paged by id. The step_seq does not change:
    a duplicate nudge is harmless (one claim wins) and a queued message stays current.
    """
    t = now()
    if resume:
        due = or_(E.c.wake_at.is_(None), E.c.wake_at <= t)
    else:
        due = or_(E.c.wake_at <= t, and_(E.c.wake_at.is_(None), E.c.nudge_at <= t))
    ids = select(E.c.id).where(state_is(PENDING), E.c.campaign_id.in_(list(campaign_ids)), due)
    if after_id:
        ids = ids.where(E.c.id > after_id)
    picked = ids.order_by(E.c.id).limit(limit).scalar_subquery()
    result = session.execute(
        update(E)
        .where(E.c.state == PENDING, E.c.id.in_(picked))
        .values(wake_at=None, nudge_at=t + renudge, updated_at=t)
        .returning(*_EXEC_COLUMNS)
    )
    return sorted((_row(r) for r in result.all()), key=lambda r: r.id)


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
_INSERT_SENDS = BulkStatement(
    insert(S).values({c: bindparam(c) for c in _SEND_COLUMNS} | {"updated_at": bindparam("created_at")}),
    _SEND_COLUMNS,
)


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
    # One indexed lookup of the keys (normally none is found); the unique key backs it up.
    known = known_sends(session, [r.key for r in sends])
    fresh = [r for r in sends if r.key not in known]
    if not fresh:
        return
    t = db_time(session, now())
    _INSERT_SENDS.run(
        session,
        [
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
            for r in fresh
        ],
    )
    deltas: dict[str, Counter[str]] = {}
    for r in fresh:
        deltas.setdefault(r.run_id, Counter())["sent"] += 1
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
