"""Chaos: 100 pause/resume pairs while a run is in flight.

Users of other engines report duplicate sends after a pause. Here an operator hammers pause and
resume while 1,000 contacts move through SEND -> END: every pause must stop new work (messages
for a paused campaign are acked and left pending), every resume must re-queue exactly the
pending executions, and in the end every contact was sent exactly one message, billed once.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from shoal.errors import from_rpc_error
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from tests.chaos.conftest import Recorder
from tests.integration.test_execution_faults import (
    email_template,
    sandbox_keys,
    seed_audience,
    start_campaign,
    status,
    wait_state,
)
from tests.mesh import mesh

AUDIENCE = 1_000
STORM = 100


async def test_pause_resume_storm_sends_each_contact_once(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        # A slow carrier (300 ms per call of 10 messages, one call at a time) keeps the run going
        # for well over the storm, so every pause and resume lands while work is in flight.
        execution={"batch_size": 50, "provider_batch_size": 10, "provider_concurrency": 1},
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "300"},
    ) as m:
        ws = m.workspace_id
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=10_000))
        campaign_id = await start_campaign(
            m, await seed_audience(m, AUDIENCE, tag="storm"), await email_template(m)
        )
        pauses = resumes = refused = 0
        for _ in range(STORM):
            try:
                await m.campaign.PauseCampaign(
                    cpb.PauseCampaignRequest(workspace_id=ws, campaign_id=campaign_id)
                )
                pauses += 1
                await m.campaign.ResumeCampaign(
                    cpb.ResumeCampaignRequest(workspace_id=ws, campaign_id=campaign_id)
                )
                resumes += 1
            except grpc.aio.AioRpcError as exc:
                # The run may complete mid-storm: then pause is refused as a wrong-state move.
                assert from_rpc_error(exc).reason == "wrong_state", exc
                refused += 1
                break
        assert pauses == resumes == STORM, f"the run ended after {pauses} pauses ({refused} refused)"
        done = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=180)
        assert done.counts.completed == AUDIENCE and done.sent == AUDIENCE
        keys = sandbox_keys(m)
        assert len(keys) == AUDIENCE, f"{len(keys)} messages for {AUDIENCE} contacts after {pauses} pauses"
        assert len(set(keys)) == AUDIENCE
        reliability.record(
            contacts=AUDIENCE,
            faults=f"{pauses} pause/resume pairs during the run",
            sent_keys=keys,
            final_state="COMPLETED",
        )
        balance = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        assert balance.balance.reserved_cents == 0
        assert balance.balance.free_cents == 10_000 - AUDIENCE
        transitions = await m.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=ws, campaign_id=campaign_id)
        )
        moves = [(t.from_state, t.to_state) for t in transitions.transitions]
        assert moves.count((cpb.CAMPAIGN_STATE_RUNNING, cpb.CAMPAIGN_STATE_PAUSED)) == pauses
        assert moves[-1] == (cpb.CAMPAIGN_STATE_RUNNING, cpb.CAMPAIGN_STATE_COMPLETED)
        assert (await status(m, campaign_id)).counts.pending == 0
