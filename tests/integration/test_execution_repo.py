"""The execution repo's hot statements on a real database (SQLite, and PostgreSQL when set).

They bypass SQLAlchemy's per-value processing (`repo.BulkStatement`), so this checks what that
must not change: timestamps stored as the ORM would store them, compare-and-set claims, counters
moved with the rows, idempotent sends, and the timer queries that use the partial indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from services.execution import repo
from services.execution.fanout import execution_id
from services.execution.server import MIGRATIONS
from shoal.db import Database


@dataclass
class _Run:
    id: str = "run_1"
    workspace_id: str = "ws_1"
    campaign_id: str = "cmp_1"


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, migrations_dir=MIGRATIONS)
    database.migrate()
    with database.session() as s:
        repo.create_run(
            s,
            run_id="run_1",
            workspace_id="ws_1",
            campaign_id="cmp_1",
            flow_version=1,
            flow=b"",
            segment_id="seg_1",
            recipients=[],
            data={},
            open_ended=False,
        )
    yield database
    database.engine.dispose()


def _insert(db: Database, contacts: list[str], nudge_in: timedelta = timedelta(minutes=5)) -> list[str]:
    rows = [repo.NewExecution(execution_id("run_1", c), c, 0) for c in contacts]
    with db.session() as s:
        repo.insert_executions(
            s, run=_Run(), node_id="s1", rows=rows, nudge_at=repo.now() + nudge_in, traceparent="00-t-s-01"
        )
        repo.move_counters(s, {"run_1": repo.Counter(pending=len(rows))})
    return [r.id for r in rows]


def test_bulk_rows_read_back_like_orm_rows(db: Database) -> None:
    before = repo.now()
    ids = _insert(db, ["ct_a", "ct_b"])
    with db.session() as s:
        rows = s.execute(select(repo.E).where(repo.E.c.id.in_(ids)).order_by(repo.E.c.contact_id)).all()
    assert [r.contact_id for r in rows] == ["ct_a", "ct_b"]
    for r in rows:
        assert (r.state, r.step_seq, r.node_id, r.reason, r.wake_at) == (repo.PENDING, 0, "s1", "", None)
        assert r.created_at.tzinfo is not None and before <= r.created_at <= repo.now()
        assert r.updated_at == r.created_at
        assert timedelta(minutes=4) < r.nudge_at - before < timedelta(minutes=6)


def test_claim_is_compare_and_set_and_finish_fences_stale_workers(db: Database) -> None:
    a, b = _insert(db, ["ct_a", "ct_b"])
    with db.session() as s:
        # b's message is stale (step_seq 7): only a is claimed.
        claimed = repo.claim(s, candidates=[(a, 0), (b, 7)], lease=timedelta(seconds=60))
    assert [c.id for c in claimed] == [a]
    with db.session() as s:
        assert repo.claim(s, candidates=[(a, 0)], lease=timedelta(seconds=60)) == []
    wake = repo.now() + timedelta(hours=1)
    with db.session() as s:
        repo.finish(s, [repo.Outcome(claimed[0], repo.PENDING, "s2", "waiting", wake)], renudge=timedelta(60))
        # A second finish of the same claim (a worker whose lease was taken over) writes nothing.
        repo.finish(s, [repo.Outcome(claimed[0], repo.FAILED, "s1", "late")], renudge=timedelta(60))
    with db.session() as s:
        row = repo.load(s, [a])[a]
        counters = repo.counters_of(s, ["run_1"])[0]
    assert (row.state, row.node_id, row.step_seq, row.reason) == (repo.PENDING, "s2", 1, "waiting")
    assert row.wake_at is not None and abs(row.wake_at - wake) < timedelta(milliseconds=1)
    assert (counters.pending, counters.processing, counters.failed) == (2, 0, 0)


def test_sends_are_recorded_once(db: Database) -> None:
    (a,) = _insert(db, ["ct_a"])
    send = repo.NewSend(f"{a}:s1", "ws_1", a, "run_1", "cmp_1", "s1", 1, "sandbox", "pm1", 1, 1, 1, 2)
    for _ in range(2):
        with db.session() as s:
            repo.record_sends(s, [send])
    with db.session() as s:
        assert list(repo.known_sends(s, [send.key])) == [send.key]
        assert repo.counters_of(s, ["run_1"])[0].sent == 1


def test_an_executions_sends_are_found_by_their_keys(db: Database) -> None:
    a, b = _insert(db, ["ct_a", "ct_b"])
    with db.session() as s:
        repo.record_sends(
            s,
            [
                repo.NewSend(f"{x}:{node}", "ws_1", x, "run_1", "cmp_1", node, 1, "sandbox", "pm", 1, 1, 1, 2)
                for x, node in ((a, "s1"), (a, "s3"), (b, "s1"))
            ],
        )
    with db.session() as s:
        found = repo.sends_of(s.connection(), execution_id=a, send_nodes=["s1", "s2", "s3"])
        assert sorted((r.execution_id, r.node_id) for r in found) == [(a, "s1"), (a, "s3")]
        assert repo.sends_of(s.connection(), execution_id=b, send_nodes=[]) == []


def test_timer_queries_find_due_wakes_nudges_and_expired_leases(db: Database) -> None:
    due, later = _insert(db, ["ct_due", "ct_later"], nudge_in=timedelta(0))
    with db.session() as s:
        # Only ct_later is parked at a future WAIT; ct_due's safety nudge is due now.
        claimed = repo.claim(s, candidates=[(later, 0)], lease=timedelta(seconds=60))
        repo.finish(
            s,
            [repo.Outcome(claimed[0], repo.PENDING, "s2", wake_at=repo.now() + timedelta(hours=1))],
            renudge=timedelta(60),
        )
    with db.session() as s:
        assert repo.due_campaigns(s) == ["cmp_1"]
        nudged, cursor = repo.nudge_due(
            s, campaign_ids=["cmp_1"], resume=False, after=None, limit=10, renudge=timedelta(60)
        )
    assert [r.id for r in nudged] == [due]
    assert cursor is None  # a page short of the limit is the last
    with db.session() as s:
        assert repo.due_campaigns(s) == []
        claimed = repo.claim(s, candidates=[(due, 0)], lease=timedelta(seconds=-1))
    with db.session() as s:
        expired = repo.expire_leases(s, limit=10)
    assert [(r.id, r.state, r.step_seq) for r in expired] == [(due, repo.PENDING, 1)]


def test_resume_pages_every_pending_execution_once_in_contact_order(db: Database) -> None:
    contacts = [f"ct_{i:02d}" for i in range(7)]
    ids = dict(zip(contacts, _insert(db, contacts), strict=True))
    with db.session() as s:
        # ct_03 is parked at a future WAIT: resume leaves it; ct_05 is done.
        claimed = {
            r.contact_id: r
            for r in repo.claim(s, candidates=[(ids["ct_03"], 0), (ids["ct_05"], 0)], lease=timedelta(60))
        }
        repo.finish(
            s,
            [
                repo.Outcome(claimed["ct_03"], repo.PENDING, "s2", wake_at=repo.now() + timedelta(hours=1)),
                repo.Outcome(claimed["ct_05"], repo.COMPLETED, "end"),
            ],
            renudge=timedelta(60),
        )
    pages: list[list[str]] = []
    cursor: repo.NudgeCursor | None = None
    while True:
        with db.session() as s:
            rows, cursor = repo.nudge_due(
                s, campaign_ids=["cmp_1"], resume=True, after=cursor, limit=2, renudge=timedelta(60)
            )
        pages.append([r.contact_id for r in rows])
        if cursor is None:
            break
    assert pages == [["ct_00", "ct_01"], ["ct_02", "ct_04"], ["ct_06"]]


def test_nudge_pages_use_the_pending_run_contact_index_on_sqlite(tmp_path: Path) -> None:
    """A resume of a large campaign seeks each page in the partial index; it never sorts or
    rescans the campaign's pending rows."""
    database = Database(f"sqlite:///{tmp_path / 'plan.db'}", migrations_dir=MIGRATIONS)
    database.migrate()
    captured: list[str] = []

    @event.listens_for(database.engine, "before_cursor_execute")
    def _capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().startswith("SELECT") and "executions" in statement:
            captured.append(
                "\n".join(r[-1] for r in cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params))
            )

    with database.session() as s:
        repo.nudge_due(
            s, campaign_ids=["cmp_1"], resume=True, after=("run_1", "ct_1", 0), limit=2, renudge=timedelta(60)
        )
    database.engine.dispose()
    assert len(captured) == 1, captured
    assert (
        "USING INDEX ix_executions_pending_run_contact (campaign_id=? AND (run_id,contact_id,entry)>(?,?,?))"
        in captured[0]
    ), captured[0]
    assert "TEMP B-TREE" not in captured[0], captured[0]
