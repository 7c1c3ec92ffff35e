"""Chaos: the carrier misbehaves, the money runs out - every service as its own process.

- Slow carrier: it answers after 6 s, beyond the execution service's 5 s provider timeout, for a
  while. Calls time out although the carrier went on to accept their messages; the retries
  (same send keys) are answered "duplicate", so every contact still gets exactly one message.
- Provider outage: the breaker opens, the campaign moves to PAUSED_ERROR, the carrier recovers,
  the operator resumes, the run completes (the in-process version of this scenario is
  tests/integration/test_execution_faults.py; here every service is its own process and the
  whole invariant set is checked).
- Balance exhausted, auto-reload off: PAUSED_BALANCE, resume refused (priced at today's prices)
  until a top-up, then the run completes with one capture per message. And a resume the
  estimate allows while the balance is still short pauses again instead of staying RUNNING.
- Balance with auto-reload on (payments answered after 4 s): reloads refill the balance while
  the run goes on, at most 3 times a day; a reload landing while a campaign is PAUSED_BALANCE
  never resumes it; the operator does.

Launch is refused when the balance does not cover the expected cost, so where a run must
outgrow its money the price rises right after launch, or a branch costs more than the expected
cost counts it for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.errors import from_rpc_error
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from tests.chaos.cluster import (
    Cluster,
    assert_invariants,
    cluster,
    executions_of,
    launch,
    ledger_entries,
    send_step,
    status,
    wait_carrier,
    wait_state,
)
from tests.chaos.conftest import Recorder
from tests.helpers import wait_for
from tests.integration.test_execution_faults import email_template

PAUSED_BALANCE = cpb.CAMPAIGN_STATE_PAUSED_BALANCE
COMPLETED = cpb.CAMPAIGN_STATE_COMPLETED


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_slow_provider_times_out_and_retries(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    audience = 60
    async with cluster(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={
            "batch_size": 10,
            "provider_batch_size": 10,
            "provider_concurrency": 4,
            # Timeouts are the subject here, not the breaker (scenario "provider outage" is).
            "breaker_consecutive_failures": 10_000,
            "breaker_min_calls": 10_000,
        },
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "6000"},  # the provider timeout is 5 s
    ) as c:
        run = await launch(c, audience, tag="slow")
        # Messages reach the carrier 6 s after their call, once the caller has given up on it.
        at = await wait_carrier(c, 10, timeout=60)
        assert await c.sent(run.run_id) == 0, "no call answered within the timeout, none recorded yet"
        c.sandbox.control(latency_ms=0)
        since = time.monotonic()
        recovery = await c.recovered(run.run_id, since=since, baseline=0)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience)
        retried = sum(1 for e in await executions_of(c, run.run_id) if e.step_seq > 1)
        assert retried >= at, f"{retried} executions retried, {at} timed out at least"
        reliability.record(
            contacts=audience,
            faults=(
                f"carrier answers after 6 s (timeout 5 s) until {at} timed-out messages had arrived; "
                f"{retried} executions retried"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_provider_outage_breaker_pause_resume(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    audience = 200
    async with cluster(
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
    ) as c:
        run = await launch(c, audience, tag="outage")
        at = await wait_carrier(c, 20)
        c.sandbox.control(outage=True)
        paused = await wait_state(c, run.campaign_id, cpb.CAMPAIGN_STATE_PAUSED_ERROR, timeout=30)
        assert paused.counts.pending > 0, "unsent contacts stay pending"
        assert (paused.counts.failed, paused.counts.skipped) == (0, 0)
        moves = await transitions(c, run.campaign_id)
        assert moves[-1].actor == "breaker:sandbox", moves[-1]
        c.sandbox.control(outage=False)
        baseline = await c.sent(run.run_id)
        since = time.monotonic()
        await c.campaign.ResumeCampaign(
            cpb.ResumeCampaignRequest(workspace_id=c.workspace_id, campaign_id=run.campaign_id)
        )
        recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience)
        reliability.record(
            contacts=audience,
            faults=(
                f"carrier outage after {at} messages: breaker opened, PAUSED_ERROR with "
                f"{paused.counts.pending} pending; carrier back, operator resumed"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )


async def set_price(c: Cluster, cents: int) -> None:
    price = bpb.Price(
        channel=common.CHANNEL_EMAIL,
        message_type=common.MESSAGE_TYPE_MESSAGE,
        unit=common.BILLING_UNIT_EMAIL,
        cents=cents,
    )
    await c.billing.SetPrice(bpb.SetPriceRequest(workspace_id=c.workspace_id, price=price))


async def transitions(c: Cluster, campaign_id: str) -> list[cpb.Transition]:
    reply = await c.campaign.ListTransitions(
        cpb.ListTransitionsRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
    )
    return list(reply.transitions)


async def resume(c: Cluster, campaign_id: str) -> None:
    await c.campaign.ResumeCampaign(
        cpb.ResumeCampaignRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
    )


async def top_up(c: Cluster, cents: int) -> None:
    await c.billing.TopUp(bpb.TopUpRequest(workspace_id=c.workspace_id, amount_cents=cents))


@pytest.mark.timeout(240)
async def test_balance_exhausted_auto_reload_off(
    nats_url: str, tmp_path: Path, reliability: Recorder
) -> None:
    audience = 100
    async with cluster(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={"batch_size": 10, "provider_batch_size": 10, "provider_concurrency": 1},
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "50"},
    ) as c:
        await set_price(c, 1)
        run = await launch(c, audience, tag="balance-off", top_up_cents=1_000)  # covers 100 at 1
        await set_price(c, 600)  # now it pays for one message
        paused = await wait_state(c, run.campaign_id, PAUSED_BALANCE, timeout=60)
        assert paused.counts.pending > 0 and paused.counts.failed == 0
        balance = (await c.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=c.workspace_id))).balance
        assert 0 <= balance.free_cents < 600
        # Regression: the run's launch-time price (1 cent) said the rest was covered and the
        # campaign resumed, ran short again inside the same exhausted episode (no new event) and
        # stayed RUNNING without sending. Resume prices the pending contacts at today's prices.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await resume(c, run.campaign_id)
        assert from_rpc_error(refused.value).reason == "insufficient_balance"
        assert (await status(c, run.campaign_id)).state == PAUSED_BALANCE
        await top_up(c, 600 * audience)
        baseline = await c.sent(run.run_id)
        since = time.monotonic()
        await resume(c, run.campaign_id)
        recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience)
        reliability.record(
            contacts=audience,
            faults=(
                f"price 1 -> 600 cents after launch: PAUSED_BALANCE with {paused.counts.pending} pending, "
                "resume refused (insufficient_balance at today's prices), top-up, operator resumed"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )

        # -- part 2 (a workspace of its own): a resume the estimate allows although the balance
        # is still short. The flow sends to VIP contacts only, and the expected cost counts a
        # CONDITION branch as half the audience: one pending VIP is "90 cents" while its send
        # costs 180. Regression: its hold failed again inside the same exhausted episode,
        # billing said nothing, and the campaign stayed RUNNING without sending; now the
        # shortage pauses it again.
        c.workspace_id = "ws_chaos_branch"
        vips = 7
        await set_price(c, 180)
        await top_up(c, 1_170)  # 7 x 90 expected = 630 at launch; pays 6 VIPs of 7, 90 left
        campaign_id = await branch_campaign(c, vips=vips, others=0)
        started = await c.campaign.StartCampaign(
            cpb.StartCampaignRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
        )
        short = await wait_settled(c, campaign_id, PAUSED_BALANCE)
        assert (short.counts.pending, short.sent) == (1, vips - 1), short
        await resume(c, campaign_id)  # 90 cents free cover "1 x 90 expected"
        again = await wait_settled(c, campaign_id, PAUSED_BALANCE)
        assert (again.counts.pending, again.sent) == (1, vips - 1), again
        await top_up(c, 1_000)
        since = time.monotonic()
        await resume(c, campaign_id)
        recovery = await c.recovered(started.run_id, since=since, baseline=vips - 1)
        outcome = await assert_invariants(c, campaign_id, audience=vips)
        moves = await transitions(c, campaign_id)
        pausers = [t.actor.split(":")[0] for t in moves if t.to_state == PAUSED_BALANCE]
        assert pausers == ["billing", "billing"], moves
        reliability.part("resumed while still short").record(
            contacts=vips,
            faults=(
                "VIP-only send (expected cost counts it half): PAUSED_BALANCE with 1 pending, resume "
                "accepted by the estimate, hold short again -> PAUSED_BALANCE again; top-up, resume"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )


async def wait_settled(c: Cluster, campaign_id: str, state: int, *, timeout: float = 60) -> Any:
    """The campaign in `state` with nothing in flight (a batch claimed before the pause finishes)."""

    async def settled() -> Any:
        reply = await status(c, campaign_id)
        return reply if reply.state == state and reply.counts.processing == 0 else None

    return await wait_for(settled, timeout=timeout, interval=0.1, message=cpb.CampaignState.Name(state))


async def branch_campaign(c: Cluster, *, vips: int, others: int) -> str:
    """Contacts tagged `branch`, the first `vips` also `vip`; a flow sending only to VIPs."""
    contacts = [
        spb.ContactInput(
            email=f"b{i}@example.com",
            first_name=f"B{i}",
            tags=["branch", "vip"] if i < vips else ["branch"],
            status=spb.CONTACT_STATUS_ACTIVE,
            consents=[
                spb.ConsentInput(
                    channel=common.CHANNEL_EMAIL,
                    message_type=common.MESSAGE_TYPE_MESSAGE,
                    status=spb.CONSENT_STATUS_GRANTED,
                    source="test",
                )
            ],
        )
        for i in range(vips + others)
    ]
    reply = await c.segment.ImportContacts(
        spb.ImportContactsRequest(workspace_id=c.workspace_id, contacts=contacts)
    )
    assert reply.imported == len(contacts), reply.rejected
    segment = await c.segment.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=c.workspace_id, name="branch", filter=spb.Filter(tag=spb.TagCondition(tag="branch"))
        )
    )
    template_id = await email_template(c)  # type: ignore[arg-type]
    vip = cpb.Predicate(tag=spb.TagCondition(tag="vip"))
    flow = cpb.Flow(
        steps=[
            cpb.Step(
                id="c1",
                condition=cpb.ConditionStep(
                    predicate=vip,
                    yes=cpb.Branch(
                        steps=[send_step("s1", template_id), cpb.Step(id="e1", end=cpb.EndStep())]
                    ),
                    no=cpb.Branch(steps=[cpb.Step(id="e2", end=cpb.EndStep())]),
                ),
            )
        ]
    )
    created = await c.campaign.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=c.workspace_id,
            name="branch",
            segment_id=segment.segment.id,
            trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
            flow=flow,
        )
    )
    return str(created.campaign.id)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_balance_auto_reload_on(nats_url: str, tmp_path: Path, reliability: Recorder) -> None:
    """Part 1: the balance is refilled while the run goes on, at most 3 times a day. Part 2 (another
    workspace, the first one's reloads are used up for today): the run outgrows its money, a
    reload fires but its payment lands after the campaign paused; the campaign stays paused."""
    cap = 3
    async with cluster(
        nats_url=nats_url,
        tmp_path=tmp_path,
        # The carrier bounds the pace: one call of 10 messages at a time, 200 ms each.
        execution={"batch_size": 10, "provider_batch_size": 10, "provider_concurrency": 1},
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "200"},
        # Every card payment takes 4 s.
        billing={"payment_mode": "slow", "payment_slow_seconds": 4, "auto_reload_daily_cap": cap},
    ) as c:
        # -- part 1: 800 contacts at 10 cents, paid for at launch; the threshold sits just below
        # the starting balance, so a reload fires after every landing while the run lasts >= 16 s.
        audience = 800
        await set_price(c, 10)
        await set_auto_reload(c, threshold=7_900, amount=1_000)
        run = await launch(c, audience, tag="refill", top_up_cents=8_000)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience, timeout=120)
        fired = await reloads(c)
        assert fired == cap, f"{fired} auto-reloads in one day, the cap is {cap}"
        # ... and the cap was what stopped a 4th: holds went on under the threshold after the 3rd.
        free = seen = under = 0
        for e in await ledger_entries(c):
            free += e.free_delta_cents
            seen += e.kind == bpb.LEDGER_ENTRY_KIND_AUTO_RELOAD
            under += seen == cap and e.kind == bpb.LEDGER_ENTRY_KIND_HOLD and free < 7_900
        assert under > 0, "the run ended before a 4th reload was due; the cap was not tested"
        moves = await transitions(c, run.campaign_id)
        assert [t.to_state for t in moves][-2:] == [cpb.CAMPAIGN_STATE_RUNNING, COMPLETED], moves
        assert outcome.free_cents == 8_000 + cap * 1_000 - audience * 10
        reliability.record(
            contacts=audience,
            faults=(
                f"balance under the auto-reload threshold all run long (payments take 4 s): "
                f"{fired} reloads, then {under} holds under the threshold refused a 4th (daily cap); "
                "never paused"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
        )

        # -- part 2: a workspace of its own. Launched at 1 cent, then 10: 1,000 cents pay for
        # about 100 of 200 contacts. A reload fires under 150 cents; the money runs out long
        # before its 4 s payment lands.
        c.workspace_id = "ws_chaos_reload"
        audience = 200
        await set_price(c, 1)
        await set_auto_reload(c, threshold=150, amount=1_000)
        run = await launch(c, audience, tag="no-resume", top_up_cents=1_000)
        await set_price(c, 10)
        paused = await wait_state(c, run.campaign_id, PAUSED_BALANCE, timeout=60)
        assert await reloads(c) == 0, "the payment was still running when the run paused"
        await wait_for(lambda: _reloaded(c), timeout=30, interval=0.1)
        # Credited while PAUSED_BALANCE: the campaign stays paused, whatever the balance says.
        for _ in range(5):
            assert (await status(c, run.campaign_id)).state == PAUSED_BALANCE
        pending = (await status(c, run.campaign_id)).counts.pending
        balance = (await c.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=c.workspace_id))).balance
        await top_up(c, max(1_000, pending * 10 - balance.free_cents))
        baseline = await c.sent(run.run_id)
        since = time.monotonic()
        await resume(c, run.campaign_id)
        recovery = await c.recovered(run.run_id, since=since, baseline=baseline)
        outcome = await assert_invariants(c, run.campaign_id, audience=audience)
        moves = await transitions(c, run.campaign_id)
        resumed = [t for t in moves if t.from_state == PAUSED_BALANCE]
        assert [t.actor.split(":")[0] for t in resumed] == ["operator"], moves
        reliability.part("reload lands while paused").record(
            contacts=audience,
            faults=(
                f"price 1 -> 10 cents after launch: PAUSED_BALANCE ({paused.counts.pending} pending) before "
                "the auto-reload's payment landed; credited, it stayed paused until the operator's "
                "top-up and resume"
            ),
            sent_keys=outcome.keys,
            final_state=outcome.final_state,
            recovery=recovery,
        )


async def set_auto_reload(c: Cluster, *, threshold: int, amount: int) -> None:
    await c.billing.SetAutoReload(
        bpb.SetAutoReloadRequest(
            workspace_id=c.workspace_id,
            auto_reload=bpb.AutoReload(
                enabled=True, trigger_threshold_cents=threshold, reload_amount_cents=amount
            ),
        )
    )


async def reloads(c: Cluster) -> int:
    return sum(1 for e in await ledger_entries(c) if e.kind == bpb.LEDGER_ENTRY_KIND_AUTO_RELOAD)


async def _reloaded(c: Cluster) -> bool:
    return await reloads(c) > 0
