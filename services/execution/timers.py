"""Durable timers, safety nudges and leases: the loop that keeps every pending execution moving.

WAIT parks an execution as `pending` with `wake_at` in its row, so timers survive any restart.
Every pending execution also carries `nudge_at`: if its step message was lost (a publish that
failed during a NATS restart, a crash between commit and publish) the loop publishes a fresh one
then. Nudges never change step_seq, so a message already queued stays current and a duplicate
nudge is harmless: one claim wins. Executions whose worker died (`processing` past the lease)
return to `pending` with a new step_seq (fencing the dead worker) and are nudged on the next tick.
Only campaigns that are RUNNING are nudged; resume nudges the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta

from opentelemetry.context import Context

from services.execution import repo
from services.execution.repo import ExecRow
from shoal.bus import Bus, Outgoing
from shoal.campaign_states import RUNNING, CampaignStates
from shoal.db import Database
from shoal.telemetry import extract
from shoal.v1 import events_pb2 as ev

log = logging.getLogger(__name__)


def step_messages(bus: Bus, rows: Sequence[ExecRow], *, nudge: str = "") -> list[Outgoing]:
    """Step messages for rows, each continuing the execution's own trace.

    The message id is `execution:step_seq` for the first message of a step; a nudge adds its own
    tag so JetStream's duplicate window does not swallow it.
    """
    out = []
    # Rows of one fan-out page share a traceparent: one Context per trace lets publish_many give
    # them one PRODUCER span instead of one each.
    contexts: dict[str, Context] = {}
    for r in rows:
        context: Context | None = None
        if r.traceparent:
            context = contexts.get(r.traceparent)
            if context is None:
                context = contexts[r.traceparent] = extract({"traceparent": r.traceparent})
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
                msg_id=f"{r.id}:{r.step_seq}:{nudge}" if nudge else f"{r.id}:{r.step_seq}",
                context=context,
            )
        )
    return out


async def nudge(
    *,
    db: Database,
    bus: Bus,
    campaign_ids: Sequence[str],
    resume: bool,
    renudge: timedelta,
    limit: int = 1000,
) -> int:
    """Publish a step for the due pending executions of these (running) campaigns."""
    total = 0
    after: repo.NudgeCursor | None = None
    tag = f"n{repo.now().timestamp():.3f}"
    while campaign_ids:
        rows, after = await db.run(
            repo.nudge_due,
            campaign_ids=campaign_ids,
            resume=resume,
            after=after,
            limit=limit,
            renudge=renudge,
        )
        if rows:
            await bus.publish_many(step_messages(bus, rows, nudge=tag))
        total += len(rows)
        if after is None:
            return total
    return total


class TimerLoop:
    def __init__(
        self, *, db: Database, bus: Bus, states: CampaignStates, interval: float, renudge: timedelta
    ) -> None:
        self.db = db
        self.bus = bus
        self.states = states
        self.interval = interval
        self.renudge = renudge

    async def tick(self) -> tuple[int, int]:
        expired: list[ExecRow] = await self.db.run(repo.expire_leases, limit=1000)
        if expired:
            log.warning("%d executions returned to pending after their lease expired", len(expired))
        campaigns = await self.db.run(repo.due_campaigns)
        running = [c for c, s in (await self.states.get_many(campaigns)).items() if s == RUNNING]
        woken = await nudge(
            db=self.db, bus=self.bus, campaign_ids=running, resume=False, renudge=self.renudge
        )
        return woken, len(expired)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # NATS or the database is away; the rows are untouched or marked for a later nudge.
                log.exception("timer tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
