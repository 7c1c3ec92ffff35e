"""HoldBatch throughput of the billing service, against the raw database ceiling of the same machine.

    .venv/bin/python bench/billing.py --db sqlite|postgres|both [--batches 100] [--concurrency 2]

The billing service runs as its own process (`python -m services.billing`) with a private
nats-server; the client sends HoldBatch calls of 500 items (`--batch-size`) with `--concurrency`
calls in flight, every key new, and counts held items per second. In the same run, two raw
ceilings do what one hold batch must write, with nothing else, from this process, one
transaction per batch: the same hold rows and ledger rows plus one UPDATE of the account, once
as a bare SQLAlchemy Core executemany of dicts, once with the driver-level statements the
service itself uses (SQLite executemany of tuples; PostgreSQL INSERT ... SELECT FROM unnest).
The service beats the Core figure because it bypasses Core's per-row work; the driver figure is
the real ceiling, and the ratio to it is the cost of everything else (gRPC, protobuf, the
idempotency lookup, prices, the account lock).

PostgreSQL: `--postgres-url`, else $SHOAL_BENCH_POSTGRES_URL or $SHOAL_TEST_POSTGRES_URL; a fresh
database is created for the run and dropped after. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, insert, text, update
from sqlalchemy.engine import make_url
from sqlmodel import Session

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "libs")]

from services.billing import ledger  # noqa: E402
from services.billing.models import Account, Hold, LedgerEntry  # noqa: E402
from shoal.db import Database, normalise_url  # noqa: E402
from shoal.grpc import channel, wait_healthy  # noqa: E402
from shoal.natsserver import NatsServer  # noqa: E402
from shoal.v1 import billing_pb2 as pb  # noqa: E402
from shoal.v1 import billing_pb2_grpc  # noqa: E402
from shoal.v1 import common_pb2 as common  # noqa: E402

WS = "ws_bench"
MIGRATIONS = REPO / "services" / "billing" / "migrations"


@dataclass
class Result:
    db: str
    holds: int
    service_rate: float
    p50_ms: float
    p95_ms: float
    core_rate: float
    driver_rate: float


@contextmanager
def database(kind: str, folder: Path, postgres_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'billing.db'}"
        return
    if not postgres_url:
        raise SystemExit("postgres: pass --postgres-url or set SHOAL_BENCH_POSTGRES_URL")
    base = make_url(normalise_url(postgres_url))
    name = f"shoal_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def start_service(url: str, nats_url: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / "billing.port"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_DATA_DIR": str(folder),
        "SHOAL_BILLING_DATABASE_URL": url,
        "SHOAL_BILLING_PORT": "0",
        "SHOAL_PORT_FILE": str(port_file),
        "SHOAL_LOG_LEVEL": "WARNING",
    }
    log = (folder / "billing.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.billing"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"billing did not start; see {folder / 'billing.log'}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def _items(prefix: str, size: int) -> list[pb.HoldItem]:
    return [
        pb.HoldItem(
            key=f"{prefix}-{i}:node",
            channel=common.CHANNEL_EMAIL,
            message_type=common.MESSAGE_TYPE_MESSAGE,
            units=1,
            campaign_id="bench",
        )
        for i in range(size)
    ]


async def measure_service(
    address: str, *, batches: int, size: int, concurrency: int
) -> tuple[int, float, list[float]]:
    await wait_healthy(address, within=30)
    async with channel(address, deadline=120) as ch:
        stub = billing_pb2_grpc.BillingServiceStub(ch)
        total = (batches + 4) * size  # one cent per email hold
        await stub.SetBalanceLimit(
            pb.SetBalanceLimitRequest(workspace_id=WS, max_balance_cents=total + 10_000)
        )
        await stub.TopUp(pb.TopUpRequest(workspace_id=WS, amount_cents=max(total, 1_000)))
        requests = [
            pb.HoldBatchRequest(workspace_id=WS, items=_items(f"b{n}", size)) for n in range(batches + 2)
        ]
        for warm in requests[:2]:
            await stub.HoldBatch(warm)
        queue = iter(requests[2:])
        latencies: list[float] = []
        held = 0

        async def client() -> None:
            nonlocal held
            for request in queue:
                started = time.perf_counter()
                reply = await stub.HoldBatch(request)
                latencies.append(time.perf_counter() - started)
                held += sum(1 for r in reply.results if r.status == pb.HOLD_STATUS_HELD)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if held != batches * size:
        raise SystemExit(f"expected {batches * size} holds, got {held}")
    return held, elapsed, latencies


def measure_raw(url: str, *, batches: int, size: int, driver: bool) -> float:
    """Rows a hold batch writes, bare, one transaction per batch: the hold rows and ledger rows,
    then one UPDATE of the account. `driver=False`: a plain Core executemany of dicts (the
    ceiling the brief names); `driver=True`: the same driver-level statements the service uses
    (ledger.bulk_insert_*), so the gap to the service is the service's own work."""
    db = Database(url, migrations_dir=MIGRATIONS)
    db.migrate()
    engine = db.engine
    ws = f"ws_raw_{'driver' if driver else 'core'}"
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Account.__table__).values(
                workspace_id=ws,
                free_cents=10**12,
                reserved_cents=0,
                max_balance_cents=10**13,
                low_balance_threshold_cents=0,
                currency="EUR",
                exhausted=False,
                low=False,
                updated_at=now,
            )
        )
    started = time.perf_counter()
    for n in range(batches):
        keys = [f"raw{n}-{i}:node" for i in range(size)]
        with Session(engine) as session, session.begin():
            if driver:
                ledger.bulk_insert_holds(session, ws, now, [(k, 1, "bench") for k in keys])
                ledger.bulk_insert_ledger(
                    session, ws, pb.LEDGER_ENTRY_KIND_HOLD, now, [(k, -1, 1) for k in keys]
                )
            else:
                conn = session.connection()
                conn.execute(
                    insert(Hold.__table__),
                    [
                        {
                            "workspace_id": ws,
                            "key": k,
                            "amount_cents": 1,
                            "status": pb.HOLD_STATUS_HELD,
                            "campaign_id": "bench",
                            "created_at": now,
                            "updated_at": now,
                        }
                        for k in keys
                    ],
                )
                conn.execute(
                    insert(LedgerEntry.__table__),
                    [
                        {
                            "workspace_id": ws,
                            "kind": pb.LEDGER_ENTRY_KIND_HOLD,
                            "free_delta_cents": -1,
                            "reserved_delta_cents": 1,
                            "key": k,
                            "created_at": now,
                        }
                        for k in keys
                    ],
                )
            session.execute(
                update(Account)
                .where(Account.workspace_id == ws)
                .values(
                    free_cents=Account.free_cents - size,
                    reserved_cents=Account.reserved_cents + size,
                    updated_at=now,
                )
            )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return batches * size / elapsed


def run_one(kind: str, nats_url: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"bench-billing-{kind}-") as tmp:
        folder = Path(tmp)
        with database(kind, folder, args.postgres_url) as url:
            proc, address = start_service(url, nats_url, folder)
            try:
                held, elapsed, latencies = asyncio.run(
                    measure_service(
                        address, batches=args.batches, size=args.batch_size, concurrency=args.concurrency
                    )
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Measured after the service stopped, so the two never share the machine's cores.
            core = measure_raw(url, batches=args.batches, size=args.batch_size, driver=False)
            driver = measure_raw(url, batches=args.batches, size=args.batch_size, driver=True)
    latencies.sort()
    return Result(
        db=kind,
        holds=held,
        service_rate=held / elapsed,
        p50_ms=statistics.median(latencies) * 1000,
        p95_ms=latencies[int(len(latencies) * 0.95) - 1] * 1000,
        core_rate=core,
        driver_rate=driver,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SHOAL_BENCH_POSTGRES_URL") or os.environ.get("SHOAL_TEST_POSTGRES_URL", ""),
    )
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp,
        NatsServer(store_dir=Path(tmp) / "store") as nats,
    ):
        for kind in kinds:
            results.append(run_one(kind, nats.url, args))

    title = f"HoldBatch, {args.batch_size} items per call, {args.concurrency} in flight, {args.batches} calls"
    table = Table(title=title)
    for column in (
        "database",
        "holds",
        "service holds/s",
        "p50 ms/call",
        "p95 ms/call",
        "raw Core holds/s",
        "service / Core",
        "raw driver holds/s",
        "service / driver",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.db,
            f"{r.holds:,}",
            f"{r.service_rate:,.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.core_rate:,.0f}",
            f"{r.service_rate / r.core_rate:.0%}",
            f"{r.driver_rate:,.0f}",
            f"{r.service_rate / r.driver_rate:.0%}",
        )
    Console(width=160).print(table)
    target = 20_000
    for r in results:
        verdict = "meets" if r.service_rate >= target else "misses"
        Console().print(f"{r.db}: {r.service_rate:,.0f} holds/s {verdict} the {target:,} holds/s target")


if __name__ == "__main__":
    main()
