"""The chaos matrix's mesh: every service as its own OS process, and the checks every scenario ends with.

`cluster()` starts the sandbox carrier and the five services (`python -m services.<name>`, each
on its own database: SQLite files, or PostgreSQL databases from `databases`), wired to one
nats-server under a namespace of their own. Any service can be killed with SIGKILL and started
again on the same port and database (`kill`, `restart`). The campaign service can instead run in
this process with an injected clock (`campaign_clock`), for the scheduler's clock-jump scenario.

`assert_invariants` is what every scenario must hold at the end: every contact in exactly one
terminal state, the carrier got exactly the eligible sends and none twice, billing captured once
per send, free balance never went below zero, the ledger rebuilds the balance, one run, and the
campaign in the state the scenario expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from shoal.grpc import GrpcServer, wait_healthy
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import (
    billing_pb2_grpc,
    campaign_pb2_grpc,
    execution_pb2_grpc,
    segment_pb2_grpc,
    template_pb2_grpc,
)
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import template_pb2 as tpb
from tests.helpers import wait_for
from tests.integration.test_execution_faults import email_template, seed_audience
from tests.processes import SandboxProcess, ServiceProcess

WORKSPACE = "ws_chaos"
SERVICES = ("segment", "template", "billing", "execution", "campaign")
TERMINAL = {epb.EXECUTION_STATE_COMPLETED, epb.EXECUTION_STATE_FAILED, epb.EXECUTION_STATE_SKIPPED}
# Short leases and nudges: a batch cut by a dead peer or a dead worker is retried within seconds
# (production keeps 60 s and 5 min; the mechanism is the same).
EXECUTION_DEFAULTS: dict[str, Any] = {
    "lease_seconds": 3,
    "renudge_seconds": 5,
    "timer_interval_seconds": 0.1,
    "retry_backoff_seconds": 0.5,
    "fetch_timeout_seconds": 0.2,
}


@dataclass
class Cluster:
    workspace_id: str
    namespace: str
    nats_url: str
    data: Path
    sandbox: SandboxProcess
    databases: dict[str, str]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    servers: dict[str, GrpcServer] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    segment: Any = None
    template: Any = None
    billing: Any = None
    campaign: Any = None
    execution: Any = None

    def address(self, name: str) -> str:
        if name in self.procs:
            return self.procs[name].address
        return self.servers[name].address

    async def kill(self, name: str) -> None:
        """SIGKILL: no shutdown, whatever was in flight stays as it was."""
        await asyncio.to_thread(self.procs[name].kill)

    async def start(self, name: str) -> None:
        """Start a killed or stopped service again, same port and database; wait until SERVING."""
        proc = self.procs[name]
        await asyncio.to_thread(proc.start)
        await wait_healthy(proc.address, within=60)

    async def restart(self, name: str) -> None:
        await self.kill(name)
        await self.start(name)

    async def all_healthy(self) -> None:
        for name in SERVICES:
            await wait_healthy(self.address(name), within=60)

    def carrier_count(self) -> int:
        return int(self.sandbox.get("/v1/messages/count", workspace_id=self.workspace_id)["count"])

    def carrier_keys(self) -> list[str]:
        """Every message the carrier accepted for this workspace (a duplicate shows up twice)."""
        keys: list[str] = []
        after = 0
        while True:
            page = self.sandbox.get("/v1/messages", workspace_id=self.workspace_id, limit=1000, after=after)
            keys.extend(msg["idempotency_key"] for msg in page["messages"])
            if not page.get("next_after"):
                return keys
            after = page["next_after"]

    async def run_counts(self, run_id: str) -> Any:
        return await self.execution.GetRunCounts(
            epb.GetRunCountsRequest(workspace_id=self.workspace_id, run_id=run_id), timeout=5
        )

    async def sent(self, run_id: str) -> int:
        return int((await self.run_counts(run_id)).sent)

    async def recovered(self, run_id: str, *, since: float, baseline: int, timeout: float = 120) -> float:
        """Seconds from `since` until every service answers and the run moves again: the
        execution service committed sends beyond `baseline`, or nothing is left to do."""
        await self.all_healthy()

        async def moving() -> bool:
            try:
                reply = await self.run_counts(run_id)
            except grpc.aio.AioRpcError:
                return False
            c = reply.counts
            return reply.sent > baseline or (reply.fanout_done and not c.pending and not c.processing)

        await wait_for(moving, timeout=timeout, interval=0.05, message="the run to move again")
        return time.monotonic() - since


def _env(name: str, values: dict[str, Any]) -> dict[str, str]:
    return {f"SHOAL_{name.upper()}_{k.upper()}": str(v) for k, v in values.items()}


@asynccontextmanager
async def cluster(
    *,
    nats_url: str,
    tmp_path: Path,
    databases: Callable[[str], str] | None = None,
    execution: dict[str, Any] | None = None,
    sandbox_env: dict[str, str] | None = None,
    billing: dict[str, Any] | None = None,
    campaign_clock: Callable[[], datetime] | None = None,
) -> AsyncIterator[Cluster]:
    """Start the carrier and the five services in dependency order; stop everything on exit."""
    namespace = f"c{uuid.uuid4().hex[:10]}"
    data = tmp_path / "cluster"
    data.mkdir(parents=True, exist_ok=True)
    sandbox = SandboxProcess(data / "sandbox", **(sandbox_env or {}))
    sandbox.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(sandbox.start)
    urls = {name: databases(name) if databases else f"sqlite:///{data / f'{name}.db'}" for name in SERVICES}
    c = Cluster(
        workspace_id=WORKSPACE,
        namespace=namespace,
        nats_url=nats_url,
        data=data,
        sandbox=sandbox,
        databases=urls,
    )
    shared = {
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_NAMESPACE": namespace,
        "SHOAL_SANDBOX_URL": sandbox.url,
        "SHOAL_SHUTDOWN_GRACE_SECONDS": "1",
    }
    own: dict[str, dict[str, Any]] = {
        "segment": {},
        "template": {},
        # The outbox's repair loop (events a crash left unsent) runs every second, not every ten.
        "billing": {"background_interval_seconds": 1.0, **(billing or {})},
        "execution": {**EXECUTION_DEFAULTS, **(execution or {})},
        "campaign": {"scheduler_interval_seconds": 0.2},
    }

    def process(name: str, **peers: str) -> ServiceProcess:
        env = {**shared, **_env(name, {**own[name], "database_url": urls[name]}), **peers}
        proc = c.procs[name] = ServiceProcess(name, data, **env)
        proc.spawn()
        return proc

    try:
        first = [process(name) for name in ("segment", "template", "billing")]
        for proc in first:
            await asyncio.to_thread(proc.wait_started)
        peers = {f"SHOAL_{p.name.upper()}_ADDR": p.address for p in first}
        await asyncio.to_thread(process("execution", **peers).wait_started)
        peers["SHOAL_EXECUTION_ADDR"] = c.procs["execution"].address
        if campaign_clock is None:
            await asyncio.to_thread(process("campaign", **peers).wait_started)
        else:
            from services.campaign.config import CampaignSettings
            from services.campaign.server import build as build_campaign

            settings = CampaignSettings.load(
                port=0,
                nats_url=nats_url,
                data_dir=data,
                log_json=False,
                database_url=urls["campaign"],
                segment_addr=peers["SHOAL_SEGMENT_ADDR"],
                template_addr=peers["SHOAL_TEMPLATE_ADDR"],
                billing_addr=peers["SHOAL_BILLING_ADDR"],
                execution_addr=peers["SHOAL_EXECUTION_ADDR"],
                **own["campaign"],
            )
            server = await build_campaign(settings, namespace=namespace, clock=campaign_clock)
            await server.start()
            c.servers["campaign"] = server
        await c.all_healthy()
        stubs = {
            "segment": segment_pb2_grpc.SegmentServiceStub,
            "template": template_pb2_grpc.TemplateServiceStub,
            "billing": billing_pb2_grpc.BillingServiceStub,
            "campaign": campaign_pb2_grpc.CampaignServiceStub,
            "execution": execution_pb2_grpc.ExecutionServiceStub,
        }
        for name, stub in stubs.items():
            ch = grpc.aio.insecure_channel(c.address(name))
            c.channels.append(ch)
            setattr(c, name, stub(ch))
        yield c
    finally:
        for ch in c.channels:
            await ch.close()
        for server in c.servers.values():
            await server.stop(grace=1.0)
        for name in reversed(SERVICES):
            running = c.procs.get(name)
            if running is not None and running.proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(running.terminate)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(sandbox.terminate)


# -- the end-of-scenario checks -----------------------------------------------------------------


@dataclass
class Outcome:
    status: Any
    run_id: str
    keys: list[str]
    captures: int
    free_cents: int
    final_state: str


async def status(c: Cluster, campaign_id: str) -> Any:
    return await c.campaign.GetCampaignStatus(
        cpb.GetCampaignStatusRequest(workspace_id=c.workspace_id, campaign_id=campaign_id), timeout=10
    )


async def wait_state(c: Cluster, campaign_id: str, state: int, *, timeout: float = 60) -> Any:
    """Poll until the campaign is in `state` (a campaign service being restarted answers later)."""

    async def reached() -> Any:
        try:
            reply = await status(c, campaign_id)
        except grpc.aio.AioRpcError:
            return None
        return reply if reply.state == state else None

    def where() -> str:
        return f"waiting for {cpb.CampaignState.Name(state)}"

    return await wait_for(reached, timeout=timeout, interval=0.1, message=where)


async def ledger_entries(c: Cluster) -> list[Any]:
    entries: list[Any] = []
    token = ""
    while True:
        page = await c.billing.ListLedger(
            bpb.ListLedgerRequest(
                workspace_id=c.workspace_id, page=common.PageRequest(page_size=1000, page_token=token)
            )
        )
        entries.extend(page.entries)
        token = page.page.next_page_token
        if not token:
            return entries


async def executions_of(c: Cluster, run_id: str) -> list[Any]:
    found: list[Any] = []
    token = ""
    while True:
        page = await c.execution.ListExecutions(
            epb.ListExecutionsRequest(
                workspace_id=c.workspace_id,
                run_id=run_id,
                page=common.PageRequest(page_size=1000, page_token=token),
            )
        )
        found.extend(page.executions)
        token = page.page.next_page_token
        if not token:
            return found


async def assert_invariants(
    c: Cluster,
    campaign_id: str,
    *,
    audience: int,
    sends_per_contact: int = 1,
    sends: int | None = None,
    state: int = cpb.CAMPAIGN_STATE_COMPLETED,
    timeout: float = 120,
) -> Outcome:
    """Wait for the campaign's final `state`, then check everything the matrix promises.
    `sends`: the eligible sends, when not `audience x sends_per_contact` (a branch sends to some)."""
    done = await wait_state(c, campaign_id, state, timeout=timeout)
    ws = c.workspace_id
    runs = await c.campaign.ListRuns(cpb.ListRunsRequest(workspace_id=ws, campaign_id=campaign_id))
    assert [r.id for r in runs.runs] == [done.run_id], f"one run expected, got {runs.runs}"

    # Every contact in exactly one terminal state.
    executions = await executions_of(c, done.run_id)
    contacts = [e.contact_id for e in executions]
    assert len(contacts) == len(set(contacts)) == audience, (
        f"{len(contacts)} executions for {len(set(contacts))} contacts, audience {audience}"
    )
    stuck = [
        (e.id, epb.ExecutionState.Name(e.state), e.node_id) for e in executions if e.state not in TERMINAL
    ]
    assert not stuck, f"{len(stuck)} executions not terminal, e.g. {stuck[:5]}"
    counts = done.counts
    assert (counts.pending, counts.processing) == (0, 0), counts
    assert counts.completed + counts.failed + counts.skipped == audience, counts

    # The carrier: exactly the eligible sends, none twice, and each one recorded as sent.
    keys = c.carrier_keys()
    expected = audience * sends_per_contact if sends is None else sends
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} messages sent twice"
    assert len(keys) == expected, f"the carrier got {len(keys)} messages, {expected} eligible sends"
    assert done.sent == len(keys), f"{done.sent} sends recorded, {len(keys)} at the carrier"

    # Billing: one capture per send, free balance never below zero, the ledger rebuilds it.
    entries = await ledger_entries(c)
    captures = [e.key for e in entries if e.kind == bpb.LEDGER_ENTRY_KIND_CAPTURE]
    assert len(captures) == len(set(captures)), "a hold captured twice"
    assert set(captures) == set(keys), (
        f"{len(set(keys) - set(captures))} sends not captured, "
        f"{len(set(captures) - set(keys))} captures without a send"
    )
    holds = [e.key for e in entries if e.kind == bpb.LEDGER_ENTRY_KIND_HOLD]
    assert len(holds) == len(set(holds)), "a key held twice"
    free = reserved = 0
    lowest = 0
    for e in entries:
        free += e.free_delta_cents
        reserved += e.reserved_delta_cents
        lowest = min(lowest, free)
    assert lowest >= 0, f"free balance went down to {lowest} cents"
    balance = (await c.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))).balance
    assert (balance.free_cents, balance.reserved_cents) == (free, reserved), (
        f"balance {balance.free_cents}/{balance.reserved_cents}, ledger rebuilds {free}/{reserved}"
    )
    assert balance.reserved_cents == 0, f"{balance.reserved_cents} cents still reserved"
    return Outcome(
        status=done,
        run_id=done.run_id,
        keys=keys,
        captures=len(captures),
        free_cents=balance.free_cents,
        final_state=cpb.CampaignState.Name(state).removeprefix("CAMPAIGN_STATE_"),
    )


# -- a campaign to break ------------------------------------------------------------------------


def send_step(step_id: str, template_id: str) -> cpb.Step:
    return cpb.Step(
        id=step_id,
        send=cpb.SendStep(
            channel=common.CHANNEL_EMAIL,
            message_type=common.MESSAGE_TYPE_MESSAGE,
            template=tpb.TemplateRef(template_id=template_id),
        ),
    )


@dataclass
class Launched:
    campaign_id: str
    run_id: str


async def launch(c: Cluster, audience: int, *, tag: str, top_up_cents: int = 10_000) -> Launched:
    """Seed `audience` consenting contacts and a published email template, top up, and start a
    manual SEND -> END campaign over them."""
    if top_up_cents:
        await c.billing.TopUp(bpb.TopUpRequest(workspace_id=c.workspace_id, amount_cents=top_up_cents))
    campaign_id = await create_campaign(c, audience, tag=tag)
    started = await c.campaign.StartCampaign(
        cpb.StartCampaignRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
    )
    return Launched(campaign_id, started.run_id)


async def create_campaign(c: Cluster, audience: int, *, tag: str, trigger: cpb.Trigger | None = None) -> str:
    segment_id = await seed_audience(c, audience, tag=tag)  # type: ignore[arg-type]
    template_id = await email_template(c)  # type: ignore[arg-type]
    created = await c.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=c.workspace_id,
            name=tag,
            segment_id=segment_id,
            trigger=trigger or cpb.Trigger(manual=cpb.ManualTrigger()),
            flow=cpb.Flow(steps=[send_step("s1", template_id), cpb.Step(id="e1", end=cpb.EndStep())]),
        )
    )
    return str(created.campaign.id)


async def wait_carrier(c: Cluster, count: int, *, timeout: float = 60) -> int:
    """Wait until the carrier accepted at least `count` messages of the workspace."""
    return int(
        await wait_for(lambda: (n := c.carrier_count()) >= count and n, timeout=timeout, interval=0.05)
    )
