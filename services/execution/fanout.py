"""Fan-out of a run: stream the audience in pages, insert executions in bulk, publish steps.

Resumable: the run row keeps a cursor (the last contact id committed). A crash mid-page re-reads
that page; executions already inserted are found and not duplicated (unique run+contact), and
their step messages are published again, which the compare-and-set on step_seq makes harmless.
A lease on the run keeps two processes from fanning out the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from shoal import flow as flows
from shoal import metrics as shoal_metrics
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


_NAMESPACE_BYTES = _NAMESPACE.bytes


def execution_id(run_id: str, contact_id: str, entry: int = 0) -> str:
    """Deterministic, so a resumed fan-out names the same execution the same way.

    `"ex_" + uuid5(_NAMESPACE, "run:contact:entry").hex`, computed without building UUID objects
    (a third of the cost, once per contact of a fan-out): the SHA-1 of namespace + name, cut to
    16 bytes, with the version (5) and RFC 4122 variant bits set as `uuid.UUID` sets them.
    """
    name = f"{run_id}:{contact_id}:{entry}".encode()
    # Not a security hash: uuid5 is SHA-1 by definition (RFC 4122).
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return "ex_" + digest.hex()


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
        metrics: shoal_metrics.Metrics | None = None,
    ) -> None:
        self.renudge = renudge
        self.metrics = metrics or shoal_metrics.default()
        self.db = db
        self.bus = bus
        self.segment = segment
        self.page_size = page_size
        self.owner = owner
        self.lease = timedelta(seconds=30)
        self.on_progress = on_progress
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False

    def start(self, run_id: str) -> None:
        """Fan out in the background (the task inherits the caller's trace context)."""
        if self.stopping or (run_id in self.tasks and not self.tasks[run_id].done()):
            return
        self.tasks[run_id] = asyncio.create_task(self._guarded(run_id), name=f"fanout-{run_id}")

    async def resume_all(self) -> None:
        for run_id in await self.db.run(repo.runs_needing_fanout):
            self.start(run_id)

    async def watch(self, stop: asyncio.Event, *, interval: float = 2.0) -> None:
        """Resume unfinished fan-outs until `stop`: one that failed (NATS away mid-publish) or
        whose lease a dead process still held when this one started is picked up here, not only
        at the next process start. A run with a live fan-out task here is skipped by `start`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set():
                return
            try:
                await self.resume_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("resuming fan-outs failed")

    async def _guarded(self, run_id: str) -> None:
        try:
            await self.run(run_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The run stays not fanned out; the next process start (or StartRun retry) resumes it.
            log.exception("fan-out of run %s failed", run_id)

    async def stop(self) -> None:
        self.stopping = True
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

        def insert(session: Any) -> tuple[list[tuple[str, int]], int]:
            latest: dict[str, tuple[int, int]] = {}
            for cid, entry, state in session.execute(
                select(E.c.contact_id, E.c.entry, E.c.state).where(
                    E.c.run_id == run.id, E.c.contact_id.in_(contact_ids)
                )
            ).all():
                if cid not in latest or entry > latest[cid][0]:
                    latest[cid] = (entry, state)
            rows = []
            for cid in dict.fromkeys(contact_ids):
                if cid in latest:
                    entry, state = latest[cid]
                    if not allow_reentry or state not in repo.TERMINAL:
                        continue
                    entry += 1
                else:
                    entry = 0
                rows.append(repo.NewExecution(execution_id(run.id, cid, entry), cid, entry))
            # A concurrent entry of the same contact (same deterministic id) is skipped by the
            # insert; only the rows it added are counted.
            inserted = repo.insert_executions(
                session,
                run=run,
                node_id=entry_node,
                rows=rows,
                nudge_at=repo.now() + self.renudge,
                traceparent="",
            )
            if inserted:
                repo.move_counters(session, {run.id: Counter(pending=inserted)})
            return [(r.id, 0) for r in rows], inserted

        steps, inserted = await self.db.run(insert)
        self.metrics.record_fanout(inserted)
        await self._publish(run, steps)
        return inserted

    async def _publish(self, run: Any, steps: list[tuple[str, int]]) -> None:
        subject = self.bus.step_subject(run.campaign_id)
        # One template message copied per step: cheaper than building each from keywords.
        template = ev.StepMessage(workspace_id=run.workspace_id, campaign_id=run.campaign_id, run_id=run.id)
        out = []
        for ex_id, seq in steps:
            msg = ev.StepMessage()
            msg.CopyFrom(template)
            msg.execution_id = ex_id
            msg.step_seq = seq
            out.append(Outgoing(subject, msg, msg_id=f"{ex_id}:{seq}"))
        await self.bus.publish_many(out)

    async def _page(self, run: Any, entry: str, contact_ids: list[str]) -> int:
        """Insert this page's executions, publish their steps, then move the cursor."""
        if not contact_ids:
            return 0
        headers: dict[str, str] = {}
        inject(headers)
        traceparent = headers.get("traceparent", "")

        ids = [execution_id(run.id, cid) for cid in contact_ids]

        def insert(session: Any) -> int:
            # Rows of this page already inserted (a page read again after a crash) have the same
            # deterministic ids and are skipped by the insert itself; only new rows are counted.
            inserted = repo.insert_executions(
                session,
                run=run,
                node_id=entry,
                rows=[repo.NewExecution(ex_id, cid, 0) for ex_id, cid in zip(ids, contact_ids, strict=True)],
                nudge_at=repo.now() + self.renudge,
                traceparent=traceparent,
            )
            if inserted:
                repo.move_counters(session, {run.id: Counter(pending=inserted)})
            return inserted

        # Counted after the commit, and only the rows new in it: a resumed page adds none twice.
        self.metrics.record_fanout(await self.db.run(insert))
        # Publish for the whole page: after a crash, known rows may still lack their message.
        await self._publish(run, [(ex_id, 0) for ex_id in ids])

        def advance(session: Any) -> None:
            session.execute(update(repo.R).where(repo.R.c.id == run.id).values(fanout_cursor=contact_ids[-1]))

        await self.db.run(advance)
        return len(contact_ids)
