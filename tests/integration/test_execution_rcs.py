"""RCS SEND nodes: capable devices get RCS; the others follow the node's fallback, billed as
the channel actually used (PRODUCT.md "Channels and message types")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.helpers import wait_for
from tests.mesh import Mesh, mesh

RCS, SMS, MESSAGE = common.CHANNEL_RCS, common.CHANNEL_SMS, common.MESSAGE_TYPE_MESSAGE
GRANTED = spb.CONSENT_STATUS_GRANTED


async def contacts(m: Mesh, tag: str, phones: list[str], *, sms_consent: set[str]) -> str:
    for phone in phones:
        consents = [spb.ConsentInput(channel=RCS, message_type=MESSAGE, status=GRANTED, source="t")]
        if phone in sms_consent:
            consents.append(spb.ConsentInput(channel=SMS, message_type=MESSAGE, status=GRANTED, source="t"))
        await m.segment.CreateContact(
            spb.CreateContactRequest(
                workspace_id=m.workspace_id,
                contact=spb.ContactInput(phone=phone, first_name="Ada", tags=[tag], consents=consents),
            )
        )
    seg = await m.segment.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=m.workspace_id, name=tag, filter=spb.Filter(tag=spb.TagCondition(tag=tag))
        )
    )
    return seg.segment.id


async def template(m: Mesh, channel: int, content: tpb.TemplateContent, variables: list[tpb.Variable]) -> str:
    created = await m.template.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=m.workspace_id,
            name="t",
            channel=channel,
            message_type=MESSAGE,
            content=content,
            variables=variables,
        )
    )
    await m.template.PublishTemplate(
        tpb.PublishTemplateRequest(workspace_id=m.workspace_id, template_id=created.template.id, version=1)
    )
    return created.template.id


async def run(m: Mesh, segment_id: str, send: cpb.SendStep) -> tuple[Any, list[Any]]:
    created = await m.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=m.workspace_id,
            name="rcs",
            segment_id=segment_id,
            trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
            flow=cpb.Flow(steps=[cpb.Step(id="s1", send=send), cpb.Step(id="e1", end=cpb.EndStep())]),
        )
    )
    cid = created.campaign.id
    started = await m.campaign.StartCampaign(
        cpb.StartCampaignRequest(workspace_id=m.workspace_id, campaign_id=cid)
    )

    async def finished() -> Any:
        s = await m.campaign.GetCampaignStatus(
            cpb.GetCampaignStatusRequest(workspace_id=m.workspace_id, campaign_id=cid)
        )
        return s if s.state in (cpb.CAMPAIGN_STATE_COMPLETED, cpb.CAMPAIGN_STATE_COMPLETED_PARTIAL) else None

    status = await wait_for(finished, timeout=30)
    listed = await m.execution.ListExecutions(
        epb.ListExecutionsRequest(workspace_id=m.workspace_id, run_id=started.run_id)
    )
    return status, list(listed.executions)


async def test_rcs_capability_and_every_fallback(nats_url: str, tmp_path: Path) -> None:
    async with mesh(nats_url=nats_url, tmp_path=tmp_path) as m:
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=m.workspace_id, amount_cents=5_000))
        card = tpb.RcsContent(
            text="Hello {{ contact.first_name }}",
            rich_card=tpb.RichCard(
                title="Sale",
                description="50% off",
                suggestions=[tpb.Suggestion(text="Shop", url="https://example.com/s")],
            ),
        )
        first_name = tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING, required=True)
        rcs_tpl = await template(m, RCS, tpb.TemplateContent(rcs=card), [first_name])
        sms_tpl = await template(
            m, SMS, tpb.TemplateContent(sms=tpb.SmsContent(text="Custom SMS for you")), []
        )

        # Capable devices: RCS, billed as an RCS single message.
        m.sandbox.control(rcs_capable_rate=1.0)
        seg = await contacts(m, "capable", ["+33612340001", "+33612340002"], sms_consent=set())
        status, _ = await run(
            m,
            seg,
            cpb.SendStep(
                channel=RCS,
                message_type=MESSAGE,
                template=tpb.TemplateRef(template_id=rcs_tpl),
                fallback=cpb.RCS_FALLBACK_NONE,
            ),
        )
        assert status.state == cpb.CAMPAIGN_STATE_COMPLETED and status.sent == 2
        got = [msg for msg in m.sandbox.get("/v1/messages", workspace_id=m.workspace_id)["messages"]]
        assert sorted(msg["channel"] for msg in got) == ["RCS", "RCS"]

        # No RCS device, fallback none: skipped with rcs_not_reachable, nothing sent.
        m.sandbox.control(rcs_capable_rate=0.0)
        seg = await contacts(m, "none", ["+33612340011", "+33612340012"], sms_consent={"+33612340011"})
        status, executions = await run(
            m,
            seg,
            cpb.SendStep(
                channel=RCS,
                message_type=MESSAGE,
                template=tpb.TemplateRef(template_id=rcs_tpl),
                fallback=cpb.RCS_FALLBACK_NONE,
            ),
        )
        assert status.state == cpb.CAMPAIGN_STATE_COMPLETED_PARTIAL and status.sent == 0
        assert {(e.state, e.reason) for e in executions} == {
            (epb.EXECUTION_STATE_SKIPPED, "rcs_not_reachable")
        }

        # Fallback sms: the RCS template flattened to SMS; a contact without SMS consent is skipped.
        seg = await contacts(m, "sms", ["+33612340021", "+33612340022"], sms_consent={"+33612340021"})
        status, executions = await run(
            m,
            seg,
            cpb.SendStep(
                channel=RCS,
                message_type=MESSAGE,
                template=tpb.TemplateRef(template_id=rcs_tpl),
                fallback=cpb.RCS_FALLBACK_SMS,
            ),
        )
        assert status.sent == 1 and status.counts.skipped == 1
        assert {e.reason for e in executions if e.state == epb.EXECUTION_STATE_SKIPPED} == {"no_consent"}
        flat = m.sandbox.get("/v1/messages", to="+33612340021")["messages"]
        assert [(x["channel"], x["text"]) for x in flat] == [
            ("SMS", "Hello Ada\nSale\n50% off\nShop: https://example.com/s")
        ]
        sent = next(e for e in executions if e.state == epb.EXECUTION_STATE_COMPLETED)
        detail = await m.execution.GetExecution(
            epb.GetExecutionRequest(workspace_id=m.workspace_id, execution_id=sent.id)
        )
        assert [s.channel for s in detail.sends] == [SMS], "recorded as the channel actually used"

        # Fallback sms_custom: the node's own SMS template.
        seg = await contacts(m, "custom", ["+33612340031"], sms_consent={"+33612340031"})
        status, _ = await run(
            m,
            seg,
            cpb.SendStep(
                channel=RCS,
                message_type=MESSAGE,
                template=tpb.TemplateRef(template_id=rcs_tpl),
                fallback=cpb.RCS_FALLBACK_SMS_CUSTOM,
                sms_template=tpb.TemplateRef(template_id=sms_tpl),
            ),
        )
        assert status.state == cpb.CAMPAIGN_STATE_COMPLETED and status.sent == 1
        custom = m.sandbox.get("/v1/messages", to="+33612340031")["messages"]
        assert [(x["channel"], x["text"]) for x in custom] == [("SMS", "Custom SMS for you")]

        # Billing followed the channel used: two RCS singles, two SMS segments, nothing reserved.
        ledger = await m.billing.ListLedger(bpb.ListLedgerRequest(workspace_id=m.workspace_id))
        captures = [e for e in ledger.entries if e.kind == bpb.LEDGER_ENTRY_KIND_CAPTURE]
        assert len(captures) == 4
        assert sorted(-e.reserved_delta_cents for e in captures) == [7, 7, 8, 8]
