"""Fan-out of a run: stream the audience in pages, insert executions in bulk, publish steps.

Resumable: the run row keeps a cursor (the last contact id committed). A crash mid-page re-reads
that page; executions already inserted are found and not duplicated (unique run+contact), and
their step messages are published again, which the compare-and-set on step_seq makes harmless.
A lease on the run keeps two processes from fanning out the same run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from opentelemetry import trace
from sqlalchemy import select, update

from services.execution import repo
from services.execution.repo import PENDING
from shoal import flow as flows
from shoal.bus import Bus, Outgoing
from shoal.db import Database
from shoal.telemetry import ATTR_CAMPAIGN_ID, ATTR_RUN_ID, inject
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import events_pb2 as ev
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import segment_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("shoal.execution")

_NAMESPACE = uuid.UUID("5b1c8f2e-2a4e-4b0e-9a59-3f0d6f1c8a10")


def execution_id(run_id: str, contact_id: str, entry: int = 0) -> str:
    """Deterministic, so a resumed fan-out names the same execution the same way."""
    return "ex_" + uuid.uuid5(_NAMESPACE, f"{run_id}:{contact_id}:{entry}").hex


class Fanout:
    def __init__(
        self,
        *,
        db: Database,
        bus: Bus,
        segment: segment_pb2_grpc.SegmentServiceStub,
        page_size: int,
        owner: str,
        on_progress: Any,
        renudge: timedelta,
    ) -> None:
        self.renudge = renudge
        self.db = db
        self.bus = bus
        self.segment = segment
        self.page_size = page_size
        self.owner = owner
        self.lease = timedelta(seconds=30)
        self.on_progress = on_progress
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, run_id: str) -> None:
        """Fan out in the background (the task inherits the caller's trace context)."""
        if run_id in self.tasks and not self.tasks[run_id].done():
            return
        self.tasks[run_id] = asyncio.create_task(self._guarded(run_id), name=f"fanout-{run_id}")

    async def resume_all(self) -> None:
        for run_id in await self.db.run(repo.runs_needing_fanout):
            self.start(run_id)

    async def _guarded(self, run_id: str) -> None:
        try:
            await self.run(run_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The run stays not fanned out; the next process start (or StartRun retry) resumes it.
            log.exception("fan-out of run %s failed", run_id)

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def run(self, run_id: str) -> None:
        if not await self.db.run(repo.claim_fanout, run_id=run_id, owner=self.owner, lease=self.lease):
            return
        run = await self.db.run(lambda s: repo.get_run(s, run_id=run_id))
        flow = cpb.Flow.FromString(run.flow)
        entry = flows.compile_flow(flow).entry
        with tracer.start_as_current_span(
            "shoal.fanout", attributes={ATTR_RUN_ID: run_id, ATTR_CAMPAIGN_ID: run.campaign_id}
        ) as span:
            total = 0
            async for page in self._pages(run):
                total += await self._page(run, entry, page)
                if not await self.db.run(
                    repo.claim_fanout, run_id=run_id, owner=self.owner, lease=self.lease
                ):
                    log.warning("lost the fan-out lease of run %s", run_id)
                    return

            def done(session: Any) -> list[Any]:
                session.execute(update(repo.R).where(repo.R.c.id == run_id).values(fanout_done=True))
                return repo.counters_of(session, [run_id])

            counters = await self.db.run(done)
            span.set_attribute("shoal.fanout.contacts", total)
            await self.on_progress(counters)

    async def _pages(self, run: Any) -> AsyncIterator[list[str]]:
        if run.recipients:
            ids = sorted(set(json.loads(run.recipients)))
            ids = [i for i in ids if i > run.fanout_cursor]
            for i in range(0, len(ids), self.page_size):
                yield ids[i : i + self.page_size]
            return
        if not run.segment_id:
            return
        stream = self.segment.StreamMembers(
            spb.StreamMembersRequest(
                workspace_id=run.workspace_id,
                segment_id=run.segment_id,
                page_size=self.page_size,
                after_contact_id=run.fanout_cursor,
            ),
            # A million-contact stream takes minutes; the default per-call deadline would cut it.
            timeout=24 * 3600,
        )
        async for page in stream:
            yield [m.contact_id for m in page.members]

    async def enter(self, run: Any, contact_ids: list[str], *, allow_reentry: bool) -> int:
        """Add contacts to an open run (event trigger). A contact already in the run enters
        again only with `allow_reentry` and only once its earlier execution has ended."""
        entry_node = flows.compile_flow(cpb.Flow.FromString(run.flow)).entry
        E = repo.E

        def insert(session: Any) -> list[tuple[str, int]]:
            latest: dict[str, tuple[int, int]] = {}
            for cid, entry, state in session.execute(
                select(E.c.contact_id, E.c.entry, E.c.state).where(
                    E.c.run_id == run.id, E.c.contact_id.in_(contact_ids)
                )
            ).all():
                if cid not in latest or entry > latest[cid][0]:
                    latest[cid] = (entry, state)
            t = repo.now()
            rows = []
            for cid in dict.fromkeys(contact_ids):
                if cid in latest:
                    entry, state = latest[cid]
                    if not allow_reentry or state not in repo.TERMINAL:
                        continue
                    entry += 1
                else:
                    entry = 0
                rows.append(self._row(run, cid, entry=entry, node_id=entry_node, t=t, traceparent=""))
            repo.insert_executions(session, rows)
            if rows:
                repo.move_counters(session, {run.id: Counter(pending=len(rows))})
            return [(r["id"], 0) for r in rows]

        steps = await self.db.run(insert)
        await self._publish(run, steps)
        return len(steps)

    def _row(
        self, run: Any, contact_id: str, *, entry: int, node_id: str, t: Any, traceparent: str
    ) -> dict[str, Any]:
        return {
            "id": execution_id(run.id, contact_id, entry),
            "workspace_id": run.workspace_id,
            "campaign_id": run.campaign_id,
            "run_id": run.id,
            "contact_id": contact_id,
            "entry": entry,
            "state": PENDING,
            "node_id": node_id,
            "step_seq": 0,
            "reason": "",
            "ab_variant": "",
            "wake_at": None,
            "nudge_at": t + self.renudge,
            "lease_until": None,
            "traceparent": traceparent,
            "created_at": t,
            "updated_at": t,
        }

    async def _publish(self, run: Any, steps: list[tuple[str, int]]) -> None:
        await self.bus.publish_many(
            [
                Outgoing(
                    self.bus.step_subject(run.campaign_id),
                    ev.StepMessage(
                        workspace_id=run.workspace_id,
                        campaign_id=run.campaign_id,
                        run_id=run.id,
                        execution_id=ex_id,
                        step_seq=seq,
                    ),
                    msg_id=f"{ex_id}:{seq}",
                )
                for ex_id, seq in steps
            ]
        )

    async def _page(self, run: Any, entry: str, contact_ids: list[str]) -> int:
        """Insert this page's executions, publish their steps, then move the cursor."""
        if not contact_ids:
            return 0
        headers: dict[str, str] = {}
        inject(headers)
        traceparent = headers.get("traceparent", "")

        def insert(session: Any) -> list[tuple[str, int]]:
            known = repo.existing_contacts(session, run_id=run.id, contact_ids=contact_ids)
            t = repo.now()
            rows = [
                self._row(run, cid, entry=0, node_id=entry, t=t, traceparent=traceparent)
                for cid in contact_ids
                if cid not in known
            ]
            repo.insert_executions(session, rows)
            if rows:
                repo.move_counters(session, {run.id: Counter(pending=len(rows))})
            # Publish for the whole page: after a crash, known rows may still lack their message.
            return [(execution_id(run.id, cid), 0) for cid in contact_ids]

        steps = await self.db.run(insert)
        await self.bus.publish_many(
            [
                Outgoing(
                    self.bus.step_subject(run.campaign_id),
                    ev.StepMessage(
                        workspace_id=run.workspace_id,
                        campaign_id=run.campaign_id,
                        run_id=run.id,
                        execution_id=ex_id,
                        step_seq=seq,
                    ),
                    msg_id=f"{ex_id}:{seq}",
                )
                for ex_id, seq in steps
            ]
        )

        def advance(session: Any) -> None:
            session.execute(update(repo.R).where(repo.R.c.id == run.id).values(fanout_cursor=contact_ids[-1]))

        await self.db.run(advance)
        return len(contact_ids)
