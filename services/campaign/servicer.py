"""CampaignService over gRPC: thin, proto <-> lifecycle."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.campaign.lifecycle import RUNS, C, Lifecycle, T
from shoal.errors import InvalidArgument
from shoal.v1 import campaign_pb2 as pb
from shoal.v1 import campaign_pb2_grpc
from shoal.v1 import common_pb2 as common

MAX_PAGE = 200


def require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument.of(name, "is required")
    return value


def actor_of(value: str) -> str:
    return value or "operator"


class CampaignServicer(campaign_pb2_grpc.CampaignServiceServicer):
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lc = lifecycle

    async def CreateCampaign(
        self, request: pb.CreateCampaignRequest, context: Any
    ) -> pb.CreateCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.create(
            workspace_id=ws,
            name=request.name,
            segment_id=request.segment_id,
            trigger=request.trigger,
            flow=request.flow,
        )
        return pb.CreateCampaignResponse(campaign=self.lc.to_pb(row, request.flow))

    async def GetCampaign(self, request: pb.GetCampaignRequest, context: Any) -> pb.GetCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.get(ws, require(request.campaign_id, "campaign_id"))
        return pb.GetCampaignResponse(
            campaign=self.lc.to_pb(row, await self.lc.flow_of(row.id, row.flow_version))
        )

    async def ListCampaigns(self, request: pb.ListCampaignsRequest, context: Any) -> pb.ListCampaignsResponse:
        ws = require(request.workspace_id, "workspace_id")
        size = min(request.page.page_size or 50, MAX_PAGE)

        def work(session: Any) -> list[Any]:
            q = select(C).where(C.c.workspace_id == ws)
            if request.state:
                q = q.where(C.c.state == request.state)
            if request.page.page_token:
                q = q.where(C.c.id > request.page.page_token)
            return list(session.execute(q.order_by(C.c.id).limit(size)).all())

        rows = await self.lc.db.run(work)
        token = rows[-1].id if len(rows) == size else ""
        return pb.ListCampaignsResponse(
            campaigns=[self.lc.to_pb(r) for r in rows], page=common.PageResponse(next_page_token=token)
        )

    async def UpdateCampaign(
        self, request: pb.UpdateCampaignRequest, context: Any
    ) -> pb.UpdateCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.update(
            workspace_id=ws, campaign_id=require(request.campaign_id, "campaign_id"), request=request
        )
        return pb.UpdateCampaignResponse(
            campaign=self.lc.to_pb(row, await self.lc.flow_of(row.id, row.flow_version))
        )

    async def ValidateCampaign(
        self, request: pb.ValidateCampaignRequest, context: Any
    ) -> pb.ValidateCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.get(ws, require(request.campaign_id, "campaign_id"))
        errors = await self.lc.validate(row, await self.lc.flow_of(row.id, row.flow_version))
        return pb.ValidateCampaignResponse(ok=not errors, errors=errors)

    async def EstimateCampaign(
        self, request: pb.EstimateCampaignRequest, context: Any
    ) -> pb.EstimateCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.get(ws, require(request.campaign_id, "campaign_id"))
        est = await self.lc.estimate(row, await self.lc.flow_of(row.id, row.flow_version))
        return pb.EstimateCampaignResponse(
            audience_size=est.audience,
            expected_cost_cents=est.expected_cents,
            upper_bound_cost_cents=est.upper_cents,
            free_balance_cents=est.free_cents,
        )

    async def ScheduleCampaign(
        self, request: pb.ScheduleCampaignRequest, context: Any
    ) -> pb.ScheduleCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.schedule(
            ws, require(request.campaign_id, "campaign_id"), request.schedule, actor="operator"
        )
        return pb.ScheduleCampaignResponse(campaign=self.lc.to_pb(row))

    async def UnscheduleCampaign(
        self, request: pb.UnscheduleCampaignRequest, context: Any
    ) -> pb.UnscheduleCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        _, _, row = await self.lc.move(
            ws,
            require(request.campaign_id, "campaign_id"),
            "unschedule",
            actor="operator",
            reason="unschedule",
            extra=lambda _s, _r: {"due_at": None},
        )
        return pb.UnscheduleCampaignResponse(campaign=self.lc.to_pb(row))

    async def StartCampaign(self, request: pb.StartCampaignRequest, context: Any) -> pb.StartCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        cid = require(request.campaign_id, "campaign_id")
        launch = await self.lc.launch(ws, cid, "start", actor=actor_of(request.actor))
        row = await self.lc.get(ws, cid)
        return pb.StartCampaignResponse(campaign=self.lc.to_pb(row), run_id=launch.run_id)

    async def TriggerCampaign(
        self, request: pb.TriggerCampaignRequest, context: Any
    ) -> pb.TriggerCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        cid = require(request.campaign_id, "campaign_id")
        launch = await self.lc.launch(
            ws,
            cid,
            "trigger",
            actor=actor_of(request.actor),
            idempotency_key=request.idempotency_key,
            recipients=list(dict.fromkeys(request.recipients)),
            data=request.data,
        )
        row = await self.lc.get(ws, cid)
        return pb.TriggerCampaignResponse(run_id=launch.run_id, state=row.state, replayed=launch.replayed)

    async def PauseCampaign(self, request: pb.PauseCampaignRequest, context: Any) -> pb.PauseCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        state = await self.lc.pause(
            ws,
            require(request.campaign_id, "campaign_id"),
            actor=actor_of(request.actor),
            reason=request.reason,
        )
        return pb.PauseCampaignResponse(state=state)

    async def ResumeCampaign(
        self, request: pb.ResumeCampaignRequest, context: Any
    ) -> pb.ResumeCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        state, requeued = await self.lc.resume(
            ws, require(request.campaign_id, "campaign_id"), actor=actor_of(request.actor)
        )
        return pb.ResumeCampaignResponse(state=state, requeued=requeued)

    async def ArchiveCampaign(
        self, request: pb.ArchiveCampaignRequest, context: Any
    ) -> pb.ArchiveCampaignResponse:
        ws = require(request.workspace_id, "workspace_id")
        _, _, row = await self.lc.move(
            ws, require(request.campaign_id, "campaign_id"), "archive", actor="operator", reason="archive"
        )
        return pb.ArchiveCampaignResponse(campaign=self.lc.to_pb(row))

    async def GetCampaignStatus(
        self, request: pb.GetCampaignStatusRequest, context: Any
    ) -> pb.GetCampaignStatusResponse:
        ws = require(request.workspace_id, "workspace_id")
        row = await self.lc.get(ws, require(request.campaign_id, "campaign_id"))
        progress = await self.lc.progress(row)
        return pb.GetCampaignStatusResponse(
            id=row.id,
            state=row.state,
            run_id=row.current_run_id,
            counts=progress.counts,
            sent=progress.sent,
            estimated_remaining_cost_cents=progress.remaining_cents,
        )

    async def ListRuns(self, request: pb.ListRunsRequest, context: Any) -> pb.ListRunsResponse:
        ws = require(request.workspace_id, "workspace_id")
        cid = require(request.campaign_id, "campaign_id")
        await self.lc.get(ws, cid)
        rows = await self.lc.db.run(
            lambda s: s.execute(
                select(RUNS).where(RUNS.c.campaign_id == cid).order_by(RUNS.c.started_at.desc())
            ).all()
        )
        runs = []
        for r in rows:
            run = pb.Run(
                id=r.id,
                campaign_id=r.campaign_id,
                flow_version=r.flow_version,
                state=r.state,
                idempotency_key=r.idempotency_key,
            )
            run.start_time.FromDatetime(r.started_at)
            if r.ended_at is not None:
                run.end_time.FromDatetime(r.ended_at)
            runs.append(run)
        return pb.ListRunsResponse(runs=runs)

    async def ListTransitions(
        self, request: pb.ListTransitionsRequest, context: Any
    ) -> pb.ListTransitionsResponse:
        ws = require(request.workspace_id, "workspace_id")
        cid = require(request.campaign_id, "campaign_id")
        await self.lc.get(ws, cid)
        rows = await self.lc.db.run(
            lambda s: s.execute(
                select(T).where(T.c.campaign_id == cid, T.c.workspace_id == ws).order_by(T.c.id)
            ).all()
        )
        out = []
        for r in rows:
            t = pb.Transition(
                from_state=r.from_state, to_state=r.to_state, actor=r.actor, reason=r.reason, run_id=r.run_id
            )
            t.time.FromDatetime(r.created_at)
            out.append(t)
        return pb.ListTransitionsResponse(transitions=out)
