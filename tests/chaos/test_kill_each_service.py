"""Chaos: kill -9 of each service in turn, mid-run, then start it again on the same port and database.

Every service runs as its own OS process. The carrier is slowed a little (one call of 10
messages at a time, 150 ms each) so the run is still sending when the kill lands. Whichever
process dies - the segment service (eligibility), the template service (rendering), billing
(holds and captures), the campaign service (completion), or the execution service itself (the
workers) - the run completes with every contact sent exactly one message and billed once.

`make test` runs the short profile: one run in which every service, then the nats-server, is
killed and restarted in turn. The slow profile gives each service a run of its own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shoal.natsserver import NatsServer
from tests.chaos.cluster import SERVICES, assert_invariants, cluster, launch, wait_carrier
from tests.chaos.conftest import Recorder

CARRIER = {"SHOAL_SANDBOX_LATENCY_MS": "150"}
EXECUTION = {"batch_size": 10, "provider_batch_size": 10, "provider_concurrency": 1}


@pytest.mark.timeout(300)
async def test_every_component_killed_in_turn(tmp_path: Path, reliability: Recorder) -> None:
    audience = 800
    server = NatsServer(store_dir=tmp_path / "nats" / "store")
    await asyncio.to_thread(server.start)
    try:
        async with cluster(
            nats_url=server.url, tmp_path=tmp_path, execution=EXECUTION, sandbox_env=CARRIER
        ) as c:
            run = await launch(c, audience, tag="in-turn")
            recoveries: list[str] = []
            worst = 0.0
            for component in [*SERVICES, "nats-server"]:
                # Some sending between two faults, and enough left for the next one to land mid-run.
                at = await wait_carrier(c, c.carrier_count() + 30)
                assert at < audience - 100, f"the run was nearly done before {component} was killed"
                baseline = await c.sent(run.run_id)
                since = time.monotonic()
                if component == "nats-server":
                    await asyncio.to_thread(server.restart)
                else:
                    await c.kill(component)
                    await c.start(component)
                took = await c.recovered(run.run_id, since=since, baseline=baseline)
                worst = max(worst, took)
                recoveries.append(f"{component} at {at} ({took:.1f} s)")
            outcome = await assert_invariants(c, run.campaign_id, audience=audience)
            reliability.record(
                contacts=audience,
                faults="kill -9 and restart, one after another in one run, of "
                + ", ".join(recoveries)
                + " (nats-server: stop and start, same port and store)",
                sent_keys=outcome.keys,
                final_state=outcome.final_state,
                recovery=worst,
            )
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("service", SERVICES)
async def test_kill_one_service_mid_run(
    service: str, nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    audience = 300
    async with cluster(nats_url=nats_url, tmp_path=tmp_path, execution=EXECUTION, sandbox_env=CARRIER) as c:
        run = await launch(c, audience, tag=f"kill-{service}")
        at = await wait_carrier(c, audience // 4)
        baseline = await c.sent(run.run_id)
        since = time.monotonic()
        await c.kill(service)
        await c.start(service)
        recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience)
        reliability.record(
            contacts=audience,
            faults=f"kill -9 of the {service} process after {at} messages, restarted",
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )
