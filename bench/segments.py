"""Segment benchmark: bulk import, Estimate and StreamMembers at scale, the service as its own process.

    .venv/bin/python bench/segments.py --contacts 1000000                 # SQLite
    .venv/bin/python bench/segments.py --contacts 200000 --db postgres

Starts `python -m services.segment` (no NATS: events off) on a fresh database, imports the
audience through ImportContacts in calls of 10,000, then measures Estimate on a 3-condition
filter (tag AND custom field AND consent) and StreamMembers over the whole audience. The raw
limits measured in the same run: a bare executemany insert of the same contact rows, and a bare
keyset-paged SELECT of them, with no Shoal code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


async def bench(address: str, count: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = segment_pb2_grpc.SegmentServiceStub(ch)
        t0 = time.perf_counter()
        for start in range(0, count, 10_000):
            reply = await stub.ImportContacts(
                spb.ImportContactsRequest(
                    workspace_id=WS, contacts=[contact(i) for i in range(start, min(start + 10_000, count))]
                ),
                timeout=600,
            )
            assert not reply.rejected, reply.rejected[:3]
        import_rate = count / (time.perf_counter() - t0)
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
            "estimate_s": sorted(timings)[1],
            "estimate_size": size,
            "stream": stream_rate,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="shoal-segbench-"))
    created: list[str] = []
    admin = None
    if args.db == "postgres":
        admin = create_engine(normalise_url(args.postgres_url), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for what in ("svc", "raw"):
                name = f"segbench_{what}_{uuid.uuid4().hex[:6]}"
                conn.execute(text(f'CREATE DATABASE "{name}"'))
                created.append(name)
        base = args.postgres_url.rsplit("/", 1)[0]
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
        insert_limit, read_limit = raw_limits(raw_db, min(args.contacts, 200_000))
        result = asyncio.run(bench(address, args.contacts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if admin is not None:
            with admin.connect() as conn:
                for name in created:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    table = Table(title=f"Segment service: {args.contacts:,} contacts on {args.db}")
    for col in ("measure", "Shoal", "raw limit", "ratio", "target"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row(
        "import (ImportContacts, 10k per call)",
        f"{result['import']:,.0f}/s",
        f"{insert_limit:,.0f}/s",
        f"{result['import'] / insert_limit:.2f}",
        ">= 20,000/s",
    )
    table.add_row(
        f"Estimate, 3 conditions ({result['estimate_size']:,.0f} match)",
        f"{result['estimate_s']:.2f} s",
        "",
        "",
        "< 1 s at 1M",
    )
    table.add_row(
        "StreamMembers (pages of 1,000)",
        f"{result['stream']:,.0f}/s",
        f"{read_limit:,.0f}/s",
        f"{result['stream'] / read_limit:.2f}",
        ">= 50,000/s",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
