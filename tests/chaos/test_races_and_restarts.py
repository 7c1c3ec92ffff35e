"""Chaos: two triggers racing with one idempotency key; a WAIT that crosses a kill -9."""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf import duration_pb2

from shoal.grpc import wait_healthy
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import template_pb2 as tpb
from tests.chaos.conftest import Recorder
from tests.helpers import wait_for
from tests.integration.test_execution_faults import email_template, sandbox_keys, seed_audience, wait_state
from tests.mesh import mesh

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE


def send_step(step_id: str, template_id: str) -> cpb.Step:
    return cpb.Step(
        id=step_id,
        send=cpb.SendStep(
            channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
        ),
    )


async def test_racing_triggers_with_one_key_start_one_run(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    async with mesh(nats_url=nats_url, tmp_path=tmp_path) as m:
        ws = m.workspace_id
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=5_000))
        segment_id = await seed_audience(m, 50, tag="race")
        template_id = await email_template(m)
        created = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=ws,
                name="api",
                segment_id=segment_id,
                trigger=cpb.Trigger(api=cpb.ApiTrigger()),
                flow=cpb.Flow(steps=[send_step("s1", template_id), cpb.Step(id="e1", end=cpb.EndStep())]),
            )
        )
        cid = created.campaign.id
        request = cpb.TriggerCampaignRequest(workspace_id=ws, campaign_id=cid, idempotency_key="order-42")
        replies = await asyncio.gather(
            *(m.campaign.TriggerCampaign(request) for _ in range(2)), return_exceptions=True
        )
        run_ids = {r.run_id for r in replies if isinstance(r, cpb.TriggerCampaignResponse)}
        assert len(run_ids) == 1, replies
        errors = [r for r in replies if not isinstance(r, cpb.TriggerCampaignResponse)]
        # The loser either replays the same run or, if it read the state after the winner's
        # move, is told a run is in progress; never a second run.
        assert all("cannot trigger" in str(e) for e in errors), errors
        await wait_state(m, cid, cpb.CAMPAIGN_STATE_COMPLETED)
        runs = await m.campaign.ListRuns(cpb.ListRunsRequest(workspace_id=ws, campaign_id=cid))
        assert [r.id for r in runs.runs] == list(run_ids)
        keys = sandbox_keys(m)
        assert len(keys) == len(set(keys)) == 50
        reliability.record(
            contacts=50,
            faults="2 concurrent API triggers, one idempotency key",
            sent_keys=keys,
            final_state="COMPLETED, one run",
        )
        again = await m.campaign.TriggerCampaign(request)
        assert again.replayed and again.run_id in run_ids


async def test_wait_crosses_a_killed_execution_process(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution_as_process=True,
        execution={"lease_seconds": 2, "renudge_seconds": 3},
    ) as m:
        ws = m.workspace_id
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=5_000))
        segment_id = await seed_audience(m, 20, tag="wait")
        template_id = await email_template(m)
        flow = cpb.Flow(
            steps=[
                send_step("s1", template_id),
                cpb.Step(id="w1", wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=4))),
                send_step("s2", template_id),
                cpb.Step(id="e1", end=cpb.EndStep()),
            ]
        )
        created = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=ws,
                name="wait",
                segment_id=segment_id,
                trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
                flow=flow,
            )
        )
        cid = created.campaign.id
        started = await m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=cid))

        async def all_parked() -> bool:
            page = await m.execution.ListExecutions(
                epb.ListExecutionsRequest(
                    workspace_id=ws, run_id=started.run_id, page=common.PageRequest(page_size=100)
                )
            )
            return len(page.executions) == 20 and all(
                e.state == epb.EXECUTION_STATE_PENDING and e.node_id == "s2" and e.HasField("wake_time")
                for e in page.executions
            )

        await wait_for(all_parked, timeout=30)
        proc = m.execution_process
        assert proc is not None
        proc.kill()  # every timer is only a row now
        proc.start()
        await wait_healthy(proc.address, within=30)
        done = await wait_state(m, cid, cpb.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.counts.completed == 20 and done.sent == 40
        keys = sandbox_keys(m)
        assert len(keys) == len(set(keys)) == 40
        assert sum(k.endswith(":s2") for k in keys) == 20
        reliability.record(
            contacts=20,
            faults="kill -9 of the execution process during a WAIT (2 sends each)",
            sent_keys=[k for k in keys if k.endswith(":s2")],
            final_state="COMPLETED",
        )


async def test_flapping_provider_retries_without_duplicates(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={"batch_size": 50, "provider_batch_size": 20, "retry_backoff_seconds": 0.2},
        sandbox_env={"SHOAL_SANDBOX_FAILURE_RATE": "0.3", "SHOAL_SANDBOX_FAILURE_SEED": "7"},
    ) as m:
        ws = m.workspace_id
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=5_000))
        segment_id = await seed_audience(m, 300, tag="flap")
        template_id = await email_template(m)
        created = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=ws,
                name="flap",
                segment_id=segment_id,
                trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
                flow=cpb.Flow(steps=[send_step("s1", template_id), cpb.Step(id="e1", end=cpb.EndStep())]),
            )
        )
        await m.campaign.StartCampaign(
            cpb.StartCampaignRequest(workspace_id=ws, campaign_id=created.campaign.id)
        )
        done = await wait_state(m, created.campaign.id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.counts.completed == 300 and done.counts.failed == 0
        # The flapping really happened: a retried execution went around once more (step_seq > 1).
        seqs: list[int] = []
        token = ""
        while True:
            page = await m.execution.ListExecutions(
                epb.ListExecutionsRequest(
                    workspace_id=ws,
                    run_id=done.run_id,
                    page=common.PageRequest(page_size=1000, page_token=token),
                )
            )
            seqs.extend(e.step_seq for e in page.executions)
            token = page.page.next_page_token
            if not token:
                break
        retried = sum(1 for q in seqs if q > 1)
        assert 30 < retried < 270, f"{retried} of 300 executions were retried"
        keys = sandbox_keys(m)
        assert len(keys) == len(set(keys)) == 300
        reliability.record(
            contacts=300,
            faults=f"provider fails 30% of items; {retried} executions retried",
            sent_keys=keys,
            final_state="COMPLETED",
        )
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        assert (balance.balance.reserved_cents, balance.balance.free_cents) == (0, 5_000 - 300)
