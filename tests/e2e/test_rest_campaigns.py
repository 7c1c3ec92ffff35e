"""The REST gateway in front of the real mesh: the four operational endpoints with every status
code a real campaign service produces, and sandbox receipts travelling back through the signed
callback to NATS and into the segment service as contact events.

The gateway is served by uvicorn on a socket bound before the mesh starts, so the sandbox carrier
(a real subprocess) can be told where to POST its receipts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2

from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb
from tests.e2e.rest import rest_mesh
from tests.e2e.test_thin_run import EMAIL, MESSAGE, seed
from tests.helpers import wait_for
from tests.mesh import Mesh

MISSING = "9a4c0d5e-0000-4000-8000-123456789abc"


def flow(template_id: str) -> cpb.Flow:
    """SEND, then a long WAIT: the run stays RUNNING for the whole test."""
    return cpb.Flow(
        steps=[
            cpb.Step(
                id="s1",
                send=cpb.SendStep(
                    channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
                ),
            ),
            cpb.Step(id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=3600))),
            cpb.Step(id="e1", end=cpb.EndStep()),
        ]
    )


async def template(m: Mesh, workspace: str, *, publish: bool) -> str:
    made = await m.template.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=workspace,
            name="t",
            channel=EMAIL,
            message_type=MESSAGE,
            content=tpb.TemplateContent(email=tpb.EmailContent(subject="Hi", html="<p>Hi</p>")),
        )
    )
    if publish:
        await m.template.PublishTemplate(
            tpb.PublishTemplateRequest(workspace_id=workspace, template_id=made.template.id, version=1)
        )
    return str(made.template.id)


async def campaign(
    m: Mesh, workspace: str, template_id: str, *, segment_id: str = "", api: bool = True
) -> str:
    trigger = cpb.Trigger(api=cpb.ApiTrigger()) if api else cpb.Trigger(manual=cpb.ManualTrigger())
    made = await m.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=workspace,
            name="rest",
            segment_id=segment_id,
            trigger=trigger,
            flow=flow(template_id),
        )
    )
    return str(made.campaign.id)


async def test_operational_endpoints_and_receipts_over_the_real_mesh(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="rest")
        cid = await campaign(m, ws, template_id, segment_id=segment_id)
        headers = await rest.key(ws, "campaigns:read", "campaigns:trigger", "campaigns:write")
        c = rest.client

        # Trigger: 202, then a replay with the same key answers the same run.
        first = await c.post(f"/v1/campaigns/{cid}/trigger", json={"idempotency_key": "k1"}, headers=headers)
        assert first.status_code == 202, first.text
        run_id = first.json()["run_id"]
        assert first.json() == {"run_id": run_id, "status": "RUNNING"}
        replay = await c.post(f"/v1/campaigns/{cid}/trigger", json={"idempotency_key": "k1"}, headers=headers)
        assert (replay.status_code, replay.json()["run_id"]) == (202, run_id), replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        # A new trigger while the run is in progress: 409.
        busy = await c.post(f"/v1/campaigns/{cid}/trigger", json={"idempotency_key": "k2"}, headers=headers)
        assert (busy.status_code, busy.json()["error"]) == (409, "wrong_state"), busy.text
        # Unknown campaign: 404; a manual campaign cannot be triggered: 409.
        missing = await c.post(f"/v1/campaigns/{MISSING}/trigger", headers=headers)
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        manual = await campaign(m, ws, template_id, segment_id=segment_id, api=False)
        refused = await c.post(f"/v1/campaigns/{manual}/trigger", headers=headers)
        assert (refused.status_code, refused.json()["error"]) == (409, "not_api_triggered"), refused.text
        # A template that is not published blocks the launch: 422 naming the node.
        blocked = await campaign(m, ws, await template(m, ws, publish=False), segment_id=segment_id)
        reply = await c.post(f"/v1/campaigns/{blocked}/trigger", headers=headers)
        assert (reply.status_code, reply.json()["error"]) == (422, "launch_blocked"), reply.text
        assert reply.json()["details"] and "s1" in reply.json()["details"][0]["message"]
        # A workspace without balance: 402 (its key acts in its workspace only).
        poor_key = await rest.key("ws_poor", "campaigns:trigger")
        poor = await campaign(m, "ws_poor", await template(m, "ws_poor", publish=True))
        reply = await c.post(
            f"/v1/campaigns/{poor}/trigger", json={"recipients": ["c_1", "c_2"]}, headers=poor_key
        )
        assert (reply.status_code, reply.json()["error"]) == (402, "insufficient_balance"), reply.text
        # The other workspace's key does not see this workspace's campaign.
        reply = await c.get(
            f"/v1/campaigns/{cid}/status", headers=await rest.key("ws_poor", "campaigns:read")
        )
        assert reply.status_code == 404

        # The three messages were sent; their receipts come back through the signed callback.
        async def sent() -> Any:
            reply = await c.get(f"/v1/campaigns/{cid}/status", headers=headers)
            return reply.json() if reply.json()["sent"] == 3 else None

        status = await wait_for(sent, timeout=20)
        assert (status["id"], status["state"], status["run_id"]) == (cid, "RUNNING", run_id)

        # Pause: 200, again 409; resume: 200, again 409.
        paused = await c.post(f"/v1/campaigns/{cid}/pause", headers=headers)
        assert (paused.status_code, paused.json()) == (200, {"status": "PAUSED"}), paused.text
        again = await c.post(f"/v1/campaigns/{cid}/pause", headers=headers)
        assert (again.status_code, again.json()["error"]) == (409, "wrong_state")
        assert (await c.get(f"/v1/campaigns/{cid}/status", headers=headers)).json()["state"] == "PAUSED"
        resumed = await c.post(f"/v1/campaigns/{cid}/resume", headers=headers)
        assert (resumed.status_code, resumed.json()) == (200, {"status": "RUNNING"}), resumed.text
        again = await c.post(f"/v1/campaigns/{cid}/resume", headers=headers)
        assert (again.status_code, again.json()["error"]) == (409, "wrong_state")

        contacts = await m.segment.ListContacts(spb.ListContactsRequest(workspace_id=ws))
        ids = [ct.id for ct in contacts.contacts]
        assert len(ids) == 3

        async def engaged() -> bool:
            queries = [
                spb.EventQuery(contact_id=i, type=kind, run_id=run_id, node_id="s1")
                for i in ids
                for kind in ("message.delivered", "email.opened")
            ]
            reply = await m.segment.QueryEvents(spb.QueryEventsRequest(workspace_id=ws, queries=queries))
            return all(reply.occurred)

        await wait_for(engaged, timeout=20, message=m.sandbox.logs)

        # The delivery receipts settled the sends: ACCEPTED -> DELIVERED (the opens change nothing more).
        async def delivered() -> bool:
            reply = await m.execution.ListSends(epb.ListSendsRequest(workspace_id=ws, run_id=run_id))
            return len(reply.sends) == 3 and all(s.status == epb.SEND_STATUS_DELIVERED for s in reply.sends)

        await wait_for(delivered, timeout=20)


async def test_resume_is_402_while_the_balance_cannot_cover_the_pending_audience(
    nats_url: str, tmp_path: Path
) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="resume")
        waits_first = cpb.Flow(
            steps=[
                cpb.Step(id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=3600))),
                *flow(template_id).steps[:1],
                cpb.Step(id="e1", end=cpb.EndStep()),
            ]
        )
        made = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=ws,
                name="waits",
                segment_id=segment_id,
                trigger=cpb.Trigger(api=cpb.ApiTrigger()),
                flow=waits_first,
            )
        )
        cid = made.campaign.id
        headers = await rest.key(ws, "admin")
        c = rest.client
        assert (await c.post(f"/v1/campaigns/{cid}/trigger", headers=headers)).status_code == 202

        async def all_pending() -> bool:
            status = (await c.get(f"/v1/campaigns/{cid}/status", headers=headers)).json()
            return bool(status["counts"]["pending"] == 3)

        await wait_for(all_pending, timeout=20)
        assert (await c.post(f"/v1/campaigns/{cid}/pause", headers=headers)).status_code == 200
        # Something else holds nearly all the free balance: 2 cents left for 3 pending contacts.
        free = (await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))).balance.free_cents
        held = await m.billing.HoldBatch(
            bpb.HoldBatchRequest(
                workspace_id=ws,
                items=[bpb.HoldItem(key="drain:1", channel=EMAIL, message_type=MESSAGE, units=int(free) - 2)],
            )
        )
        assert held.balance.free_cents == 2, held
        short = await c.post(f"/v1/campaigns/{cid}/resume", headers=headers)
        assert (short.status_code, short.json()["error"]) == (402, "insufficient_balance"), short.text
        await m.billing.ReleaseBatch(bpb.ReleaseBatchRequest(workspace_id=ws, keys=["drain:1"]))
        resumed = await c.post(f"/v1/campaigns/{cid}/resume", headers=headers)
        assert (resumed.status_code, resumed.json()) == (200, {"status": "RUNNING"}), resumed.text
