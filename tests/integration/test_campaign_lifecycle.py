"""The campaign service over real gRPC, real NATS and real databases (the whole mesh in-process).

Every state move and its audit row, the scheduler under a controllable clock, the launch checks
(templates, balance), API triggers (idempotency, one run at a time, a new run after completion),
event triggers over NATS (once per contact, pending while paused), the auto-pauses on breaker and
balance events, estimates, and the status with counts and the remaining cost.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from services.campaign.lifecycle import Lifecycle
from services.campaign.peers import Peers
from services.campaign.server import MIGRATIONS
from shoal.bus import Bus
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.errors import ShoalError, from_rpc_error
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.fixtures_db import POSTGRES_URL
from tests.helpers import wait_for
from tests.mesh import Mesh, mesh

EMAIL, SMS = common.CHANNEL_EMAIL, common.CHANNEL_SMS
MESSAGE, NEWSLETTER = common.MESSAGE_TYPE_MESSAGE, common.MESSAGE_TYPE_NEWSLETTER
S = cpb  # state names read better as S.CAMPAIGN_STATE_...
DRAFT, SCHEDULED, RUNNING = S.CAMPAIGN_STATE_DRAFT, S.CAMPAIGN_STATE_SCHEDULED, S.CAMPAIGN_STATE_RUNNING
PAUSED, PAUSED_ERROR = S.CAMPAIGN_STATE_PAUSED, S.CAMPAIGN_STATE_PAUSED_ERROR
PAUSED_BALANCE, COMPLETED = S.CAMPAIGN_STATE_PAUSED_BALANCE, S.CAMPAIGN_STATE_COMPLETED
ARCHIVED = S.CAMPAIGN_STATE_ARCHIVED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


# -- seeding ---------------------------------------------------------------------------------------


async def add_contact(m: Mesh, ws: str, email: str, tags: list[str]) -> str:
    reply = await m.segment.CreateContact(
        spb.CreateContactRequest(
            workspace_id=ws,
            contact=spb.ContactInput(
                email=email,
                first_name=email.split("@", maxsplit=1)[0].title(),
                tags=tags,
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
    return str(reply.contact.id)


async def audience(m: Mesh, ws: str, tag: str, n: int = 3) -> str:
    """n contacts tagged `tag` and a segment of them: the segment id."""
    for i in range(n):
        await add_contact(m, ws, f"{tag}{i}@example.com", [tag])
    seg = await m.segment.CreateSegment(
        spb.CreateSegmentRequest(workspace_id=ws, name=tag, filter=spb.Filter(tag=spb.TagCondition(tag=tag)))
    )
    return str(seg.segment.id)


async def template(
    m: Mesh, ws: str, *, message_type: int = MESSAGE, publish: bool = True, reject: bool = False
) -> str:
    created = await m.template.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=ws,
            name=f"t{uuid.uuid4().hex[:6]}",
            channel=EMAIL,
            message_type=message_type,
            content=tpb.TemplateContent(
                email=tpb.EmailContent(subject="Hi {{ contact.first_name }}", html="<p>Hello</p>")
            ),
            variables=[tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING)],
        )
    )
    tid = str(created.template.id)
    if publish:
        await m.template.PublishTemplate(
            tpb.PublishTemplateRequest(workspace_id=ws, template_id=tid, version=1)
        )
    if reject:
        await m.template.RejectTemplate(
            tpb.RejectTemplateRequest(workspace_id=ws, template_id=tid, version=1, reason="provider said no")
        )
    return tid


async def top_up(m: Mesh, ws: str, cents: int = 10_000) -> None:
    await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=cents))


def send_step(tid: str, *, node: str = "s1", channel: int = EMAIL, message_type: int = MESSAGE) -> cpb.Step:
    return cpb.Step(
        id=node,
        send=cpb.SendStep(
            channel=channel, message_type=message_type, template=tpb.TemplateRef(template_id=tid)
        ),
    )


def send_flow(tid: str, *, wait_seconds: int = 0, **kw: Any) -> cpb.Flow:
    steps = [send_step(tid, **kw)]
    if wait_seconds:
        steps.append(
            cpb.Step(id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=wait_seconds)))
        )
    steps.append(cpb.Step(id="e1", end=cpb.EndStep()))
    return cpb.Flow(steps=steps)


async def create(
    m: Mesh, ws: str, *, trigger: cpb.Trigger, flow: cpb.Flow, segment_id: str = "", name: str = "c"
) -> str:
    reply = await m.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=ws, name=name, segment_id=segment_id, trigger=trigger, flow=flow
        )
    )
    assert reply.campaign.state == DRAFT
    return str(reply.campaign.id)


MANUAL = cpb.Trigger(manual=cpb.ManualTrigger())
API = cpb.Trigger(api=cpb.ApiTrigger())


# -- reading ---------------------------------------------------------------------------------------


async def refused(call: Awaitable[Any], code: grpc.StatusCode = FAILED_PRECONDITION) -> ShoalError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return from_rpc_error(info.value)


async def state_of(m: Mesh, ws: str, cid: str) -> int:
    reply = await m.campaign.GetCampaign(cpb.GetCampaignRequest(workspace_id=ws, campaign_id=cid))
    return int(reply.campaign.state)


async def status(m: Mesh, ws: str, cid: str) -> cpb.GetCampaignStatusResponse:
    return await m.campaign.GetCampaignStatus(cpb.GetCampaignStatusRequest(workspace_id=ws, campaign_id=cid))


async def reach(m: Mesh, ws: str, cid: str, state: int, timeout: float = 20) -> cpb.GetCampaignStatusResponse:
    async def check() -> Any:
        reply = await status(m, ws, cid)
        return reply if reply.state == state else None

    return await wait_for(check, timeout=timeout, message=lambda: f"campaign {cid} never reached {state}")


async def audit(m: Mesh, ws: str, cid: str) -> list[tuple[int, int, str, str]]:
    reply = await m.campaign.ListTransitions(cpb.ListTransitionsRequest(workspace_id=ws, campaign_id=cid))
    for t in reply.transitions:
        assert t.time.seconds > 0
    return [(t.from_state, t.to_state, t.actor, t.reason) for t in reply.transitions]


async def runs(m: Mesh, ws: str, cid: str) -> list[cpb.Run]:
    return list((await m.campaign.ListRuns(cpb.ListRunsRequest(workspace_id=ws, campaign_id=cid))).runs)


async def executions(m: Mesh, ws: str, cid: str) -> list[epb.Execution]:
    reply = await m.execution.ListExecutions(epb.ListExecutionsRequest(workspace_id=ws, campaign_id=cid))
    return list(reply.executions)


def messages_to(m: Mesh, ws: str, email: str) -> list[dict[str, Any]]:
    return [msg for msg in m.sandbox.get("/v1/messages", workspace_id=ws)["messages"] if msg["to"] == email]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres" and not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    return str(request.param)


# -- every operator move over gRPC, with its audit row ----------------------------------------------


async def test_moves_over_grpc_are_checked_and_audited(
    nats_url: str, tmp_path: Path, db_kind: str, new_database_url: Any
) -> None:
    async with mesh(
        nats_url=nats_url, tmp_path=tmp_path, database_url=lambda name: new_database_url(db_kind, name)
    ) as m:
        ws = m.workspace_id
        seg = await audience(m, ws, "moves")
        tid = await template(m, ws)
        await top_up(m, ws)

        # Manual: start, pause, resume; the WAIT holds every execution pending after its send.
        cid = await create(m, ws, trigger=MANUAL, flow=send_flow(tid, wait_seconds=3600), segment_id=seg)
        started = await m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid))
        assert started.run_id and started.campaign.state == RUNNING
        assert started.campaign.current_run_id == started.run_id

        async def parked() -> Any:
            reply = await status(m, ws, cid)
            return reply if reply.sent == 3 and reply.counts.pending == 3 else None

        st = await wait_for(parked, timeout=20)
        assert (st.state, st.run_id) == (RUNNING, started.run_id)
        assert (st.counts.processing, st.counts.completed, st.counts.failed, st.counts.skipped) == (
            0,
            0,
            0,
            0,
        )
        # Three contacts still pending, each expected to cost one EMAIL (1 cent).
        assert st.estimated_remaining_cost_cents == 3

        for call in (
            m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid)),
            m.campaign.ResumeCampaign(cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=cid)),
            m.campaign.ArchiveCampaign(cpb.ArchiveCampaignRequest(workspace_id=ws, campaign_id=cid)),
            m.campaign.UnscheduleCampaign(cpb.UnscheduleCampaignRequest(workspace_id=ws, campaign_id=cid)),
        ):
            err = await refused(call)
            assert "state RUNNING" in err.message and err.reason == "wrong_state"
        err = await refused(
            m.campaign.UpdateCampaign(
                cpb.UpdateCampaignRequest(workspace_id=ws, campaign_id=cid, name="x", update_mask=["name"])
            )
        )
        assert "RUNNING" in err.message

        paused = await m.campaign.PauseCampaign(
            cpb.PauseCampaignRequest(
                workspace_id=ws, campaign_id=cid, actor="operator:key_1", reason="copy check"
            )
        )
        assert paused.state == PAUSED
        err = await refused(
            m.campaign.PauseCampaign(cpb.PauseCampaignRequest(workspace_id=ws, campaign_id=cid))
        )
        assert "state PAUSED" in err.message
        resumed = await m.campaign.ResumeCampaign(cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=cid))
        assert resumed.state == RUNNING
        # Parked at the WAIT, not due: nothing to re-queue, nothing sent again.
        assert resumed.requeued == 0
        assert (await status(m, ws, cid)).sent == 3

        assert await audit(m, ws, cid) == [
            (DRAFT, RUNNING, "operator", "start"),
            (RUNNING, PAUSED, "operator:key_1", "copy check"),
            (PAUSED, RUNNING, "operator", "resume"),
        ]
        transitions = await m.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=ws, campaign_id=cid)
        )
        assert {t.run_id for t in transitions.transitions} == {started.run_id}
        assert [r.id for r in await runs(m, ws, cid)] == [started.run_id]

        # Scheduled: schedule (the authored time), unschedule, archive.
        trigger = cpb.Trigger(
            scheduled=cpb.ScheduledTrigger(local_time="2031-03-30T09:00", time_zone="Europe/Paris")
        )
        sid = await create(m, ws, trigger=trigger, flow=send_flow(tid), segment_id=seg)
        scheduled = await m.campaign.ScheduleCampaign(
            cpb.ScheduleCampaignRequest(workspace_id=ws, campaign_id=sid)
        )
        assert scheduled.campaign.state == SCHEDULED
        assert scheduled.campaign.due_time.ToDatetime(tzinfo=UTC) == datetime(2031, 3, 30, 7, 0, tzinfo=UTC)
        for call in (
            m.campaign.ScheduleCampaign(cpb.ScheduleCampaignRequest(workspace_id=ws, campaign_id=sid)),
            m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=sid)),
            m.campaign.PauseCampaign(cpb.PauseCampaignRequest(workspace_id=ws, campaign_id=sid)),
            m.campaign.UpdateCampaign(
                cpb.UpdateCampaignRequest(workspace_id=ws, campaign_id=sid, name="x", update_mask=["name"])
            ),
        ):
            assert "SCHEDULED" in (await refused(call)).message
        unscheduled = await m.campaign.UnscheduleCampaign(
            cpb.UnscheduleCampaignRequest(workspace_id=ws, campaign_id=sid)
        )
        assert unscheduled.campaign.state == DRAFT and not unscheduled.campaign.HasField("due_time")
        err = await refused(
            m.campaign.UnscheduleCampaign(cpb.UnscheduleCampaignRequest(workspace_id=ws, campaign_id=sid))
        )
        assert "state DRAFT" in err.message
        archived = await m.campaign.ArchiveCampaign(
            cpb.ArchiveCampaignRequest(workspace_id=ws, campaign_id=sid)
        )
        assert archived.campaign.state == ARCHIVED
        err = await refused(
            m.campaign.ScheduleCampaign(cpb.ScheduleCampaignRequest(workspace_id=ws, campaign_id=sid))
        )
        assert "state ARCHIVED" in err.message
        assert await audit(m, ws, sid) == [
            (DRAFT, SCHEDULED, "operator", "due 2031-03-30T07:00:00+00:00"),
            (SCHEDULED, DRAFT, "operator", "unschedule"),
            (DRAFT, ARCHIVED, "operator", "archive"),
        ]
        assert await runs(m, ws, sid) == []

        # PAUSED_BALANCE: resume re-checks the free balance against the pending audience.
        tight = "ws_tight"
        tight_seg = await audience(m, tight, "tight", n=2)
        tight_tid = await template(m, tight)
        await top_up(m, tight, 1_000)
        price = bpb.Price(channel=EMAIL, message_type=MESSAGE, unit=common.BILLING_UNIT_EMAIL, cents=400)
        await m.billing.SetPrice(bpb.SetPriceRequest(workspace_id=tight, price=price))
        tc = await create(
            m, tight, trigger=MANUAL, flow=send_flow(tight_tid, wait_seconds=3600), segment_id=tight_seg
        )
        await m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=tight, campaign_id=tc))

        async def tight_parked() -> Any:
            reply = await status(m, tight, tc)
            return reply if reply.sent == 2 and reply.counts.pending == 2 else None

        await wait_for(tight_parked, timeout=20)
        bus = await Bus.connect(nats_url, name="test-balance", namespace=m.namespace)
        try:
            exhausted = ev.BalanceEvent(workspace_id=tight, free_cents=200, campaign_ids=[tc])
            await bus.publish(bus.event_subject("billing", "balance_exhausted"), exhausted)
        finally:
            await bus.close()
        await reach(m, tight, tc, PAUSED_BALANCE)
        # 2 pending contacts at 400 cents each: 800 > the 200 left.
        err = await refused(
            m.campaign.ResumeCampaign(cpb.ResumeCampaignRequest(workspace_id=tight, campaign_id=tc))
        )
        assert err.reason == "insufficient_balance" and "800" in err.message
        assert await state_of(m, tight, tc) == PAUSED_BALANCE
        await top_up(m, tight, 1_000)
        resumed = await m.campaign.ResumeCampaign(
            cpb.ResumeCampaignRequest(workspace_id=tight, campaign_id=tc)
        )
        assert resumed.state == RUNNING
        assert [a[:3] for a in await audit(m, tight, tc)] == [
            (DRAFT, RUNNING, "operator"),
            (RUNNING, PAUSED_BALANCE, "billing"),
            (PAUSED_BALANCE, RUNNING, "operator"),
        ]

        # A schedule in the past is refused, naming the field.
        past = cpb.ScheduledTrigger(local_time="2020-01-01T09:00", time_zone="Europe/Paris")
        pid = await create(m, ws, trigger=cpb.Trigger(scheduled=past), flow=send_flow(tid), segment_id=seg)
        err = await refused(
            m.campaign.ScheduleCampaign(
                cpb.ScheduleCampaignRequest(workspace_id=ws, campaign_id=pid, schedule=past)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in err.violations] == ["schedule.local_time"]
        err = await refused(
            m.campaign.StartCampaign(
                cpb.StartCampaignRequest(workspace_id=ws, campaign_id=str(uuid.uuid4()))
            ),
            grpc.StatusCode.NOT_FOUND,
        )


# -- the scheduler under a controllable clock, and the launch checks -------------------------------


async def test_scheduler_clock_and_launch_checks(
    nats_url: str, tmp_path: Path, db_kind: str, new_database_url: Any
) -> None:
    urls: dict[str, str] = {}

    def db_url(name: str) -> str:
        urls[name] = new_database_url(db_kind, name)
        return urls[name]

    async with mesh(nats_url=nats_url, tmp_path=tmp_path, database_url=db_url) as m:
        ws = m.workspace_id
        seg = await audience(m, ws, "sched")
        tid = await template(m, ws)
        await top_up(m, ws)

        # A second Lifecycle over the campaign database and the mesh's peers, with our clock.
        # The mesh's own scheduler runs on the real clock and never sees these 2031 due times.
        now = [datetime(2031, 3, 30, 6, 0, tzinfo=UTC)]
        db = Database(urls["campaign"], migrations_dir=MIGRATIONS)
        bus = await Bus.connect(nats_url, name="test-scheduler", namespace=m.namespace)
        try:
            lc = Lifecycle(
                db=db,
                bus=bus,
                kv=await CampaignStates.open(bus),
                peers=Peers(
                    segment=m.segment,
                    template=m.template,
                    billing=m.billing,
                    execution=m.execution,
                    channels=[],
                ),
                schedule_grace=timedelta(hours=1),
                idempotency_ttl=timedelta(hours=24),
                clock=lambda: now[0],
            )
            # 09:00 Paris on 2031-03-30 (CEST) is 07:00 UTC.
            at = cpb.ScheduledTrigger(local_time="2031-03-30T09:00", time_zone="Europe/Paris")
            trigger = cpb.Trigger(scheduled=at)

            # Found two hours late (beyond the one-hour grace): missed, back to DRAFT.
            missed = await create(m, ws, trigger=trigger, flow=send_flow(tid), segment_id=seg)
            await lc.schedule(ws, missed, at, actor="operator")
            now[0] = datetime(2031, 3, 30, 9, 0, tzinfo=UTC)
            assert await lc.tick_scheduler() == []
            assert await state_of(m, ws, missed) == DRAFT
            last = (await audit(m, ws, missed))[-1]
            assert last[:3] == (SCHEDULED, DRAFT, "scheduler")
            assert last[3].startswith("missed") and "7200s late" in last[3]
            assert await runs(m, ws, missed) == []

            # Found 30 minutes late (within the grace): it starts, and the run goes through.
            now[0] = datetime(2031, 3, 30, 6, 0, tzinfo=UTC)
            late = await create(m, ws, trigger=trigger, flow=send_flow(tid), segment_id=seg)
            await lc.schedule(ws, late, at, actor="operator")
            now[0] = datetime(2031, 3, 30, 6, 59, tzinfo=UTC)
            assert await lc.tick_scheduler() == []  # not due yet
            assert await state_of(m, ws, late) == SCHEDULED
            now[0] = datetime(2031, 3, 30, 7, 30, tzinfo=UTC)
            assert await lc.tick_scheduler() == [late]
            done = await reach(m, ws, late, COMPLETED)
            assert (done.counts.completed, done.sent) == (3, 3)
            assert [a[:3] for a in await audit(m, ws, late)] == [
                (DRAFT, SCHEDULED, "operator"),
                (SCHEDULED, RUNNING, "scheduler"),
                (RUNNING, COMPLETED, "execution"),
            ]

            # Refused at the due time (balance spent meanwhile): back to DRAFT with the reason,
            # not retried every tick.
            poor = "ws_poor_sched"
            poor_seg = await audience(m, poor, "poor")
            poor_tid = await template(m, poor)
            now[0] = datetime(2031, 3, 30, 6, 0, tzinfo=UTC)
            refused_id = await create(m, poor, trigger=trigger, flow=send_flow(poor_tid), segment_id=poor_seg)
            await lc.schedule(poor, refused_id, at, actor="operator")
            now[0] = datetime(2031, 3, 30, 7, 1, tzinfo=UTC)
            assert await lc.tick_scheduler() == []
            assert await state_of(m, poor, refused_id) == DRAFT
            last = (await audit(m, poor, refused_id))[-1]
            assert last[:3] == (SCHEDULED, DRAFT, "scheduler")
            assert "insufficient_balance" in last[3]
        finally:
            await bus.close()
            await db.close()

        # Launch refused with the node and the reason: DRAFT, REJECTED, wrong channel, wrong type.
        draft_tid = await template(m, ws, publish=False)
        rejected_tid = await template(m, ws, publish=False, reject=True)
        newsletter_tid = await template(m, ws, message_type=NEWSLETTER)
        cases = {
            "draft": send_flow(draft_tid),
            "rejected": send_flow(rejected_tid),
            "channel": send_flow(tid, channel=SMS),
            "type": send_flow(newsletter_tid),
        }
        for label, flow in cases.items():
            cid = await create(m, ws, trigger=MANUAL, flow=flow, segment_id=seg, name=label)
            validation = await m.campaign.ValidateCampaign(
                cpb.ValidateCampaignRequest(workspace_id=ws, campaign_id=cid)
            )
            assert not validation.ok
            assert {(e.node_id, e.rule) for e in validation.errors} == {("s1", "send.template_launchable")}, (
                label
            )
            err = await refused(
                m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid))
            )
            assert err.reason == "launch_blocked", label
            assert err.violations and all("s1" in v.description for v in err.violations), label
            assert "s1" in err.message
            assert await state_of(m, ws, cid) == DRAFT
            assert await runs(m, ws, cid) == [] and await audit(m, ws, cid) == []
        published = await m.campaign.ValidateCampaign(
            cpb.ValidateCampaignRequest(
                workspace_id=ws,
                campaign_id=await create(m, ws, trigger=MANUAL, flow=send_flow(tid), segment_id=seg),
            )
        )
        assert published.ok and not published.errors
        messages = {
            label: (
                await m.campaign.ValidateCampaign(
                    cpb.ValidateCampaignRequest(
                        workspace_id=ws,
                        campaign_id=await create(m, ws, trigger=MANUAL, flow=flow, segment_id=seg),
                    )
                )
            )
            .errors[0]
            .message
            for label, flow in cases.items()
        }
        assert "SMS" in messages["channel"] and "NEWSLETTER" in messages["type"]

        # Launch refused for balance: nothing written (no run, no transition, still DRAFT).
        cid = await create(m, poor, trigger=MANUAL, flow=send_flow(poor_tid), segment_id=poor_seg)
        err = await refused(
            m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=poor, campaign_id=cid))
        )
        assert err.reason == "insufficient_balance"
        assert await state_of(m, poor, cid) == DRAFT
        assert await runs(m, poor, cid) == [] and await audit(m, poor, cid) == []
        assert await executions(m, poor, cid) == []


# -- API triggers and estimates --------------------------------------------------------------------


async def test_api_trigger_runs_and_estimate(nats_url: str, tmp_path: Path) -> None:
    async with mesh(nats_url=nats_url, tmp_path=tmp_path) as m:
        ws = m.workspace_id
        seg = await audience(m, ws, "api")
        tid = await template(m, ws)
        await top_up(m, ws)

        manual = await create(m, ws, trigger=MANUAL, flow=send_flow(tid), segment_id=seg)
        err = await refused(
            m.campaign.TriggerCampaign(
                cpb.TriggerCampaignRequest(workspace_id=ws, campaign_id=manual, idempotency_key="k")
            )
        )
        assert err.reason == "not_api_triggered"
        assert await state_of(m, ws, manual) == DRAFT and await runs(m, ws, manual) == []

        # The WAIT keeps the first run in progress long enough to trigger into it.
        cid = await create(m, ws, trigger=API, flow=send_flow(tid, wait_seconds=2), segment_id=seg)
        err = await refused(
            m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid))
        )
        assert err.reason == "api_triggered"

        def trigger(key: str, recipients: list[str] | None = None) -> Awaitable[cpb.TriggerCampaignResponse]:
            return m.campaign.TriggerCampaign(
                cpb.TriggerCampaignRequest(
                    workspace_id=ws,
                    campaign_id=cid,
                    idempotency_key=key,
                    recipients=recipients or [],
                    actor="api:key_1",
                )
            )

        first = await trigger("k1")
        assert first.run_id and first.state == RUNNING and not first.replayed
        again = await trigger("k1")
        assert (again.run_id, again.replayed) == (first.run_id, True)
        err = await refused(trigger("k2"))
        assert "state RUNNING" in err.message
        assert len(await runs(m, ws, cid)) == 1

        done = await reach(m, ws, cid, COMPLETED)
        assert (done.run_id, done.counts.completed, done.sent, done.estimated_remaining_cost_cents) == (
            first.run_id,
            3,
            3,
            0,
        )

        # After COMPLETED the next trigger starts a new run (here for one named recipient).
        one = (await m.segment.ListContacts(spb.ListContactsRequest(workspace_id=ws))).contacts[0].id
        second = await trigger("k3", [one])
        assert second.run_id != first.run_id and second.state == RUNNING and not second.replayed
        replay = await trigger("k1")
        assert (replay.run_id, replay.replayed) == (first.run_id, True)
        done = await reach(m, ws, cid, COMPLETED)
        assert (done.run_id, done.counts.completed) == (second.run_id, 1)
        listed = await runs(m, ws, cid)
        assert {(r.id, r.idempotency_key, r.state) for r in listed} == {
            (first.run_id, "k1", cpb.RUN_STATE_COMPLETED),
            (second.run_id, "k3", cpb.RUN_STATE_COMPLETED),
        }
        assert [a[:3] for a in await audit(m, ws, cid)] == [
            (DRAFT, RUNNING, "api:key_1"),
            (RUNNING, COMPLETED, "execution"),
            (COMPLETED, RUNNING, "api:key_1"),
            (RUNNING, COMPLETED, "execution"),
        ]

        # Estimate of a flow with an A/B test: 30% get one SMS (7 cents), 70% two EMAILs (1 cent
        # each). Expected, rounded up per send: ceil(3*7*0.3) + 2*ceil(3*1*0.7) = 7 + 6 = 13.
        # Upper bound: the dearest path (the SMS), 3 * 7 = 21, though the other has more sends.
        ab = cpb.Flow(
            steps=[
                cpb.Step(
                    id="ab1",
                    ab_test=cpb.AbTestStep(
                        variants=[
                            cpb.AbVariant(
                                name="sms",
                                weight=30,
                                branch=cpb.Branch(
                                    steps=[
                                        send_step("tpl_x", node="a1", channel=SMS),
                                        cpb.Step(id="ea", end=cpb.EndStep()),
                                    ]
                                ),
                            ),
                            cpb.AbVariant(
                                name="email",
                                weight=70,
                                branch=cpb.Branch(
                                    steps=[
                                        send_step("tpl_y", node="b1"),
                                        send_step("tpl_y", node="b2"),
                                        cpb.Step(id="eb", end=cpb.EndStep()),
                                    ]
                                ),
                            ),
                        ]
                    ),
                )
            ]
        )
        eid = await create(m, ws, trigger=MANUAL, flow=ab, segment_id=seg)
        est = await m.campaign.EstimateCampaign(cpb.EstimateCampaignRequest(workspace_id=ws, campaign_id=eid))
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        assert (est.audience_size, est.expected_cost_cents, est.upper_bound_cost_cents) == (3, 13, 21)
        assert est.free_balance_cents == balance.balance.free_cents == 10_000 - 4


# -- event triggers over NATS, pause while events arrive, breaker and balance pauses -----------------


async def test_event_trigger_and_auto_pauses(nats_url: str, tmp_path: Path) -> None:
    async with mesh(nats_url=nats_url, tmp_path=tmp_path) as m:
        ws = m.workspace_id
        tid = await template(m, ws)
        await top_up(m, ws)
        err = await refused(
            m.campaign.CreateCampaign(
                cpb.CreateCampaignRequest(
                    workspace_id=ws,
                    name="bad",
                    trigger=cpb.Trigger(event=cpb.EventTrigger(event_type="created")),
                    flow=send_flow(tid),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in err.violations] == ["trigger.event.event_type"]

        rule = cpb.EventTrigger(event_type="contact.created", required_tag="onboarding")
        cid = await create(m, ws, trigger=cpb.Trigger(event=rule), flow=send_flow(tid))
        started = await m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid))
        assert started.campaign.state == RUNNING and started.run_id
        assert (await audit(m, ws, cid))[0] == (DRAFT, RUNNING, "operator", "activate")

        async def execution_of(contact_id: str, state: int) -> Any:
            found = [e for e in await executions(m, ws, cid) if e.contact_id == contact_id]
            return found if found and all(e.state == state for e in found) else None

        # Without the tag: no entry. With it: one execution, one message. Contact events are
        # consumed in order, so once the tagged contact is through, the untagged one was seen.
        await add_contact(m, ws, "nobody@example.com", ["newsletter"])
        ada = await add_contact(m, ws, "ada@example.com", ["onboarding"])
        await wait_for(lambda: execution_of(ada, epb.EXECUTION_STATE_COMPLETED), timeout=20)
        await wait_for(lambda: messages_to(m, ws, "ada@example.com"), timeout=10)
        assert [e.contact_id for e in await executions(m, ws, cid)] == [ada]
        assert messages_to(m, ws, "nobody@example.com") == []

        # The same contact's event again (another event id, so not a JetStream duplicate): no
        # second entry. The marker contact after it proves the replay was consumed.
        bus = await Bus.connect(nats_url, name="test-events", namespace=m.namespace)
        try:
            replay = ev.ContactEvent(
                workspace_id=ws, contact_id=ada, type="created", tags=["onboarding"], event_id="evt_replay"
            )
            await bus.publish(bus.event_subject("contact", "created"), replay)
            bob = await add_contact(m, ws, "bob@example.com", ["onboarding"])
            await wait_for(lambda: execution_of(bob, epb.EXECUTION_STATE_COMPLETED), timeout=20)
            assert len([e for e in await executions(m, ws, cid) if e.contact_id == ada]) == 1
            assert len(messages_to(m, ws, "ada@example.com")) == 1

            # Paused: a matching contact still gets a pending execution, which runs after resume.
            await m.campaign.PauseCampaign(cpb.PauseCampaignRequest(workspace_id=ws, campaign_id=cid))
            cleo = await add_contact(m, ws, "cleo@example.com", ["onboarding"])
            await wait_for(lambda: execution_of(cleo, epb.EXECUTION_STATE_PENDING), timeout=20)
            assert messages_to(m, ws, "cleo@example.com") == []
            paused_status = await status(m, ws, cid)
            assert (paused_status.state, paused_status.counts.pending, paused_status.counts.completed) == (
                PAUSED,
                1,
                2,
            )
            assert paused_status.estimated_remaining_cost_cents == 1
            resumed = await m.campaign.ResumeCampaign(
                cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=cid)
            )
            assert resumed.state == RUNNING and resumed.requeued == 1
            await wait_for(lambda: execution_of(cleo, epb.EXECUTION_STATE_COMPLETED), timeout=20)
            await wait_for(lambda: messages_to(m, ws, "cleo@example.com"), timeout=10)
            st = await status(m, ws, cid)
            # An event campaign never completes: it keeps accepting entries.
            assert (st.state, st.counts.completed, st.counts.pending, st.sent) == (RUNNING, 3, 0, 3)

            # A breaker opening for a provider the campaign does not use changes nothing; for its
            # provider (the sandbox, the EMAIL default its SEND relies on), the campaign moves to
            # PAUSED_ERROR.
            defaults = {"smtp": [common.CHANNEL_SMS], "sandbox": [common.CHANNEL_EMAIL]}
            for provider in ("smtp", "sandbox"):
                opened = ev.ProviderBreakerChanged(
                    provider=provider,
                    state=ev.BREAKER_STATE_OPEN,
                    reason=f"{provider} down",
                    default_for=defaults[provider],
                )
                await bus.publish(bus.event_subject("provider", "breaker_opened"), opened)
            await reach(m, ws, cid, PAUSED_ERROR)
            breaker_moves = [a for a in await audit(m, ws, cid) if a[2].startswith("breaker:")]
            assert breaker_moves == [(RUNNING, PAUSED_ERROR, "breaker:sandbox", "sandbox down")]
            resumed = await m.campaign.ResumeCampaign(
                cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=cid)
            )
            assert resumed.state == RUNNING

            # Billing says the free balance is exhausted: PAUSED_BALANCE, resumed explicitly.
            exhausted = ev.BalanceEvent(workspace_id=ws, free_cents=0, campaign_ids=[cid])
            await bus.publish(bus.event_subject("billing", "balance_exhausted"), exhausted)
            await reach(m, ws, cid, PAUSED_BALANCE)
            assert (await audit(m, ws, cid))[-1][:3] == (RUNNING, PAUSED_BALANCE, "billing")
            resumed = await m.campaign.ResumeCampaign(
                cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=cid)
            )
            assert resumed.state == RUNNING
        finally:
            await bus.close()
