"""Follow one execution in Jaeger: the spans every process exports, received by a real OTLP collector.

Every service, the sandbox carrier and the gateway run as their own OS processes, exporting over
OTLP/gRPC (the SDK's own exporter and batch processor) to `tests.otlp_collector`, which stands
where Jaeger would. Two API-triggered campaigns (SEND -> WAIT -> SEND -> END over the same three
contacts) are triggered through the REST gateway at the same time, each with its own caller
`traceparent`, so their step messages share the execution workers' batches. The assertions are
about what a person opening Jaeger would rely on:

- each run is one trace, the caller's: the trigger request, the campaign service, the fan-out,
  every step of every execution (before and after the WAIT) and every gRPC call the workers make;
  GetExecution reports that trace id for each of the run's executions; the two runs never mix;
- parents are intact from the caller to the provider, across NATS and across the WAIT, where the
  timer loop republishes the parked executions with the context they were created under;
- a span per execution step carries `shoal.execution.id` (Jaeger's tag search) and links to the
  node spans that did its work;
- a receipt is a trace of its own (the carrier calls back) whose spans carry the execution and
  send key; the execution service's consumer span links to the step span that sent the message.

A trace is per run, not per execution: node spans stand for a group of executions (design.md
§5), and a group can only be in one trace; the run starts in the caller's trace. The smaller
tests below pin what the big one can only meet by chance (a batch mixing two runs, a receipt
overtaking its send) and sampling in a process without an exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
from google.protobuf import duration_pb2
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind
from sqlalchemy import select

from gateway.keys import bootstrap_admin_key
from services.execution import receipts as receipt_consumer
from services.execution import repo
from services.execution.config import ExecutionSettings
from services.execution.engine import Engine
from services.execution.peers import Peers
from services.execution.server import MIGRATIONS as EXECUTION_MIGRATIONS
from shoal.bus import Bus, Delivery
from shoal.campaign_states import RUNNING, CampaignStates
from shoal.db import Database
from shoal.grpc import wait_healthy
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
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.helpers import wait_for
from tests.otlp_collector import OtlpCollector, ReceivedSpan, TraceTree
from tests.processes import REPO, SandboxProcess, ServiceProcess, wait_until

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE
WORKSPACE = "ws_trace"
CONTACTS = 3
WAIT_SECONDS = 2
SECRET = secrets.token_urlsafe(32)
SERVICES = ("segment", "template", "billing", "execution", "campaign")
# Seven Python processes start at once on a shared two-core machine: generous, only used on failure.
STARTUP_SECONDS = 60


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class GatewayProcess:
    """`python -m gateway` on a given port, healthy when /healthz answers."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = data_dir / "gateway.log"
        self.env = {"SHOAL_GATEWAY_PORT": str(port), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(self.env)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway"], cwd=REPO, env=env, stdout=log, stderr=log
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(healthy, timeout=STARTUP_SECONDS, what="gateway /healthz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.logs()}") from None

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class ProcessMesh:
    sandbox: SandboxProcess
    services: dict[str, ServiceProcess]
    gateway: GatewayProcess
    key: str = ""
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stubs: dict[str, Any] = field(default_factory=dict)

    def logs(self) -> str:
        parts = [f"--- {n}\n{p.logs()}" for n, p in self.services.items()]
        return "\n".join(
            [*parts, f"--- gateway\n{self.gateway.logs()}", f"--- sandbox\n{self.sandbox.logs()}"]
        )


@contextlib.asynccontextmanager
async def process_mesh(nats_url: str, tmp_path: Path, otel: dict[str, str]) -> AsyncIterator[ProcessMesh]:
    """Sandbox, five services and the gateway, each its own process, started together on free ports.

    The sandbox first (it picks its own port, and `SandboxProcess` allows it 15 s, which seven
    processes starting together on a busy machine can exceed); then the rest at once, on ports
    chosen here.
    """
    data = tmp_path / "mesh"
    data.mkdir()
    namespace = f"tr{secrets.token_hex(5)}"
    ports = dict(zip((*SERVICES, "gateway"), free_ports(len(SERVICES) + 1), strict=True))
    addrs = {f"SHOAL_{n.upper()}_ADDR": f"127.0.0.1:{ports[n]}" for n in SERVICES}
    gateway_url = f"http://127.0.0.1:{ports['gateway']}"
    telemetry = {**otel, "SHOAL_TRACE_SAMPLE_RATIO": "1"}
    sandbox = SandboxProcess(
        data / "sandbox",
        SHOAL_SANDBOX_CALLBACK_URL=f"{gateway_url}/v1/providers/sandbox/events",
        SHOAL_SANDBOX_CALLBACK_SECRET=SECRET,
        SHOAL_SANDBOX_OPEN_RATE="1",
        SHOAL_SANDBOX_CLICK_RATE="0",
        SHOAL_SANDBOX_RECEIPT_FLUSH_MS="20",
        **telemetry,
    )
    sandbox.data_dir.mkdir()
    shared = {
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_NAMESPACE": namespace,
        "SHOAL_SHUTDOWN_GRACE_SECONDS": "1",
        **addrs,
        **telemetry,
    }
    own = {
        "execution": {
            "SHOAL_EXECUTION_TIMER_INTERVAL_SECONDS": "0.1",
            "SHOAL_EXECUTION_FETCH_TIMEOUT_SECONDS": "0.2",
            "SHOAL_EXECUTION_RETRY_BACKOFF_SECONDS": "0.5",
        },
        "campaign": {"SHOAL_CAMPAIGN_SCHEDULER_INTERVAL_SECONDS": "0.2"},
    }
    services = {
        n: ServiceProcess(n, data, **shared, **{f"SHOAL_{n.upper()}_PORT": str(ports[n])}, **own.get(n, {}))
        for n in SERVICES
    }
    gateway_db = f"sqlite:///{data / 'gateway.db'}"
    key = bootstrap_admin_key(gateway_db, WORKSPACE)
    assert key is not None
    gateway = GatewayProcess(
        data,
        ports["gateway"],
        SHOAL_DATA_DIR=str(data),
        SHOAL_GATEWAY_DATABASE_URL=gateway_db,
        SHOAL_GATEWAY_SANDBOX_CALLBACK_SECRET=SECRET,
        SHOAL_LOG_JSON="false",
        **shared,
    )
    m = ProcessMesh(sandbox, services, gateway, key=key)
    processes: list[ServiceProcess | GatewayProcess] = [*services.values(), gateway]
    try:
        await asyncio.to_thread(sandbox.start)
        services["execution"].env["SHOAL_SANDBOX_URL"] = sandbox.url
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        await asyncio.gather(*(wait_healthy(p.address, within=STARTUP_SECONDS) for p in services.values()))
        stubs = {
            "segment": segment_pb2_grpc.SegmentServiceStub,
            "template": template_pb2_grpc.TemplateServiceStub,
            "billing": billing_pb2_grpc.BillingServiceStub,
            "campaign": campaign_pb2_grpc.CampaignServiceStub,
            "execution": execution_pb2_grpc.ExecutionServiceStub,
        }
        for name, stub in stubs.items():
            ch = grpc.aio.insecure_channel(services[name].address)
            m.channels.append(ch)
            m.stubs[name] = stub(ch)
        yield m
    finally:
        for ch in m.channels:
            await ch.close()
        for p in reversed(processes):
            if p.proc is not None:
                await asyncio.to_thread(p.terminate)
        if sandbox.proc is not None:
            await asyncio.to_thread(sandbox.terminate)


# -- seeding -------------------------------------------------------------------------------------


async def seed(m: ProcessMesh) -> tuple[str, str]:
    """Three consenting contacts in a segment, a published email template, money; their ids."""
    seg, tpl, bil = m.stubs["segment"], m.stubs["template"], m.stubs["billing"]
    await bil.TopUp(bpb.TopUpRequest(workspace_id=WORKSPACE, amount_cents=5_000))
    reply = await seg.ImportContacts(
        spb.ImportContactsRequest(
            workspace_id=WORKSPACE,
            contacts=[
                spb.ContactInput(
                    email=f"trace{i}@example.com",
                    first_name=f"T{i}",
                    tags=["traced"],
                    status=spb.CONTACT_STATUS_ACTIVE,
                    consents=[
                        spb.ConsentInput(
                            channel=EMAIL,
                            message_type=MESSAGE,
                            status=spb.CONSENT_STATUS_GRANTED,
                            source="test",
                        )
                    ],
                )
                for i in range(CONTACTS)
            ],
        )
    )
    assert reply.imported == CONTACTS, reply.rejected
    segment = await seg.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=WORKSPACE, name="traced", filter=spb.Filter(tag=spb.TagCondition(tag="traced"))
        )
    )
    created = await tpl.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=WORKSPACE,
            name="t",
            channel=EMAIL,
            message_type=MESSAGE,
            content=tpb.TemplateContent(
                email=tpb.EmailContent(subject="Hi {{ contact.first_name }}", html="<p>x</p>")
            ),
            variables=[tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING, required=True)],
        )
    )
    await tpl.PublishTemplate(
        tpb.PublishTemplateRequest(workspace_id=WORKSPACE, template_id=created.template.id, version=1)
    )
    return segment.segment.id, created.template.id


def send_step(step_id: str, template_id: str) -> cpb.Step:
    return cpb.Step(
        id=step_id,
        send=cpb.SendStep(
            channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
        ),
    )


async def api_campaign(m: ProcessMesh, name: str, segment_id: str, template_id: str) -> str:
    created = await m.stubs["campaign"].CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=WORKSPACE,
            name=name,
            segment_id=segment_id,
            trigger=cpb.Trigger(api=cpb.ApiTrigger()),
            flow=cpb.Flow(
                steps=[
                    send_step("s1", template_id),
                    cpb.Step(
                        id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=WAIT_SECONDS))
                    ),
                    send_step("s2", template_id),
                    cpb.Step(id="e1", end=cpb.EndStep()),
                ]
            ),
        )
    )
    return str(created.campaign.id)


# -- the test ------------------------------------------------------------------------------------

TRIGGER_SPAN = "POST /v1/campaigns/{campaign_id}/trigger"
CALLBACK_SPAN = "POST /v1/providers/{provider}/events"
CARRIER_SPAN = "POST /v1/messages:batch"
NODE_CALLS = {
    "/shoal.v1.SegmentService/CheckEligibility": "segment",
    "/shoal.v1.TemplateService/RenderBatch": "template",
    "/shoal.v1.BillingService/HoldBatch": "billing",
}


@dataclass
class Run:
    name: str
    caller_trace: str
    caller_span: str
    campaign_id: str = ""
    run_id: str = ""
    # execution id -> the trace id GetExecution reports for it
    executions: dict[str, str] = field(default_factory=dict)
    sends: list[str] = field(default_factory=list)

    @property
    def traceparent(self) -> str:
        return f"00-{self.caller_trace}-{self.caller_span}-01"


def attr(span: ReceivedSpan, name: str) -> Any:
    return span.attributes.get(name)


def only(spans: list[ReceivedSpan], what: str) -> ReceivedSpan:
    assert len(spans) == 1, f"expected one {what}, got {[str(s) for s in spans]}"
    return spans[0]


def children(tree: TraceTree, span: ReceivedSpan, name: str, kind: str, service: str) -> list[ReceivedSpan]:
    return [
        c for c in tree.children.get(span.span_id, []) if (c.name, c.kind, c.service) == (name, kind, service)
    ]


async def trigger_both(m: ProcessMesh, runs: list[Run]) -> None:
    """Both campaigns at once through REST, each request with its caller's traceparent."""
    headers = {"Authorization": f"Bearer {m.key}"}
    async with httpx.AsyncClient(base_url=m.gateway.url, timeout=10) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    f"/v1/campaigns/{r.campaign_id}/trigger",
                    json={},
                    headers={**headers, "traceparent": r.traceparent},
                )
                for r in runs
            )
        )
    for r, reply in zip(runs, replies, strict=True):
        assert reply.status_code == 202, reply.text
        r.run_id = reply.json()["run_id"]


async def finish(m: ProcessMesh, r: Run) -> None:
    """Wait for COMPLETED; record each execution's reported trace id and its send keys."""

    async def completed() -> bool:
        s = await m.stubs["campaign"].GetCampaignStatus(
            cpb.GetCampaignStatusRequest(workspace_id=WORKSPACE, campaign_id=r.campaign_id)
        )
        return bool(s.state == cpb.CAMPAIGN_STATE_COMPLETED)

    await wait_for(completed, timeout=30, interval=0.2, message=m.logs)
    listed = await m.stubs["execution"].ListExecutions(
        epb.ListExecutionsRequest(
            workspace_id=WORKSPACE, run_id=r.run_id, page=common.PageRequest(page_size=10)
        )
    )
    assert len(listed.executions) == CONTACTS
    for e in listed.executions:
        got = await m.stubs["execution"].GetExecution(
            epb.GetExecutionRequest(workspace_id=WORKSPACE, execution_id=e.id)
        )
        assert got.execution.state == epb.EXECUTION_STATE_COMPLETED
        assert sorted(s.node_id for s in got.sends) == ["s1", "s2"]
        r.executions[e.id] = got.execution.trace_id
        r.sends.extend(s.key for s in got.sends)


def assert_node_work(tree: TraceTree, node: ReceivedSpan) -> None:
    """A SEND node span's own calls: segment, template and billing over gRPC, then the carrier."""
    for method, service in NODE_CALLS.items():
        client = only(
            children(tree, node, method, "CLIENT", "execution"), f"{method} client under {node.name}"
        )
        only(children(tree, client, method, "SERVER", service), f"{method} server span in {service}")
    provider = only(children(tree, node, "sandbox send_batch", "CLIENT", "execution"), "provider send span")
    assert attr(provider, "messaging.batch.message_count") == attr(node, "shoal.batch.size")
    # The carrier continues the trace of the send (W3C traceparent on the HTTP request).
    only(children(tree, provider, CARRIER_SPAN, "SERVER", "sandbox"), "the carrier's span")


def chain(tree: TraceTree, span: ReceivedSpan) -> list[str]:
    return [f"{a.service}: {a.name} [{a.kind}]" for a in tree.ancestors(span)]


async def test_one_trace_per_run_from_the_caller_through_every_process(nats_url: str, tmp_path: Path) -> None:
    async with OtlpCollector() as collector, process_mesh(nats_url, tmp_path, collector.env()) as m:
        segment_id, template_id = await seed(m)
        runs = [Run(name, secrets.token_hex(16), secrets.token_hex(8)) for name in ("first", "second")]
        for r in runs:
            r.campaign_id = await api_campaign(m, r.name, segment_id, template_id)
        await trigger_both(m, runs)
        for r in runs:
            await finish(m, r)

        # -- one trace per run, the caller's, and GetExecution says so -------------------------
        assert runs[0].caller_trace != runs[1].caller_trace
        for r in runs:
            assert set(r.executions.values()) == {r.caller_trace}, (r.name, r.executions)
        executions = {x: r for r in runs for x in r.executions}
        sent_by: dict[str, ReceivedSpan] = {}  # send key -> the execution step span that sent it

        # Every step of every execution has its span: before the WAIT (s1, parked pending at s2
        # with a wake time) and after it (s2, completed).
        steps = await collector.wait_for_spans(
            lambda s: s.name == "shoal.execution" and attr(s, "shoal.execution.id") in executions,
            count=2 * len(executions),
            timeout=15,
            what="shoal.execution",
        )
        receipts = await collector.wait_for_spans(
            lambda s: s.name == "shoal.receipt" and attr(s, "shoal.execution.id") in executions,
            # The sandbox sends `delivered` and (open rate 1) `opened` for every message.
            count=2 * sum(len(r.sends) for r in runs),
            timeout=15,
            what="shoal.receipt",
        )
        await collector.wait_for_spans(
            lambda s: s.name == CARRIER_SPAN and s.trace_id in {r.caller_trace for r in runs},
            count=4,
            timeout=10,
            what="carrier spans in the runs' traces",
        )
        # Each process exports on its own schedule: the services' server spans under each SEND
        # node can come in after the execution service's steps. Wait until every node's work has
        # arrived; a real gap still fails, with the last thing found missing.
        missing: list[str] = []

        def node_work_arrived() -> bool:
            missing.clear()
            for r in runs:
                tree = collector.tree(r.caller_trace)
                for send in (s for s in tree.spans.values() if s.name == "shoal.node send"):
                    try:
                        assert_node_work(tree, send)
                    except AssertionError as e:
                        missing.append(f"{r.name}: {e}")
                        return False
            return True

        await wait_for(node_work_arrived, timeout=15, interval=0.1, message=lambda: "; ".join(missing))

        for r in runs:
            tree = collector.tree(r.caller_trace)
            gateway = only(
                [s for s in tree.spans.values() if s.name == TRIGGER_SPAN], f"{r.name}: the trigger request"
            )
            assert (gateway.kind, gateway.service) == ("SERVER", "gateway")
            # The run starts in the caller's trace, under the caller's span.
            assert gateway.parent_span_id == r.caller_span
            trigger = only(
                [
                    s
                    for s in tree.descendants(gateway)
                    if s.name == "/shoal.v1.CampaignService/TriggerCampaign" and s.kind == "SERVER"
                ],
                "TriggerCampaign in the campaign service",
            )
            assert trigger.service == "campaign"
            fanout = only([s for s in tree.spans.values() if s.name == "shoal.fanout"], "the fan-out")
            assert attr(fanout, "shoal.run.id") == r.run_id
            assert [a.name for a in tree.ancestors(fanout)][:1] == ["/shoal.v1.ExecutionService/StartRun"]
            assert trigger in tree.ancestors(fanout)

            # Nothing of the other run in this trace, and this run's work is all in it (the
            # workers' batches held messages of both runs).
            run_ids = {attr(s, "shoal.run.id") for s in tree.spans.values()} - {None}
            assert run_ids == {r.run_id}, run_ids
            nodes = [
                s
                for s in collector.spans
                if s.name.startswith("shoal.node ") and attr(s, "shoal.run.id") == r.run_id
            ]
            assert {s.trace_id for s in nodes} == {r.caller_trace}
            assert {attr(s, "shoal.node.id") for s in nodes} >= {"s1", "w1", "s2", "e1"}

            for x in r.executions:
                mine = sorted(
                    (s for s in steps if attr(s, "shoal.execution.id") == x), key=lambda s: s.start_ns
                )
                assert [(attr(s, "shoal.node.id"), attr(s, "shoal.execution.state")) for s in mine] == [
                    ("s1", "pending"),
                    ("s2", "completed"),
                ], [str(s.attributes) for s in mine]
                before, after = mine
                assert attr(before, "shoal.execution.next_node") == "s2" and attr(
                    before, "shoal.execution.wake_at"
                )
                sends: list[ReceivedSpan] = []
                producers: list[ReceivedSpan] = []
                for step, node_id in ((before, "s1"), (after, "s2")):
                    assert step.trace_id == r.caller_trace
                    assert (attr(step, "shoal.run.id"), attr(step, "shoal.campaign.id")) == (
                        r.run_id,
                        r.campaign_id,
                    )
                    assert attr(step, "shoal.contact.id")
                    # Child of the CONSUMER span of the step message that delivered it...
                    consumer = tree.parent(step)
                    assert consumer is not None and consumer.kind == "CONSUMER", chain(tree, step)
                    assert consumer.name.endswith(f".shoal.exec.step.{r.campaign_id} process")
                    producer = tree.parent(consumer)
                    assert producer is not None and producer.kind == "PRODUCER", chain(tree, step)
                    assert producer.name.endswith(f".shoal.exec.step.{r.campaign_id} publish")
                    producers.append(producer)
                    # ... and linked to the node spans that did its work.
                    linked = [tree.spans.get(link.span_id) for link in step.links]
                    send = only(
                        [s for s in linked if s is not None and s.name == "shoal.node send"],
                        f"send node linked from {x}'s {node_id} step",
                    )
                    assert (attr(send, "shoal.node.id"), attr(send, "shoal.run.id")) == (node_id, r.run_id)
                    assert_node_work(tree, send)
                    # From the node up to the caller: every parent arrived, no gap. The node is
                    # under the batch span, or, in a batch whose first message was the other
                    # run's, under its own message's CONSUMER span and linked to that batch.
                    up = tree.ancestors(send)
                    if up[0].name == "shoal.bus.batch":
                        up = up[1:]
                    else:
                        assert [collector.by_id(link.span_id) for link in send.links] != [None]
                        assert {getattr(collector.by_id(lk.span_id), "name", "") for lk in send.links} == {
                            "shoal.bus.batch"
                        }
                    assert up[0] == consumer or up[0].kind == "CONSUMER", chain(tree, send)
                    assert up[1].kind == "PRODUCER" and up[2] == fanout, chain(tree, send)
                    assert [a.name for a in up[3:]] == [
                        "/shoal.v1.ExecutionService/StartRun",
                        "/shoal.v1.ExecutionService/StartRun",
                        "/shoal.v1.CampaignService/TriggerCampaign",
                        "/shoal.v1.CampaignService/TriggerCampaign",
                        TRIGGER_SPAN,
                    ], chain(tree, send)
                    assert up[-1] == gateway
                    sends.append(send)
                # Across the WAIT: the timer loop republished the parked execution with the
                # context it was created under (the fan-out's), after the wait was over.
                sent_by[f"{x}:s1"], sent_by[f"{x}:s2"] = before, after
                first_publish, timer_publish = producers
                assert first_publish != timer_publish
                assert first_publish.parent_span_id == timer_publish.parent_span_id == fanout.span_id
                assert timer_publish.start_ns - sends[0].start_ns >= (WAIT_SECONDS - 0.2) * 1e9

        # -- receipts: their own traces (the carrier calls back), findable by execution id -------
        callback_traces = {s.trace_id for s in receipts}
        assert not callback_traces & {r.caller_trace for r in runs}
        for key in (k for r in runs for k in r.sends):
            execution_id, _, node_id = key.rpartition(":")
            r = executions[execution_id]
            mine = [s for s in receipts if attr(s, "shoal.send.key") == key]
            assert sorted(attr(s, "shoal.receipt.status") for s in mine) == ["delivered", "opened"], key
            for s in mine:
                assert (attr(s, "shoal.node.id"), attr(s, "shoal.run.id"), attr(s, "shoal.campaign.id")) == (
                    node_id,
                    r.run_id,
                    r.campaign_id,
                )
                tree = collector.tree(s.trace_id)
                request = tree.parent(s)
                assert request is not None and (request.name, request.kind, request.service) == (
                    CALLBACK_SPAN,
                    "SERVER",
                    "gateway",
                )
        # The events the callback published reach the segment service under its request.
        consumed = await collector.wait_for_spans(
            lambda s: (
                s.trace_id in callback_traces
                and s.kind == "CONSUMER"
                and s.service == "segment"
                and ".shoal.events.message." in s.name
            ),
            timeout=10,
            what="receipt events consumed by segment",
        )
        for s in consumed:
            tree = collector.tree(s.trace_id)
            assert [a.name for a in tree.ancestors(s)][-1] == CALLBACK_SPAN, chain(tree, s)

        # ... and the execution service, which settles the sends: there the receipt's span links
        # to the execution step span that sent the message, in the run's trace.
        def settling() -> list[ReceivedSpan]:
            return [
                s
                for s in collector.spans
                if s.trace_id in callback_traces
                and (s.service, s.kind) == ("execution", "CONSUMER")
                and ".shoal.events.message." in s.name
            ]

        def linked_keys() -> set[str]:
            return {str(link.attributes.get("shoal.send.key")) for s in settling() for link in s.links}

        await wait_for(
            lambda: linked_keys() >= set(sent_by),
            timeout=10,
            message=lambda: f"receipts linked to {sorted(linked_keys())} of {sorted(sent_by)}",
        )
        for s in settling():
            tree = collector.tree(s.trace_id)
            assert [a.name for a in tree.ancestors(s)][-1] == CALLBACK_SPAN, chain(tree, s)
            for link in s.links:
                sender = sent_by[str(link.attributes["shoal.send.key"])]
                assert (link.trace_id, link.span_id) == (sender.trace_id, sender.span_id)


# -- the engine alone: a batch holding two runs' messages ----------------------------------------


async def test_a_batch_mixing_two_runs_keeps_each_runs_work_in_its_own_trace(
    bus: Bus, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """Which runs share a fetched batch is up to timing in the test above; here it is forced.

    The batch span can only be in one trace (its first message's). A node group of the other run
    goes under that run's own CONSUMER span, linked to the batch; each execution's span is a
    child of the consumer span of the message that delivered it, linked to its node span.
    """
    db = Database(f"sqlite:///{tmp_path / 'execution.db'}", migrations_dir=EXECUTION_MIGRATIONS)
    await db.call(db.migrate)
    settings = ExecutionSettings.load(data_dir=tmp_path)
    peers = Peers.connect(settings)
    states = await CampaignStates.open(bus)
    engine = Engine(db=db, bus=bus, peers=peers, providers={}, states=states, settings=settings)
    flow = cpb.Flow(
        steps=[
            cpb.Step(id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=60))),
            cpb.Step(id="e1", end=cpb.EndStep()),
        ]
    )
    runs = {name: (f"c-{name}-{secrets.token_hex(4)}", f"r-{name}-{secrets.token_hex(4)}") for name in "ab"}

    def seed_runs(session: Any) -> None:
        for campaign_id, run_id in runs.values():
            repo.create_run(
                session,
                run_id=run_id,
                workspace_id=WORKSPACE,
                campaign_id=campaign_id,
                flow_version=1,
                flow=flow.SerializeToString(),
                segment_id="",
                recipients=["x"],
                data={},
                open_ended=False,
            )
            run = repo.get_run(session, run_id=run_id)
            repo.insert_executions(
                session,
                run=run,
                node_id="w1",
                rows=[repo.NewExecution(f"ex-{run_id}-{i}", f"c{i}", 0) for i in range(2)],
                nudge_at=repo.now(),
                traceparent="",
            )
            repo.move_counters(session, {run_id: Counter(pending=2)})

    await db.run(seed_runs)
    for campaign_id, _ in runs.values():
        await states.put(campaign_id, RUNNING)

    test_tracer = trace.get_tracer("test")
    consumers = {
        name: test_tracer.start_span(f"{name} process", context=Context(), kind=SpanKind.CONSUMER)
        for name in runs
    }
    contexts = {name: trace.set_span_in_context(span) for name, span in consumers.items()}
    deliveries = [
        Delivery(
            cast(Any, None),
            ev.StepMessage(workspace_id=WORKSPACE, campaign_id=cid, run_id=rid, execution_id=f"ex-{rid}-{i}"),
            consumers[name],
            contexts[name],
            1,
        )
        for name, (cid, rid) in runs.items()
        for i in range(2)
    ]
    try:
        with test_tracer.start_as_current_span(
            "shoal.bus.batch",
            context=contexts["a"],
            links=[Link(s.get_span_context()) for s in consumers.values()],
        ) as batch:
            await engine.handle(deliveries)
    finally:
        for span in consumers.values():
            span.end()
        await peers.close()
        await db.close()

    finished = spans.get_finished_spans()
    trace_of = {name: span.get_span_context().trace_id for name, span in consumers.items()}
    assert trace_of["a"] != trace_of["b"]
    batch_id = batch.get_span_context().span_id
    nodes = {}
    for name, (_, run_id) in runs.items():
        (node,) = [
            s
            for s in finished
            if s.name == "shoal.node wait" and (s.attributes or {}).get("shoal.run.id") == run_id
        ]
        assert node.context is not None and node.parent is not None
        assert node.context.trace_id == trace_of[name]
        nodes[name] = node
    # Run a's group is under the batch (same trace); run b's under its own consumer, linked.
    assert nodes["a"].parent is not None and nodes["a"].parent.span_id == batch_id
    assert nodes["b"].parent is not None
    assert nodes["b"].parent.span_id == consumers["b"].get_span_context().span_id
    assert [link.context.span_id for link in nodes["b"].links] == [batch_id]

    steps = [s for s in finished if s.name == "shoal.execution"]
    assert len(steps) == 4
    for s in steps:
        attributes = dict(s.attributes or {})
        name = "a" if attributes["shoal.run.id"] == runs["a"][1] else "b"
        assert s.context is not None and s.context.trace_id == trace_of[name]
        assert s.parent is not None and s.parent.span_id == consumers[name].get_span_context().span_id
        assert str(attributes["shoal.execution.id"]).startswith(f"ex-{runs[name][1]}-")
        assert attributes["shoal.campaign.id"] == runs[name][0]
        assert (attributes["shoal.node.id"], attributes["shoal.execution.state"]) == ("w1", "pending")
        assert attributes["shoal.execution.next_node"] == "e1" and attributes["shoal.execution.wake_at"]
        assert nodes[name].context is not None
        assert [link.context.span_id for link in s.links] == [nodes[name].context.span_id]


# -- sampling without an exporter ----------------------------------------------------------------

_SAMPLING_PROBE = """
import json
from opentelemetry import trace
from shoal import telemetry

telemetry.init("probe", sample_ratio=1.0, log_json=False)
tracer = trace.get_tracer("probe")
with tracer.start_as_current_span("root") as root:
    headers = telemetry.inject({})
    root_recording = root.is_recording()
parent = telemetry.extract({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
with tracer.start_as_current_span("child", context=parent) as child:
    child_recording = child.is_recording()
print(json.dumps({"root": root_recording, "traceparent": headers["traceparent"], "child": child_recording}))
"""


def test_a_process_without_an_exporter_does_not_record_the_traces_it_starts(tmp_path: Path) -> None:
    """Nothing would receive them; trace context still flows, and a sampled caller is followed."""

    def probe(**env: str) -> dict[str, Any]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "OTEL_"))}
        out = subprocess.run(
            [sys.executable, "-c", _SAMPLING_PROBE],
            cwd=REPO,
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    # An endpoint nobody listens on: spans are recorded (the exporter drops them at exit).
    exporting = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    assert exporting["root"] is True and int(exporting["traceparent"][-2:], 16) & 1  # sampled flag
    silent = probe()
    assert silent["root"] is False
    # Still a valid, propagated context (log lines and GetExecution keep their trace ids).
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", silent["traceparent"])
    assert not int(silent["traceparent"][-2:], 16) & 1
    assert silent["child"] is True  # parent-based: a sampled caller's trace is continued


# -- receipts that overtake their send -----------------------------------------------------------


def test_a_receipt_that_overtakes_its_send_is_kept_for_later_and_linked_once_it_is_recorded(
    tmp_path: Path,
) -> None:
    """The carrier may call back before the worker commits the send: no row yet, so the receipt
    is retried while young; once the row is there it settles it and links to the sending span."""
    db = Database(f"sqlite:///{tmp_path / 'execution.db'}", migrations_dir=EXECUTION_MIGRATIONS)
    db.migrate()
    sender = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    early = ev.MessageReceipt(workspace_id=WORKSPACE, send_key="ex1:s1", status=ev.RECEIPT_STATUS_DELIVERED)
    early.time.GetCurrentTime()
    with db.session() as s:
        assert receipt_consumer.settle_receipts(s, [early]) == {}  # not recorded yet
    now = repo.now()
    assert receipt_consumer.may_be_early(early, 1, now)
    assert not receipt_consumer.may_be_early(early, 1, now + receipt_consumer.EARLY_RECEIPT_GRACE)
    with db.session() as s:
        repo.record_sends(
            s,
            [
                repo.NewSend(
                    "ex1:s1", WORKSPACE, "ex1", "run", "cmp", "s1", 1, "sandbox", "pm1", 1, 1, 1, 0, sender
                )
            ],
        )
    with db.session() as s:
        assert receipt_consumer.settle_receipts(s, [early]) == {"ex1:s1": sender}
        (status,) = s.execute(select(repo.S.c.status).where(repo.S.c.key == "ex1:s1")).one()
    assert status == epb.SEND_STATUS_DELIVERED
    db.engine.dispose()
