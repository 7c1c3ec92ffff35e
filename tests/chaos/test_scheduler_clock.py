"""Chaos: the scheduler's clock jumps (NTP step, VM resume, an operator fixing the time).

The campaign service runs in this process with an injected clock (`build(..., clock=...)`, the
`Lifecycle.clock` seam the scheduler reads); every other service is its own process. A campaign
scheduled 10 minutes ahead: the clock jumps back a day (nothing happens), forward past the due
time (it starts, once), back before the due time and forward again (it does not start again).
A second campaign whose due time the clock jumps more than the grace period past is marked
missed (back to DRAFT), not started hours late.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from tests.chaos.cluster import Cluster, assert_invariants, cluster, create_campaign, status, wait_state
from tests.chaos.conftest import Recorder
from tests.helpers import wait_for

ZONE = "Europe/Paris"
SCHEDULED = cpb.CAMPAIGN_STATE_SCHEDULED


class JumpingClock:
    """Real UTC time plus an offset the test moves; counts its readings (scheduler ticks read it)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.readings = 0
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.readings += 1
            return datetime.now(UTC) + self.offset

    def jump(self, delta: timedelta) -> None:
        with self._lock:
            self.offset += delta

    async def ticks(self, n: int = 10) -> None:
        """Let the scheduler read the clock `n` more times (it reads it once per 0.2 s tick)."""
        target = self.readings + n
        await wait_for(lambda: self.readings >= target, timeout=30, interval=0.05)


async def schedule(c: Cluster, campaign_id: str, due: datetime) -> None:
    local = due.astimezone(ZoneInfo(ZONE)).strftime("%Y-%m-%dT%H:%M:%S")
    await c.campaign.ScheduleCampaign(
        cpb.ScheduleCampaignRequest(
            workspace_id=c.workspace_id,
            campaign_id=campaign_id,
            schedule=cpb.ScheduledTrigger(local_time=local, time_zone=ZONE),
        )
    )


async def runs_of(c: Cluster, campaign_id: str) -> list[str]:
    reply = await c.campaign.ListRuns(
        cpb.ListRunsRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
    )
    return [r.id for r in reply.runs]


@pytest.mark.timeout(240)
async def test_scheduler_clock_jumps(nats_url: str, tmp_path: Path, reliability: Recorder) -> None:
    audience = 30
    clock = JumpingClock()
    async with cluster(nats_url=nats_url, tmp_path=tmp_path, campaign_clock=clock) as c:
        await c.billing.TopUp(bpb.TopUpRequest(workspace_id=c.workspace_id, amount_cents=5_000))
        trigger = cpb.Trigger(scheduled=cpb.ScheduledTrigger(local_time="2030-01-01T09:00", time_zone=ZONE))
        campaign_id = await create_campaign(c, audience, tag="clock", trigger=trigger)
        due = (clock() + timedelta(minutes=10)).replace(microsecond=0)
        await schedule(c, campaign_id, due)

        clock.jump(-timedelta(days=1))  # back a day: further from due, nothing to do
        await clock.ticks()
        assert (await status(c, campaign_id)).state == SCHEDULED
        clock.jump(timedelta(days=1) + timedelta(minutes=10, seconds=30))  # 30 s past due
        jumped = time.monotonic()
        started = await wait_for(lambda: runs_of(c, campaign_id), timeout=30, interval=0.05)
        recovery = time.monotonic() - jumped
        clock.jump(-timedelta(hours=1))  # before the due time again
        await clock.ticks()
        clock.jump(timedelta(hours=3))  # far past it
        await clock.ticks()
        assert await runs_of(c, campaign_id) == started, "started more than once"
        outcome = await assert_invariants(c, campaign_id, audience=audience)
        moves = await c.campaign.ListTransitions(
            cpb.ListTransitionsRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
        )
        starts = [t for t in moves.transitions if t.from_state == SCHEDULED]
        assert [(t.to_state, t.actor) for t in starts] == [(cpb.CAMPAIGN_STATE_RUNNING, "scheduler")], starts

        # A due time the clock leaps more than the grace period (1 h) past: missed, not started.
        first = (
            await c.campaign.GetCampaign(
                cpb.GetCampaignRequest(workspace_id=c.workspace_id, campaign_id=campaign_id)
            )
        ).campaign
        created = await c.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=c.workspace_id,
                name="missed",
                segment_id=first.segment_id,
                trigger=trigger,
                flow=first.flow,
            )
        )
        missed_id = created.campaign.id
        await schedule(c, missed_id, clock() + timedelta(minutes=10))
        clock.jump(timedelta(hours=2))
        missed = await wait_state(c, missed_id, cpb.CAMPAIGN_STATE_DRAFT, timeout=30)
        assert await runs_of(c, missed_id) == []
        assert missed.run_id == ""

        reliability.record(
            contacts=audience,
            faults=(
                "scheduler clock -1 day, +1 day 10.5 min (30 s past due: started), -1 h, +3 h "
                "(no second start); another schedule jumped 2 h past due: DRAFT (missed), no run"
            ),
            sent_keys=outcome.keys,
            final_state=f"{outcome.final_state}, one run",
            recovery=recovery,
        )
