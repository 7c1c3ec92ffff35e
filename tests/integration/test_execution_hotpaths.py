"""The execution repo's set-based statements on a real database (SQLite, and PostgreSQL when set).

A batch's claim and finish are one statement each (the batch as one JSON or array parameter,
joined to the executions by primary key, RETURNING what moved); inserts of executions and sends
skip rows already there and count only the new ones. This checks the edges those rely on:
duplicates inside a batch, an execution fenced between claim and finish, re-inserted pages,
counters per run, timestamps read back as aware datetimes, and the fan-out's execution ids.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from services.execution import repo
from services.execution.fanout import _NAMESPACE, execution_id
from services.execution.server import MIGRATIONS
from shoal.db import Database


@dataclass
class _Run:
    id: str
    workspace_id: str = "ws_1"
    campaign_id: str = "cmp_1"


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, migrations_dir=MIGRATIONS)
    database.migrate()
    with database.session() as s:
        for run_id in ("run_1", "run_2"):
            repo.create_run(
                s,
                run_id=run_id,
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


def _insert(db: Database, run_id: str, contacts: list[str]) -> tuple[list[str], int]:
    rows = [repo.NewExecution(execution_id(run_id, c), c, 0) for c in contacts]
    with db.session() as s:
        inserted = repo.insert_executions(
            s, run=_Run(run_id), node_id="s1", rows=rows, nudge_at=repo.now(), traceparent=""
        )
        repo.move_counters(s, {run_id: Counter(pending=inserted)})
    return [r.id for r in rows], inserted


def _counters(db: Database, run_id: str) -> tuple[int, ...]:
    with db.session() as s:
        c = repo.counters_of(s, [run_id])[0]
    return (c.pending, c.processing, c.completed, c.failed, c.skipped, c.sent)


def test_execution_ids_are_uuid5_of_run_contact_and_entry() -> None:
    for i in range(2000):
        run, contact, entry = f"run_{i % 7}", f"c_{i:08d}", i % 3
        expected = "ex_" + uuid.uuid5(_NAMESPACE, f"{run}:{contact}:{entry}").hex
        assert execution_id(run, contact, entry) == expected


def test_a_page_inserted_again_adds_only_new_executions(db: Database) -> None:
    ids, inserted = _insert(db, "run_1", ["c_a", "c_b"])
    assert inserted == 2
    again, inserted = _insert(db, "run_1", ["c_a", "c_b", "c_c"])
    assert again[:2] == ids and inserted == 1
    assert _counters(db, "run_1")[0] == 3


def test_claim_takes_a_duplicated_candidate_once_and_reads_timestamps_back(db: Database) -> None:
    (a, b), _ = _insert(db, "run_1", ["c_a", "c_b"])
    wake = repo.now() - timedelta(seconds=1)
    with db.session() as s:
        s.execute(update(repo.E).where(repo.E.c.id == a).values(wake_at=wake))
    with db.session() as s:
        claimed = repo.claim(s, candidates=[(a, 0), (a, 0), (b, 3)], lease=timedelta(seconds=60))
    assert [c.id for c in claimed] == [a]
    assert claimed[0].state == repo.PROCESSING
    assert claimed[0].wake_at is not None and claimed[0].wake_at.tzinfo is not None
    assert abs(claimed[0].wake_at - wake) < timedelta(milliseconds=1)
    assert claimed[0].wake_at.astimezone(UTC) == claimed[0].wake_at
    assert _counters(db, "run_1")[:2] == (1, 1)


def test_finish_writes_the_held_executions_and_skips_a_fenced_one(db: Database) -> None:
    (a, b, c), _ = _insert(db, "run_1", ["c_a", "c_b", "c_c"])
    (d,), _ = _insert(db, "run_2", ["c_d"])
    with db.session() as s:
        claimed = {
            r.id: r for r in repo.claim(s, candidates=[(a, 0), (b, 0), (c, 0), (d, 0)], lease=timedelta(60))
        }
    # b's lease expired: the timer returned it to pending with the next step_seq (fencing us).
    with db.session() as s:
        s.execute(
            update(repo.E)
            .where(repo.E.c.id == b)
            .values(state=repo.PENDING, step_seq=repo.E.c.step_seq + 1, lease_until=None)
        )
        repo.move_counters(s, {"run_1": Counter(processing=-1, pending=1)})
    wake = repo.now() + timedelta(hours=1)
    with db.session() as s:
        repo.finish(
            s,
            [
                repo.Outcome(claimed[a], repo.COMPLETED, "e1"),
                repo.Outcome(claimed[b], repo.COMPLETED, "e1"),
                repo.Outcome(claimed[c], repo.PENDING, "w2", "waiting", wake),
                repo.Outcome(claimed[d], repo.SKIPPED, "s1", "no_consent"),
            ],
            renudge=timedelta(minutes=5),
        )
    with db.session() as s:
        rows = repo.load(s, [a, b, c, d])
    assert (rows[a].state, rows[a].node_id, rows[a].step_seq) == (repo.COMPLETED, "e1", 1)
    assert (rows[b].state, rows[b].node_id, rows[b].step_seq) == (repo.PENDING, "s1", 1)
    assert (rows[c].state, rows[c].node_id, rows[c].reason) == (repo.PENDING, "w2", "waiting")
    woken = rows[c].wake_at
    assert woken is not None and abs(woken - wake) < timedelta(milliseconds=1)
    assert (rows[d].state, rows[d].reason) == (repo.SKIPPED, "no_consent")
    # pending, processing, completed, failed, skipped, sent
    assert _counters(db, "run_1") == (2, 0, 1, 0, 0, 0)
    assert _counters(db, "run_2") == (0, 0, 0, 0, 1, 0)


def test_sends_of_several_runs_are_counted_once_each(db: Database) -> None:
    (a, b), _ = _insert(db, "run_1", ["c_a", "c_b"])
    (d,), _ = _insert(db, "run_2", ["c_d"])

    def send(ex: str, run_id: str) -> repo.NewSend:
        return repo.NewSend(f"{ex}:s1", "ws_1", ex, run_id, "cmp_1", "s1", 1, "sandbox", "pm", 1, 1, 1, 0)

    with db.session() as s:
        # A send listed twice in one batch (a duplicated step message) is recorded once.
        repo.record_sends(s, [send(a, "run_1"), send(a, "run_1"), send(d, "run_2")])
    with db.session() as s:
        repo.record_sends(s, [send(a, "run_1"), send(b, "run_1"), send(d, "run_2")])
    with db.session() as s:
        assert sorted(repo.known_sends(s, [f"{x}:s1" for x in (a, b, d)])) == sorted(
            f"{x}:s1" for x in (a, b, d)
        )
    assert _counters(db, "run_1")[5] == 2
    assert _counters(db, "run_2")[5] == 1


def test_claim_and_finish_find_executions_by_primary_key_on_sqlite(tmp_path: Path) -> None:
    """Never a scan of a partial index's pending rows, which grows with the audience."""
    database = Database(f"sqlite:///{tmp_path / 'plan.db'}", migrations_dir=MIGRATIONS)
    database.migrate()
    with database.session() as s:
        conn = s.connection()
        for statement in (repo._CLAIM, repo._FINISH):
            plan = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement["sqlite"], {"batch": "[]", "lease": None, "t": None}
            ).fetchall()
            details = [row[-1] for row in plan]
            assert any(d.startswith("SCAN json_each") for d in details), details
            assert any("executions USING INDEX sqlite_autoindex_executions_1 (id=?)" in d for d in details), (
                details
            )
    database.engine.dispose()
