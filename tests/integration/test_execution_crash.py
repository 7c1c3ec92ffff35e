"""Crashes mid-run lose nothing and send nothing twice (issue 7's crash test).

A run of 20,000 contacts with a SEND. The execution service runs as its own process and is
killed with SIGKILL three times mid-run, then started again on the same database; in a second
test the nats-server itself is restarted mid-run. Afterwards every contact is in exactly one
terminal state, the sandbox carrier received exactly one message per contact, and billing
captured exactly one hold per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal.grpc import wait_healthy
from shoal.natsserver import NatsServer
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import execution_pb2 as epb
from tests.helpers import wait_for
from tests.integration.test_execution_faults import (
    email_template,
    sandbox_keys,
    seed_audience,
    start_campaign,
    status,
)
from tests.mesh import Mesh, mesh

AUDIENCE = 20_000
EXECUTION = {"lease_seconds": 3, "renudge_seconds": 5, "batch_size": 500, "provider_batch_size": 250}


async def seed_large(m: Mesh) -> str:
    await m.billing.TopUp(bpb.TopUpRequest(workspace_id=m.workspace_id, amount_cents=100_000))
    return await seed_audience(m, AUDIENCE, tag="crash")


async def sent(m: Mesh) -> int:
    return int(m.sandbox.get("/v1/messages/count", workspace_id=m.workspace_id)["count"])


async def assert_exactly_once(m: Mesh, campaign_id: str) -> None:
    done = await wait_for(
        lambda: _completed(m, campaign_id), timeout=240, interval=0.5, message="the run to complete"
    )
    assert done.counts.completed == AUDIENCE
    assert (done.counts.pending, done.counts.processing, done.counts.failed, done.counts.skipped) == (
        0,
        0,
        0,
        0,
    )
    # Every contact in exactly one terminal state: one execution each, all completed.
    contacts: set[str] = set()
    token = ""
    total = 0
    while True:
        page = await m.execution.ListExecutions(
            epb.ListExecutionsRequest(
                workspace_id=m.workspace_id,
                run_id=done.run_id,
                page=common.PageRequest(page_size=1000, page_token=token),
            )
        )
        total += len(page.executions)
        contacts.update(e.contact_id for e in page.executions)
        assert all(e.state == epb.EXECUTION_STATE_COMPLETED for e in page.executions)
        token = page.page.next_page_token
        if not token:
            break
    assert total == len(contacts) == AUDIENCE
    keys = sandbox_keys(m)
    assert len(keys) == AUDIENCE, f"sandbox received {len(keys)} messages for {AUDIENCE} contacts"
    assert len(set(keys)) == AUDIENCE
    balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=m.workspace_id))
    assert balance.balance.reserved_cents == 0
    assert balance.balance.free_cents == 100_000 - AUDIENCE * 1, "one capture per message, at 1 cent"


async def _completed(m: Mesh, campaign_id: str) -> Any:
    reply = await status(m, campaign_id)
    return reply if reply.state == cpb.CAMPAIGN_STATE_COMPLETED else None


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_worker_killed_three_times(nats_url: str, tmp_path: Path) -> None:
    async with mesh(
        nats_url=nats_url, tmp_path=tmp_path, execution=EXECUTION, execution_as_process=True
    ) as m:
        segment_id = await seed_large(m)
        campaign_id = await start_campaign(m, segment_id, await email_template(m))
        proc = m.execution_process
        assert proc is not None
        for fraction in (0.15, 0.45, 0.75):
            target = int(AUDIENCE * fraction)
            await wait_for(lambda t=target: _at_least(m, t), timeout=120, interval=0.2)
            proc.kill()
            proc.start()
            await wait_healthy(proc.address, within=30)
        await assert_exactly_once(m, campaign_id)


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_nats_restarted_mid_run(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        async with mesh(nats_url=server.url, tmp_path=tmp_path, execution=EXECUTION) as m:
            segment_id = await seed_large(m)
            campaign_id = await start_campaign(m, segment_id, await email_template(m))
            await wait_for(lambda: _at_least(m, AUDIENCE // 3), timeout=120, interval=0.2)
            server.restart()
            await assert_exactly_once(m, campaign_id)


async def _at_least(m: Mesh, count: int) -> bool:
    return await sent(m) >= count
