"""Segment benchmark: bulk import, Estimate and StreamMembers at scale, the service as its own process.

    .venv/bin/python bench/segments.py --contacts 1000000                 # SQLite
    .venv/bin/python bench/segments.py --contacts 200000 --db postgres
    .venv/bin/python bench/segments.py --contacts 50000 --db both --runs 3

Starts `python -m services.segment` (no NATS: events off) on a fresh database, imports the
audience through ImportContacts in calls of 10,000, then measures Estimate on a 3-condition
filter (tag AND custom field AND consent) and StreamMembers over the whole audience. The raw
limits measured in the same run: a bare executemany insert of the same contact rows, and a bare
keyset-paged SELECT of them, with no Shoal code.

Each run starts on a fresh database (a new SQLite file, or a new PostgreSQL database dropped
after); with --runs N every figure is the median of N runs, each ratio the median of the per-run
ratios, and the load average around the runs is printed, since other work may share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from sqlalchemy import Column, Integer, MetaData, String, Text, create_engine, insert, select, text
from sqlalchemy import Table as SqlTable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoal.db import make_engine, normalise_url  # noqa: E402
from shoal.grpc import wait_healthy  # noqa: E402
from shoal.v1 import common_pb2 as common  # noqa: E402
from shoal.v1 import segment_pb2 as spb  # noqa: E402
from shoal.v1 import segment_pb2_grpc  # noqa: E402

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE
WS = "ws_bench"


def contact(i: int) -> spb.ContactInput:
    return spb.ContactInput(
        external_id=f"x{i}",
        email=f"c{i}@example.com",
        first_name=f"C{i}",
        tags=["vip" if i % 10 == 0 else "regular"],
        fields={"plan": common.FieldValue(string_value="pro" if i % 3 == 0 else "free")},
        consents=[
            spb.ConsentInput(
                channel=EMAIL, message_type=MESSAGE, status=spb.CONSENT_STATUS_GRANTED, source="bench"
            )
        ]
        if i % 2 == 0
        else [],
    )


def raw_limits(db_url: str, count: int) -> tuple[float, float]:
    """(rows/s inserted, rows/s read by keyset pages of 1,000) with bare SQLAlchemy Core."""
    engine = make_engine(db_url)
    meta = MetaData()
    table = SqlTable(
        f"raw_{uuid.uuid4().hex[:8]}",
        meta,
        Column("id", String, primary_key=True),
        Column("workspace_id", String),
        Column("email", String),
        Column("fields", Text),
        Column("n", Integer),
    )
    meta.create_all(engine)
    rows = [
        {
            "id": f"c_{i:012d}",
            "workspace_id": WS,
            "email": f"c{i}@example.com",
            "fields": '{"plan":"pro"}',
            "n": i,
        }
        for i in range(count)
    ]
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for i in range(0, count, 10_000):
            conn.execute(insert(table), rows[i : i + 10_000])
    insert_rate = count / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    after, seen = "", 0
    with engine.connect() as conn:
        while True:
            page = conn.execute(
                select(table).where(table.c.id > after).order_by(table.c.id).limit(1000)
            ).all()
            if not page:
                break
            seen += len(page)
            after = page[-1].id
    read_rate = seen / (time.perf_counter() - t0)
    meta.drop_all(engine)
    engine.dispose()
    return insert_rate, read_rate


async def import_all(stub: segment_pb2_grpc.SegmentServiceStub, count: int, window: int) -> float:
    """Import `count` contacts in calls of 10,000 with up to `window` calls in flight; contacts/s.

    The requests are built inside the timing, as a client reading a file would: with a window of
    2 the next call is built and validated while the previous one is written.
    """
    in_flight: set[asyncio.Task[spb.ImportContactsResponse]] = set()

    async def settle(until: int) -> None:
        nonlocal in_flight
        while len(in_flight) > until:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                reply = task.result()
                assert not reply.rejected, reply.rejected[:3]

    t0 = time.perf_counter()
    for start in range(0, count, 10_000):
        await settle(window - 1)
        request = spb.ImportContactsRequest(
            workspace_id=WS, contacts=[contact(i) for i in range(start, min(start + 10_000, count))]
        )
        in_flight.add(asyncio.ensure_future(stub.ImportContacts(request, timeout=600)))
    await settle(0)
    return count / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(address: str, count: int, window: int, pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = segment_pb2_grpc.SegmentServiceStub(ch)
        cpu_before = cpu_seconds(pid)
        import_rate = await import_all(stub, count, window)
        import_cpu_us = (cpu_seconds(pid) - cpu_before) / count * 1e6
        three = spb.Filter(
            all_of=spb.FilterList(
                filters=[
                    spb.Filter(tag=spb.TagCondition(tag="regular")),
                    spb.Filter(
                        field=spb.FieldCondition(
                            field="fields.plan",
                            operator=spb.OPERATOR_EQ,
                            value=common.FieldValue(string_value="pro"),
                        )
                    ),
                    spb.Filter(
                        consent=spb.ConsentCondition(
                            channel=EMAIL, message_type=MESSAGE, status=spb.CONSENT_STATUS_GRANTED
                        )
                    ),
                ]
            )
        )
        timings = []
        for _ in range(3):
            t0 = time.perf_counter()
            size = (
                await stub.EstimateAudience(
                    spb.EstimateAudienceRequest(workspace_id=WS, filter=three), timeout=600
                )
            ).size
            timings.append(time.perf_counter() - t0)
        everyone = await stub.CreateSegment(
            spb.CreateSegmentRequest(
                workspace_id=WS,
                name="all",
                filter=spb.Filter(field=spb.FieldCondition(field="email", operator=spb.OPERATOR_EXISTS)),
            )
        )
        t0 = time.perf_counter()
        streamed = 0
        async for page in stub.StreamMembers(
            spb.StreamMembersRequest(workspace_id=WS, segment_id=everyone.segment.id, page_size=1000),
            timeout=3600,
        ):
            streamed += len(page.members)
        stream_rate = streamed / (time.perf_counter() - t0)
        assert streamed == count, (streamed, count)
        return {
            "import": import_rate,
            "import_cpu_us": import_cpu_us,
            "estimate_s": sorted(timings)[1],
            "estimate_size": size,
            "stream": stream_rate,
        }


def run_once(kind: str, count: int, postgres_url: str, window: int) -> dict[str, float]:
    """One measurement on a fresh database: the service's figures, the raw limits, the load."""
    data = Path(tempfile.mkdtemp(prefix="shoal-segbench-"))
    created: list[str] = []
    admin = None
    if kind == "postgres":
        admin = create_engine(normalise_url(postgres_url), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for what in ("svc", "raw"):
                name = f"segbench_{what}_{uuid.uuid4().hex[:6]}"
                conn.execute(text(f'CREATE DATABASE "{name}"'))
                created.append(name)
        base = postgres_url.rsplit("/", 1)[0]
        service_db, raw_db = f"{base}/{created[0]}", f"{base}/{created[1]}"
    else:
        service_db, raw_db = f"sqlite:///{data / 'segment.db'}", f"sqlite:///{data / 'raw.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        "SHOAL_SEGMENT_PORT": "0",
        "SHOAL_PORT_FILE": str(data / "port"),
        "SHOAL_DATA_DIR": str(data),
        "SHOAL_SEGMENT_DATABASE_URL": service_db,
        "SHOAL_SEGMENT_PUBLISH_EVENTS": "false",
        "SHOAL_SEGMENT_CONSUME_RECEIPTS": "false",
        "SHOAL_LOG_LEVEL": "WARNING",
    }
    load_before = os.getloadavg()[0]
    log = (data / "segment.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.segment"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while not (data / "port").exists() or not (data / "port").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"segment did not start; see {data / 'segment.log'}")
            time.sleep(0.1)
        address = f"127.0.0.1:{(data / 'port').read_text()}"
        asyncio.run(wait_healthy(address, within=30))
        insert_limit, read_limit = raw_limits(raw_db, min(count, 200_000))
        result = asyncio.run(bench(address, count, window, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if admin is not None:
            with admin.connect() as conn:
                for name in created:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(data, ignore_errors=True)
    return {
        **result,
        "insert_limit": insert_limit,
        "read_limit": read_limit,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def report(kind: str, count: int, window: int, runs: list[dict[str, float]]) -> Table:
    """Medians over the runs; ratios are taken per run (Shoal / raw limit of the same run)."""

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def every(key: str, fmt: str) -> str:
        return " ".join(format(r[key], fmt) for r in runs)

    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    table = Table(
        title=f"Segment service: {count:,} contacts on {kind}, median of {len(runs)} run(s)",
        caption=(
            f"{os.cpu_count()} CPUs; 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
            "around the runs (other work shares the machine). Ratio: Shoal / raw limit of the same run."
        ),
    )
    for col in ("measure", "Shoal", "raw limit", "ratio", "target", "runs"):
        table.add_column(col, justify="left" if col in ("measure", "runs") else "right")
    table.add_row(
        f"import (ImportContacts, 10k per call, {window} in flight)",
        f"{med([r['import'] for r in runs]):,.0f}/s",
        f"{med([r['insert_limit'] for r in runs]):,.0f}/s",
        f"{med([r['import'] / r['insert_limit'] for r in runs]):.2f}",
        ">= 20,000/s",
        every("import", ",.0f"),
    )
    table.add_row(
        "  service process CPU per imported contact",
        f"{med([r['import_cpu_us'] for r in runs]):.0f} µs",
        "",
        "",
        "",
        every("import_cpu_us", ".0f"),
    )
    table.add_row(
        f"Estimate, 3 conditions ({runs[0]['estimate_size']:,.0f} match)",
        f"{med([r['estimate_s'] for r in runs]):.2f} s",
        "",
        "",
        "< 1 s at 1M",
        every("estimate_s", ".2f"),
    )
    table.add_row(
        "StreamMembers (pages of 1,000)",
        f"{med([r['stream'] for r in runs]):,.0f}/s",
        f"{med([r['read_limit'] for r in runs]):,.0f}/s",
        f"{med([r['stream'] / r['read_limit'] for r in runs]):.2f}",
        ">= 50,000/s",
        every("stream", ",.0f"),
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--runs", type=int, default=1, help="fresh database and service per run; medians are reported"
    )
    parser.add_argument(
        "--window", type=int, default=1, help="ImportContacts calls in flight at once (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print each run as a JSON line, no table")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    console = Console(width=150)
    for kind in kinds:
        runs = [run_once(kind, args.contacts, args.postgres_url, args.window) for _ in range(args.runs)]
        if args.json:
            for run in runs:
                print(json.dumps({"db": kind, "contacts": args.contacts, "window": args.window, **run}))
        else:
            console.print(report(kind, args.contacts, args.window, runs))


if __name__ == "__main__":
    main()
