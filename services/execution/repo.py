"""Storage of runs, executions and sends: Core bulk statements, compare-and-set moves.

Every function takes the session of the caller's transaction. Run counters are moved in the same
transaction as the executions they count, so `GetRunCounts` is one row read at any scale.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, tuple_, update
from sqlmodel import Session

from services.execution.models import Execution, Run, Send
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
    rows = session.execute(
        select(E.c.contact_id).where(E.c.run_id == run_id, E.c.contact_id.in_(list(contact_ids)))
    ).all()
    return {r[0] for r in rows}


def insert_executions(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(E), rows)


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
    result = session.execute(
        update(E)
        .where(E.c.state == PENDING, tuple_(E.c.id, E.c.step_seq).in_(list(candidates)))
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


def finish(session: Session, outcomes: Sequence[Outcome], *, renudge: timedelta) -> None:
    """Write each claimed execution's new state; a parked one gets the next step_seq.

    A pending execution without a timer gets a safety nudge time: if nothing moves it before
    then (its campaign paused, a message lost), the timer loop nudges it again.
    """
    if not outcomes:
        return
    t = now()
    params = [
        {
            "b_id": o.row.id,
            "b_state": o.state,
            "b_node": o.node_id,
            "b_seq": o.row.step_seq + 1,
            "b_claimed_seq": o.row.step_seq,
            "b_reason": o.reason[:500],
            "b_variant": o.row.ab_variant[:500],
            "b_wake": o.wake_at,
            "b_nudge": t + renudge if o.state == PENDING and o.wake_at is None else None,
        }
        for o in outcomes
    ]
    session.execute(
        update(E)
        # A worker whose lease expired (another took the execution over) writes nothing.
        .where(
            E.c.id == bindparam("b_id"), E.c.state == PROCESSING, E.c.step_seq == bindparam("b_claimed_seq")
        )
        .values(
            state=bindparam("b_state"),
            node_id=bindparam("b_node"),
            step_seq=bindparam("b_seq"),
            reason=bindparam("b_reason"),
            ab_variant=bindparam("b_variant"),
            wake_at=bindparam("b_wake"),
            nudge_at=bindparam("b_nudge"),
            lease_until=None,
            updated_at=t,
        ),
        params,
    )
    deltas: dict[str, Counter[str]] = {}
    for o in outcomes:
        d = deltas.setdefault(o.row.run_id, Counter())
        d["processing"] -= 1
        d[_COUNTER[o.state]] += 1
    move_counters(session, deltas)


def due_campaigns(session: Session) -> list[str]:
    """Campaigns with pending executions whose timer or safety nudge is due."""
    t = now()
    due = or_(E.c.wake_at <= t, and_(E.c.wake_at.is_(None), E.c.nudge_at <= t))
    return [
        r[0]
        for r in session.execute(select(E.c.campaign_id).where(E.c.state == PENDING, due).distinct()).all()
    ]


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
    ids = select(E.c.id).where(E.c.state == PENDING, E.c.campaign_id.in_(list(campaign_ids)), due)
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
    expired = (
        select(E.c.id).where(E.c.state == PROCESSING, E.c.lease_until < t).limit(limit).scalar_subquery()
    )
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


def known_sends(session: Session, keys: Sequence[str]) -> dict[str, Any]:
    if not keys:
        return {}
    return {r.key: r for r in session.execute(select(S).where(S.c.key.in_(list(keys)))).all()}


def record_sends(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert sends not yet recorded (a redelivered batch finds its earlier rows) and count them."""
    if not rows:
        return
    known = set(known_sends(session, [r["key"] for r in rows]))
    fresh = [r for r in rows if r["key"] not in known]
    if not fresh:
        return
    session.execute(insert(S), fresh)
    deltas: dict[str, Counter[str]] = {}
    for r in fresh:
        deltas.setdefault(r["run_id"], Counter())["sent"] += 1
    move_counters(session, deltas)
