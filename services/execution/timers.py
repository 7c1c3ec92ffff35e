"""Durable timers and leases: the loop that wakes parked executions and recovers dead workers.

WAIT parks an execution as `pending` with `wake_at` in its row, so timers survive any restart.
Every interval this loop finds due executions of running campaigns, gives each a new step_seq by
compare-and-set (so several worker processes never both wake one execution) and publishes its
step with the trace context it parked with. It also returns executions whose worker died
(`processing` past the lease) to `pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from opentelemetry.context import Context

from services.execution import repo
from services.execution.repo import ExecRow
from shoal.bus import Bus, Outgoing
from shoal.campaign_states import RUNNING, CampaignStates
from shoal.db import Database
from shoal.telemetry import extract
from shoal.v1 import events_pb2 as ev

log = logging.getLogger(__name__)


def step_messages(bus: Bus, rows: Sequence[ExecRow]) -> list[Outgoing]:
    """Step messages for rows, each continuing the execution's own trace."""
    out = []
    for r in rows:
        context: Context | None = extract({"traceparent": r.traceparent}) if r.traceparent else None
        out.append(
            Outgoing(
                bus.step_subject(r.campaign_id),
                ev.StepMessage(
                    workspace_id=r.workspace_id,
                    campaign_id=r.campaign_id,
                    run_id=r.run_id,
                    execution_id=r.id,
                    step_seq=r.step_seq,
                ),
                msg_id=f"{r.id}:{r.step_seq}",
                context=context,
            )
        )
    return out


async def requeue(
    *,
    db: Database,
    bus: Bus,
    states: CampaignStates,
    campaign_id: str | None,
    include_unscheduled: bool,
    limit: int = 1000,
) -> int:
    """Publish a fresh step for due pending executions (of one campaign, or of every running one)."""
    total = 0
    while True:
        due = await db.run(
            lambda s: repo.due_pending(
                s, limit=limit, campaign_id=campaign_id, include_unscheduled=include_unscheduled
            )
        )
        if not due:
            return total
        running = await states.get_many({c for _, _, c in due})
        runnable = [(i, seq) for i, seq, c in due if running.get(c) == RUNNING]
        if not runnable:
            return total
        rows = await db.run(repo.bump_due, due=runnable)
        await bus.publish_many(step_messages(bus, rows))
        total += len(rows)
        if len(due) < limit:
            return total


class TimerLoop:
    def __init__(self, *, db: Database, bus: Bus, states: CampaignStates, interval: float) -> None:
        self.db = db
        self.bus = bus
        self.states = states
        self.interval = interval

    async def tick(self) -> tuple[int, int]:
        woken = await requeue(
            db=self.db, bus=self.bus, states=self.states, campaign_id=None, include_unscheduled=False
        )
        expired: list[ExecRow] = await self.db.run(repo.expire_leases, limit=1000)
        if expired:
            log.warning("%d executions returned to pending after their lease expired", len(expired))
            await self.bus.publish_many(step_messages(self.bus, expired))
        return woken, len(expired)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
