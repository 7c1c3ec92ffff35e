"""Chaos: the infrastructure under the services goes away mid-run and comes back (slow profile;
`make test` restarts the nats-server in test_kill_each_service's one-run-for-all scenario).

- nats-server (the test's own, never the machine's) is stopped and started again on the same
  port and JetStream store while every service, as its own process, is mid-run: step messages in
  the work queue survive in the store, publishes that failed meanwhile are healed by the timer
  loop's nudges, and the run completes with one message per contact.
- PostgreSQL (runs where SHOAL_TEST_POSTGRES_URL is set, like every PostgreSQL test; skipped
  visibly otherwise): every service runs on PostgreSQL, on a private server this test starts
  (initdb on a temporary folder, a free port) so stopping it disturbs nobody else's tests; it is
  crashed (`pg_ctl stop -m immediate`, recovery from the WAL on start) and started again mid-run.
  Where no server binaries are installed, the test uses the shared server of
  SHOAL_TEST_POSTGRES_URL instead and kills every backend of its own databases with
  pg_terminate_backend (the same reconnect path), and says so in the report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from shoal.db import normalise_url
from shoal.natsserver import NatsServer
from tests.chaos.cluster import SERVICES, assert_invariants, cluster, launch, wait_carrier
from tests.chaos.conftest import Recorder
from tests.fixtures_db import POSTGRES_URL, postgres_database
from tests.processes import PostgresInstance, postgres_bin_dir

AUDIENCE = 300
CARRIER = {"SHOAL_SANDBOX_LATENCY_MS": "150"}
EXECUTION = {"batch_size": 10, "provider_batch_size": 10, "provider_concurrency": 1}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_nats_server_restart_mid_run(tmp_path: Path, reliability: Recorder) -> None:
    server = NatsServer(store_dir=tmp_path / "nats" / "store")
    await asyncio.to_thread(server.start)
    try:
        async with cluster(
            nats_url=server.url, tmp_path=tmp_path, execution=EXECUTION, sandbox_env=CARRIER
        ) as c:
            run = await launch(c, AUDIENCE, tag="nats")
            at = await wait_carrier(c, AUDIENCE // 4)
            baseline = await c.sent(run.run_id)
            since = time.monotonic()
            await asyncio.to_thread(server.restart)
            recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
            outcome = await assert_invariants(c, run.campaign_id, audience=AUDIENCE)
            reliability.record(
                contacts=AUDIENCE,
                faults=f"nats-server stopped and started again (same port and store) after {at} messages",
                sent_keys=outcome.keys,
                final_state=outcome.final_state,
                recovery=recovery,
            )
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def private_postgres() -> Iterator[PostgresInstance | None]:
    """A private PostgreSQL server, or None when this machine has no server binaries (or
    PostgreSQL tests are off)."""
    if not POSTGRES_URL or postgres_bin_dir() is None:
        yield None
        return
    instance = PostgresInstance()
    try:
        instance.start()
        yield instance
    finally:
        instance.destroy()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
async def test_postgres_restart_mid_run(
    private_postgres: PostgresInstance | None, tmp_path: Path, nats_url: str, reliability: Recorder
) -> None:
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    shared: list[Iterator[str]] = []
    if private_postgres is not None:
        urls = {name: private_postgres.create_database(f"shoal_{name}") for name in SERVICES}
    else:
        shared = [postgres_database() for _ in SERVICES]
        urls = {name: next(gen) for name, gen in zip(SERVICES, shared, strict=True)}
    try:
        async with cluster(
            nats_url=nats_url,
            tmp_path=tmp_path,
            databases=urls.__getitem__,
            execution=EXECUTION,
            sandbox_env=CARRIER,
        ) as c:
            run = await launch(c, AUDIENCE, tag="postgres")
            at = await wait_carrier(c, AUDIENCE // 4)
            baseline = await c.sent(run.run_id)
            since = time.monotonic()
            if private_postgres is not None:
                await asyncio.to_thread(private_postgres.restart, "immediate")
                fault = (
                    "PostgreSQL server of all 5 services crashed (pg_ctl stop -m immediate) and "
                    f"started again after {at} messages"
                )
            else:
                killed = await asyncio.to_thread(terminate_backends, list(urls.values()))
                fault = (
                    f"SUBSTITUTE for a restart (no server binaries): pg_terminate_backend of all "
                    f"{killed} connections of the 5 services' databases after {at} messages"
                )
            recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
            outcome = await assert_invariants(c, run.campaign_id, audience=AUDIENCE)
            reliability.record(
                contacts=AUDIENCE,
                faults=fault,
                sent_keys=outcome.keys,
                final_state=outcome.final_state,
                recovery=recovery,
            )
    finally:
        for gen in shared:
            for _ in gen:
                pass


def terminate_backends(urls: list[str]) -> int:
    """Kill every server process connected to these databases; how many were killed."""
    names = [u.rsplit("/", 1)[1] for u in urls]
    admin = create_engine(normalise_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = ANY(:names) AND pid <> pg_backend_pid()"
                    ),
                    {"names": names},
                ).all()
            )
    finally:
        admin.dispose()
