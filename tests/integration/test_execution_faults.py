"""Faults during a run, over the whole mesh: nothing lost, nothing sent twice.

- A provider outage mid-run opens the breaker, the campaign goes PAUSED_ERROR within seconds,
  and after the provider recovers and an operator resumes, the run completes with exactly one
  message per contact.
- A provider refusing our credentials pauses the campaign (PAUSED_ERROR) instead of retrying
  forever; after the fix and a resume, each contact gets one message.
- A balance that runs out mid-run moves the campaign to PAUSED_BALANCE with the unpaid contacts
  still pending; after a top-up and resume it completes; free balance never goes negative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.errors import from_rpc_error
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.helpers import wait_for
from tests.mesh import Mesh, mesh

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE


async def seed_audience(m: Mesh, count: int, *, tag: str) -> str:
    contacts = [
        spb.ContactInput(
            email=f"c{i}@example.com",
            first_name=f"C{i}",
            tags=[tag],
            status=spb.CONTACT_STATUS_ACTIVE,
            consents=[
                spb.ConsentInput(
                    channel=EMAIL, message_type=MESSAGE, status=spb.CONSENT_STATUS_GRANTED, source="test"
                )
            ],
        )
        for i in range(count)
    ]
    for start in range(0, count, 10_000):  # the import limit per call
        chunk = contacts[start : start + 10_000]
        reply = await m.segment.ImportContacts(
            spb.ImportContactsRequest(workspace_id=m.workspace_id, contacts=chunk)
        )
        assert reply.imported == len(chunk), reply.rejected
    segment = await m.segment.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=m.workspace_id, name=tag, filter=spb.Filter(tag=spb.TagCondition(tag=tag))
        )
    )
    return segment.segment.id


async def email_template(m: Mesh) -> str:
    created = await m.template.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=m.workspace_id,
            name="t",
            channel=EMAIL,
            message_type=MESSAGE,
            content=tpb.TemplateContent(
                email=tpb.EmailContent(subject="Hi {{ contact.first_name }}", html="<p>x</p>")
            ),
            variables=[tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING, required=True)],
        )
    )
    await m.template.PublishTemplate(
        tpb.PublishTemplateRequest(workspace_id=m.workspace_id, template_id=created.template.id, version=1)
    )
    return created.template.id


async def start_campaign(m: Mesh, segment_id: str, template_id: str) -> str:
    flow = cpb.Flow(
        steps=[
            cpb.Step(
                id="s1",
                send=cpb.SendStep(
                    channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
                ),
            ),
            cpb.Step(id="e1", end=cpb.EndStep()),
        ]
    )
    created = await m.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=m.workspace_id,
            name="faults",
            segment_id=segment_id,
            trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
            flow=flow,
        )
    )
    await m.campaign.StartCampaign(
        cpb.StartCampaignRequest(workspace_id=m.workspace_id, campaign_id=created.campaign.id)
    )
    return created.campaign.id


async def status(m: Mesh, campaign_id: str) -> Any:
    return await m.campaign.GetCampaignStatus(
        cpb.GetCampaignStatusRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
    )


async def wait_state(m: Mesh, campaign_id: str, state: int, timeout: float = 30) -> Any:
    async def reached() -> Any:
        reply = await status(m, campaign_id)
        return reply if reply.state == state else None

    return await wait_for(reached, timeout=timeout)


def sandbox_keys(m: Mesh) -> list[str]:
    keys: list[str] = []
    after = 0
    while True:
        page = m.sandbox.get("/v1/messages", workspace_id=m.workspace_id, limit=1000, after=after)
        keys.extend(msg["idempotency_key"] for msg in page["messages"])
        if not page.get("next_after"):
            return keys
        after = page["next_after"]


async def test_provider_outage_pauses_then_resume_completes_without_duplicates(
    nats_url: str, tmp_path: Path
) -> None:
    audience = 200
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={
            "batch_size": 20,
            "provider_batch_size": 10,
            "provider_concurrency": 2,
            "breaker_consecutive_failures": 3,
            "breaker_open_seconds": 0.5,
            "retry_backoff_seconds": 0.3,
        },
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "20"},
    ) as m:
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=m.workspace_id, amount_cents=10_000))
        campaign_id = await start_campaign(
            m, await seed_audience(m, audience, tag="outage"), await email_template(m)
        )
        await wait_for(lambda: m.sandbox.get("/v1/messages/count")["count"] >= 20, timeout=30)
        m.sandbox.control(outage=True)
        paused = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_PAUSED_ERROR, timeout=15)
        assert paused.counts.pending > 0, "unsent contacts stay pending"
        assert paused.counts.failed == 0 and paused.counts.skipped == 0
        transitions = await m.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
        )
        assert transitions.transitions[-1].actor == "breaker:sandbox"

        m.sandbox.control(outage=False)
        await m.campaign.ResumeCampaign(
            cpb.ResumeCampaignRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
        )
        done = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.counts.completed == audience
        assert done.sent == audience
        keys = sandbox_keys(m)
        assert len(keys) == audience and len(set(keys)) == audience
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=m.workspace_id))
        assert balance.balance.reserved_cents == 0
        assert balance.balance.free_cents == 10_000 - audience * 1


async def test_refused_credentials_pause_the_campaign_and_resume_sends_each_once(
    nats_url: str, tmp_path: Path
) -> None:
    """A provider refusing our requests (401) is not an outage: no breaker, no endless retry. The
    campaign goes PAUSED_ERROR with the provider's words; after the credentials are fixed and an
    operator resumes, every contact gets exactly one message."""
    audience = 60
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={"batch_size": 10, "provider_batch_size": 10, "retry_backoff_seconds": 0.3},
    ) as m:
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=m.workspace_id, amount_cents=10_000))
        m.sandbox.control(refuse_credentials=True)
        campaign_id = await start_campaign(
            m, await seed_audience(m, audience, tag="refused"), await email_template(m)
        )
        paused = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_PAUSED_ERROR, timeout=20)
        assert paused.counts.failed == 0 and paused.counts.skipped == 0
        assert paused.counts.completed == 0, "nothing was sent"
        transitions = await m.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
        )
        last = transitions.transitions[-1]
        assert last.actor == "provider:sandbox"
        assert "refused" in last.reason and "401" in last.reason
        assert m.sandbox.get("/v1/messages/count")["count"] == 0

        m.sandbox.control(refuse_credentials=False)
        await m.campaign.ResumeCampaign(
            cpb.ResumeCampaignRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
        )
        done = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.counts.completed == audience and done.sent == audience
        keys = sandbox_keys(m)
        assert len(keys) == audience and len(set(keys)) == audience
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=m.workspace_id))
        assert balance.balance.reserved_cents == 0
        assert balance.balance.free_cents == 10_000 - audience


async def test_balance_runs_out_pauses_then_top_up_and_resume_completes(
    nats_url: str, tmp_path: Path
) -> None:
    audience = 40
    async with mesh(nats_url=nats_url, tmp_path=tmp_path, execution={"batch_size": 5}) as m:
        ws = m.workspace_id
        price = bpb.Price(channel=EMAIL, message_type=MESSAGE, unit=common.BILLING_UNIT_EMAIL, cents=25)
        await m.billing.SetPrice(bpb.SetPriceRequest(workspace_id=ws, price=price))
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=1_000))  # covers all 40 at 25
        campaign_id = await start_campaign(
            m, await seed_audience(m, audience, tag="balance"), await email_template(m)
        )
        # The price doubles after launch: the balance now pays for half of the audience.
        price.cents = 50
        await m.billing.SetPrice(bpb.SetPriceRequest(workspace_id=ws, price=price))
        paused = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_PAUSED_BALANCE, timeout=30)
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        assert balance.balance.free_cents >= 0
        assert paused.counts.pending > 0 and paused.counts.failed == 0

        # Resume without paying is refused (402 at the edge); after a top-up it completes.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await m.campaign.ResumeCampaign(
                cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=campaign_id)
            )
        assert from_rpc_error(refused.value).reason == "insufficient_balance"
        assert (await status(m, campaign_id)).state == cpb.CAMPAIGN_STATE_PAUSED_BALANCE
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=5_000))
        await m.campaign.ResumeCampaign(cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=campaign_id))
        done = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=30)
        assert done.counts.completed == audience
        keys = sandbox_keys(m)
        assert len(keys) == audience == len(set(keys))
        final = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        spent = 1_000 + 5_000 - final.balance.free_cents
        assert final.balance.reserved_cents == 0
        ledger = await m.billing.ListLedger(
            bpb.ListLedgerRequest(workspace_id=ws, page=common.PageRequest(page_size=1000))
        )
        captures = [e for e in ledger.entries if e.kind == bpb.LEDGER_ENTRY_KIND_CAPTURE]
        assert len(captures) == audience
        assert -sum(e.reserved_delta_cents for e in captures) == spent
