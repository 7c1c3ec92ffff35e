"""ExecutionService over gRPC: proto in, domain calls, proto out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from sqlalchemy import select

from services.execution import repo, timers
from services.execution.fanout import Fanout
from shoal import flow as flows
from shoal.bus import Bus
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.errors import FieldViolation, InvalidArgument, NotFound
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import execution_pb2 as pb
from shoal.v1 import execution_pb2_grpc

MAX_PAGE = 1000
# Runs whose SEND node ids GetExecution keeps (a run's flow never changes).
SEND_NODES_CACHE = 1024


def _send_nodes(flow: bytes) -> tuple[str, ...]:
    compiled = flows.compile_flow(cpb.Flow.FromString(flow))
    return tuple(n.id for n in compiled.nodes.values() if n.kind == flows.SEND)


def require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument.of(name, "is required")
    return value


def _ts(value: Any) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def execution_pb(r: Any) -> pb.Execution:
    return pb.Execution(
        id=r.id,
        workspace_id=r.workspace_id,
        campaign_id=r.campaign_id,
        run_id=r.run_id,
        contact_id=r.contact_id,
        state=r.state,
        node_id=r.node_id,
        step_seq=r.step_seq,
        reason=r.reason,
        ab_variant=r.ab_variant,
        wake_time=_ts(r.wake_at),
        create_time=_ts(r.created_at),
        update_time=_ts(r.updated_at),
        trace_id=r.traceparent.split("-")[1] if r.traceparent.count("-") >= 2 else "",
    )


def send_pb(r: Any) -> pb.Send:
    return pb.Send(
        key=r.key,
        execution_id=r.execution_id,
        node_id=r.node_id,
        channel=r.channel,
        provider=r.provider,
        provider_message_id=r.provider_message_id,
        status=r.status,
        cost_cents=r.cost_cents,
        create_time=_ts(r.created_at),
    )


class ExecutionServicer(execution_pb2_grpc.ExecutionServiceServicer):
    def __init__(
        self, *, db: Database, bus: Bus, states: CampaignStates, fanout: Fanout | None, renudge: timedelta
    ) -> None:
        self.renudge = renudge
        self.db = db
        self.bus = bus
        self.states = states
        self.fanout = fanout
        # SEND node ids per run id (GetExecution finds an execution's sends by their keys).
        self._send_nodes: dict[str, tuple[str, ...]] = {}

    async def StartRun(self, request: pb.StartRunRequest, context: Any) -> pb.StartRunResponse:
        ws = require(request.workspace_id, "workspace_id")
        require(request.campaign_id, "campaign_id")
        require(request.run_id, "run_id")
        errors = flows.validate(request.flow)
        if errors:
            raise InvalidArgument("flow is not valid", violations=[repo_violation(e) for e in errors])
        if not request.segment_id and not request.contact_ids and not request.open_ended:
            raise InvalidArgument.of("segment_id", "a run needs a segment, recipients, or to be open-ended")
        created = await self.db.run(
            repo.create_run,
            run_id=request.run_id,
            workspace_id=ws,
            campaign_id=request.campaign_id,
            flow_version=request.flow_version,
            flow=request.flow.SerializeToString(),
            segment_id=request.segment_id,
            recipients=list(request.contact_ids),
            data=json_format.MessageToDict(request.data),
            open_ended=request.open_ended,
        )
        if self.fanout is not None:
            self.fanout.start(request.run_id)
        return pb.StartRunResponse(run_id=request.run_id, created=created)

    async def EnterContacts(self, request: pb.EnterContactsRequest, context: Any) -> pb.EnterContactsResponse:
        ws = require(request.workspace_id, "workspace_id")
        require(request.run_id, "run_id")
        run = await self.db.run(lambda s: repo.get_run(s, run_id=request.run_id, workspace_id=ws))
        if run is None:
            raise NotFound(f"run {request.run_id} not found")
        if self.fanout is None:
            raise InvalidArgument.of("run_id", "this process does not run workers")
        entered = await self.fanout.enter(run, list(request.contact_ids), allow_reentry=request.allow_reentry)
        return pb.EnterContactsResponse(entered=entered)

    async def GetRunCounts(self, request: pb.GetRunCountsRequest, context: Any) -> pb.GetRunCountsResponse:
        ws = require(request.workspace_id, "workspace_id")
        rows = await self.db.run(lambda s: repo.counters_of(s, [request.run_id]))
        if not rows or rows[0].workspace_id != ws:
            raise NotFound(f"run {request.run_id} not found")
        c = rows[0]
        return pb.GetRunCountsResponse(
            counts=common.ExecutionCounts(
                pending=c.pending,
                processing=c.processing,
                completed=c.completed,
                failed=c.failed,
                skipped=c.skipped,
            ),
            sent=c.sent,
            fanout_done=bool(c.fanout_done),
        )

    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Any
    ) -> pb.ListExecutionsResponse:
        ws = require(request.workspace_id, "workspace_id")
        if not request.run_id and not request.campaign_id:
            raise InvalidArgument.of("run_id", "run_id or campaign_id is required")
        size = min(request.page.page_size or 100, MAX_PAGE)
        after = request.page.page_token
        E = repo.E

        def work(session: Any) -> list[Any]:
            q = select(E).where(E.c.workspace_id == ws)
            if request.run_id:
                q = q.where(E.c.run_id == request.run_id)
            if request.campaign_id:
                q = q.where(E.c.campaign_id == request.campaign_id)
            if request.state:
                q = q.where(E.c.state == request.state)
            if request.node_id:
                q = q.where(E.c.node_id == request.node_id)
            if after:
                q = q.where(E.c.id > after)
            # One row more than the page: a next page token only when there is a next page.
            return list(session.execute(q.order_by(E.c.id).limit(size + 1)).all())

        rows = await self.db.run(work)
        token = rows[size - 1].id if len(rows) > size else ""
        rows = rows[:size]
        return pb.ListExecutionsResponse(
            executions=[execution_pb(r) for r in rows], page={"next_page_token": token}
        )

    async def GetExecution(self, request: pb.GetExecutionRequest, context: Any) -> pb.GetExecutionResponse:
        ws = require(request.workspace_id, "workspace_id")
        E = repo.E

        def work(session: Any) -> tuple[Any, list[Any], tuple[str, ...] | None]:
            # On the connection: Core reads need none of the ORM session's bookkeeping, and the
            # gateway asks this once per execution that gets a receipt.
            conn = session.connection()
            row = conn.execute(
                select(E).where(E.c.id == request.execution_id, E.c.workspace_id == ws)
            ).first()
            if row is None:
                return None, [], None
            nodes = self._send_nodes.get(row.run_id)
            fresh = None
            if nodes is None:
                run = conn.execute(select(repo.R.c.flow).where(repo.R.c.id == row.run_id)).first()
                nodes = fresh = _send_nodes(run.flow) if run is not None else ()
            return row, repo.sends_of(conn, execution_id=row.id, send_nodes=nodes), fresh

        row, sends, fresh = await self.db.run(work)
        if row is None:
            raise NotFound(f"execution {request.execution_id} not found")
        if fresh is not None:
            # A run's flow never changes; the cache is written here, in the event loop only.
            if len(self._send_nodes) >= SEND_NODES_CACHE:
                self._send_nodes.pop(next(iter(self._send_nodes)))
            self._send_nodes[row.run_id] = fresh
        return pb.GetExecutionResponse(execution=execution_pb(row), sends=[send_pb(s) for s in sends])

    async def RequeuePending(
        self, request: pb.RequeuePendingRequest, context: Any
    ) -> pb.RequeuePendingResponse:
        require(request.workspace_id, "workspace_id")
        require(request.campaign_id, "campaign_id")
        # The campaign service moved the campaign to RUNNING before asking.
        count = await timers.nudge(
            db=self.db, bus=self.bus, campaign_ids=[request.campaign_id], resume=True, renudge=self.renudge
        )
        return pb.RequeuePendingResponse(requeued=count)

    async def ListSends(self, request: pb.ListSendsRequest, context: Any) -> pb.ListSendsResponse:
        ws = require(request.workspace_id, "workspace_id")
        require(request.run_id, "run_id")
        size = min(request.page.page_size or 100, MAX_PAGE)
        S = repo.S

        def work(session: Any) -> list[Any]:
            q = select(S).where(S.c.workspace_id == ws, S.c.run_id == request.run_id)
            if request.page.page_token:
                q = q.where(S.c.key > request.page.page_token)
            return list(session.execute(q.order_by(S.c.key).limit(size)).all())

        rows = await self.db.run(work)
        token = rows[-1].key if len(rows) == size else ""
        return pb.ListSendsResponse(sends=[send_pb(r) for r in rows], page={"next_page_token": token})

    async def GetRunFunnel(self, request: pb.GetRunFunnelRequest, context: Any) -> pb.GetRunFunnelResponse:
        ws = require(request.workspace_id, "workspace_id")
        require(request.run_id, "run_id")

        def work(session: Any) -> tuple[Any, list[Any], list[Any]]:
            run = repo.get_run(session, run_id=request.run_id, workspace_id=ws)
            if run is None:
                return None, [], []
            return run, *repo.run_funnel(session, run_id=request.run_id)

        run, rows, sends = await self.db.run(work)
        if run is None:
            raise NotFound(f"run {request.run_id} not found")
        return pb.GetRunFunnelResponse(
            rows=[
                pb.FunnelRow(
                    node_id=r.node_id, state=r.state, reason=r.reason, ab_variant=r.ab_variant, count=r.count
                )
                for r in rows
            ],
            sends=[pb.SendCount(node_id=s.node_id, status=s.status, count=s.count) for s in sends],
            campaign_id=run.campaign_id,
            flow_version=run.flow_version,
            flow=cpb.Flow.FromString(run.flow),
        )


def repo_violation(error: flows.FlowError) -> FieldViolation:
    return FieldViolation(f"flow.{error.path}", f"{error.rule}: {error.message}")
