"""The thin run of issue 2: one manual campaign crossing every service, end to end.

3 contacts with email consent, a published EMAIL template, a SEND -> END campaign over a segment
of them, started by hand. The executions travel through JetStream to the sandbox carrier; the
campaign completes; the sandbox holds exactly three rendered messages; billing captured three
holds; and the spans of the run form one trace across gRPC and NATS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.fixtures_db import POSTGRES_URL
from tests.helpers import wait_for
from tests.mesh import Mesh, mesh

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE
PEOPLE = [("Ada", "ada@example.com"), ("Grace", "grace@example.com"), ("Edsger", "edsger@example.com")]


async def seed(m: Mesh, *, tag: str = "thin") -> tuple[str, str]:
    """Contacts with EMAIL/MESSAGE consent, a segment of them, a published template: (segment, template)."""
    ws = m.workspace_id
    for first, email in PEOPLE:
        await m.segment.CreateContact(
            spb.CreateContactRequest(
                workspace_id=ws,
                contact=spb.ContactInput(
                    email=email,
                    first_name=first,
                    tags=[tag],
                    status=spb.CONTACT_STATUS_ACTIVE,
                    consents=[
                        spb.ConsentInput(
                            channel=EMAIL,
                            message_type=MESSAGE,
                            status=spb.CONSENT_STATUS_GRANTED,
                            source="test",
                            proof="signed up in test",
                        )
                    ],
                ),
            )
        )
    segment = await m.segment.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=ws, name="thin", filter=spb.Filter(tag=spb.TagCondition(tag=tag))
        )
    )
    template = await m.template.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=ws,
            name="welcome",
            channel=EMAIL,
            message_type=MESSAGE,
            content=tpb.TemplateContent(
                email=tpb.EmailContent(
                    subject="Welcome {{ contact.first_name }}", html="<p>Hello {{ contact.first_name }}!</p>"
                )
            ),
            variables=[tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING, required=True)],
        )
    )
    await m.template.PublishTemplate(
        tpb.PublishTemplateRequest(workspace_id=ws, template_id=template.template.id, version=1)
    )
    await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=10_000))
    return segment.segment.id, template.template.id


def send_end_flow(template_id: str) -> cpb.Flow:
    return cpb.Flow(
        steps=[
            cpb.Step(
                id="s1",
                name="welcome",
                send=cpb.SendStep(
                    channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
                ),
            ),
            cpb.Step(id="e1", end=cpb.EndStep()),
        ]
    )


def trace_of(spans: list[ReadableSpan], name: str) -> int:
    matches = [s for s in spans if s.name == name]
    assert matches, f"no span named {name!r} among {sorted({s.name for s in spans})}"
    return matches[0].context.trace_id


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        p = by_id[parent.span_id]
        names.append(p.name)
        parent = p.parent
    return names


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres" and not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    return str(request.param)


async def test_thin_run_crosses_every_service(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter, db_kind: str, new_database_url: Any
) -> None:
    async with mesh(
        nats_url=nats_url, tmp_path=tmp_path, database_url=lambda name: new_database_url(db_kind, name)
    ) as m:
        segment_id, template_id = await seed(m)
        created = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=m.workspace_id,
                name="thin run",
                segment_id=segment_id,
                trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
                flow=send_end_flow(template_id),
            )
        )
        cid = created.campaign.id
        started = await m.campaign.StartCampaign(
            cpb.StartCampaignRequest(workspace_id=m.workspace_id, campaign_id=cid)
        )
        assert started.run_id

        async def status() -> Any:
            reply = await m.campaign.GetCampaignStatus(
                cpb.GetCampaignStatusRequest(workspace_id=m.workspace_id, campaign_id=cid)
            )
            return reply if reply.state == cpb.CAMPAIGN_STATE_COMPLETED else None

        final = await wait_for(status, timeout=30)
        assert final.counts.completed == 3
        assert (final.counts.pending, final.counts.processing, final.counts.failed, final.counts.skipped) == (
            0,
            0,
            0,
            0,
        )
        assert final.sent == 3
        assert final.run_id == started.run_id

        received = m.sandbox.get("/v1/messages", workspace_id=m.workspace_id)["messages"]
        assert len(received) == 3
        by_to = {msg["to"]: msg for msg in received}
        for first, email in PEOPLE:
            assert by_to[email]["subject"] == f"Welcome {first}"
            assert f"Hello {first}!" in by_to[email]["html"]
        assert len({msg["idempotency_key"] for msg in received}) == 3

        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=m.workspace_id))
        assert balance.balance.reserved_cents == 0, "every hold was captured"
        price = 1  # default EMAIL price in cents
        assert balance.balance.free_cents == 10_000 - 3 * price

        transitions = await m.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=m.workspace_id, campaign_id=cid)
        )
        assert [(t.from_state, t.to_state) for t in transitions.transitions] == [
            (cpb.CAMPAIGN_STATE_DRAFT, cpb.CAMPAIGN_STATE_RUNNING),
            (cpb.CAMPAIGN_STATE_RUNNING, cpb.CAMPAIGN_STATE_COMPLETED),
        ]

    finished = list(spans.get_finished_spans())
    by_id = {s.context.span_id: s for s in finished}
    trace_id = trace_of(finished, "/shoal.v1.CampaignService/StartCampaign")
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    for expected in (
        "/shoal.v1.ExecutionService/StartRun",
        "/shoal.v1.TemplateService/RenderBatch",
        "/shoal.v1.BillingService/HoldBatch",
        "/shoal.v1.SegmentService/CheckEligibility",
        "shoal.bus.batch",
        "shoal.node send",
    ):
        assert expected in names, f"{expected} is not in the run's trace: {sorted(names)}"
    producers = [s for s in in_trace if s.kind == SpanKind.PRODUCER and ".shoal.exec.step." in s.name]
    consumers = [s for s in in_trace if s.kind == SpanKind.CONSUMER and ".shoal.exec.step." in s.name]
    # Spans are per group of messages with one parent (shoal.bus): the fan-out page of 3 steps is
    # one PRODUCER span standing for 3 messages, and each consumer span is its child.
    assert sum((p.attributes or {}).get("messaging.batch.message_count", 0) for p in producers) == 3
    assert consumers
    producer_ids = {p.context.span_id for p in producers}
    assert all(c.parent is not None and c.parent.span_id in producer_ids for c in consumers)
    # The billing call made by the worker descends, through the NATS hop, from the launch.
    hold_server = next(
        s for s in in_trace if s.name == "/shoal.v1.BillingService/HoldBatch" and s.kind == SpanKind.SERVER
    )
    chain = ancestors(hold_server, by_id)
    assert "shoal.bus.batch" in chain
    assert any(".shoal.exec.step." in n and n.endswith("process") for n in chain)
    assert any(".shoal.exec.step." in n and n.endswith("publish") for n in chain)
    assert "/shoal.v1.ExecutionService/StartRun" in chain
    assert chain[-1] == "/shoal.v1.CampaignService/StartCampaign"
