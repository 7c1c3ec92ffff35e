"""TemplateService over gRPC: proto in, catalog/render calls, proto out."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from services.template import render
from services.template.catalog import Catalog, LaunchCheck
from services.template.repo import TemplateRecord, VersionRecord
from shoal.errors import InvalidArgument
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb
from shoal.v1 import template_pb2_grpc

# Below this many recipients a thread hop costs more than the rendering it would move.
INLINE_RENDER_MAX = 500


def require(value: str, field_name: str) -> str:
    if not value:
        raise InvalidArgument.of(field_name, "is required")
    return value


def timestamp(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def version_pb(v: VersionRecord) -> pb.TemplateVersion:
    return pb.TemplateVersion(
        template_id=v.template_id,
        version=v.version,
        state=v.state,  # type: ignore[arg-type]  # stored as the enum's int
        content=v.content,
        variables=v.variables,
        rejection_reason=v.rejection_reason,
        create_time=timestamp(v.created_at),
        publish_time=timestamp(v.published_at),
    )


def template_pb(t: TemplateRecord, current: VersionRecord) -> pb.Template:
    return pb.Template(
        id=t.id,
        workspace_id=t.workspace_id,
        name=t.name,
        channel=t.channel,  # type: ignore[arg-type]
        message_type=t.message_type,  # type: ignore[arg-type]
        latest_version=t.latest_version,
        published_version=t.published_version,
        current=version_pb(current),
        create_time=timestamp(t.created_at),
        update_time=timestamp(t.updated_at),
    )


class TemplateServicer(template_pb2_grpc.TemplateServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, *, catalog: Catalog, max_batch_size: int) -> None:
        self.catalog = catalog
        self.max_batch_size = max_batch_size

    async def CreateTemplate(
        self, request: pb.CreateTemplateRequest, context: Any
    ) -> pb.CreateTemplateResponse:
        ws = require(request.workspace_id, "workspace_id")
        template, version = await self.catalog.create(
            workspace_id=ws,
            name=request.name,
            channel=request.channel,
            message_type=request.message_type,
            content=request.content,
            variables=list(request.variables),
        )
        return pb.CreateTemplateResponse(template=template_pb(template, version))

    async def GetTemplate(self, request: pb.GetTemplateRequest, context: Any) -> pb.GetTemplateResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template_id, "template_id")
        template, version = await self.catalog.get(workspace_id=ws, template_id=tid)
        return pb.GetTemplateResponse(template=template_pb(template, version))

    async def ListTemplates(self, request: pb.ListTemplatesRequest, context: Any) -> pb.ListTemplatesResponse:
        ws = require(request.workspace_id, "workspace_id")
        page, token = await self.catalog.list_page(
            workspace_id=ws,
            channel=request.channel,
            message_type=request.message_type,
            state=request.state,
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        return pb.ListTemplatesResponse(
            templates=[template_pb(t, v) for t, v in page], page={"next_page_token": token}
        )

    async def UpdateTemplate(
        self, request: pb.UpdateTemplateRequest, context: Any
    ) -> pb.UpdateTemplateResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template_id, "template_id")
        template, version = await self.catalog.update(
            workspace_id=ws,
            template_id=tid,
            name=request.name,
            content=request.content if request.HasField("content") else None,
            variables=list(request.variables),
        )
        return pb.UpdateTemplateResponse(template=template_pb(template, version))

    async def ListVersions(self, request: pb.ListVersionsRequest, context: Any) -> pb.ListVersionsResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template_id, "template_id")
        versions = await self.catalog.versions(workspace_id=ws, template_id=tid)
        return pb.ListVersionsResponse(versions=[version_pb(v) for v in versions])

    async def PublishTemplate(
        self, request: pb.PublishTemplateRequest, context: Any
    ) -> pb.PublishTemplateResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template_id, "template_id")
        if request.version < 0:
            raise InvalidArgument.of("version", "must not be negative")
        version = await self.catalog.publish(workspace_id=ws, template_id=tid, version=request.version)
        return pb.PublishTemplateResponse(version=version_pb(version))

    async def RejectTemplate(
        self, request: pb.RejectTemplateRequest, context: Any
    ) -> pb.RejectTemplateResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template_id, "template_id")
        if request.version < 0:
            raise InvalidArgument.of("version", "must not be negative")
        version = await self.catalog.reject(
            workspace_id=ws, template_id=tid, version=request.version, reason=request.reason
        )
        return pb.RejectTemplateResponse(version=version_pb(version))

    async def Preview(self, request: pb.PreviewRequest, context: Any) -> pb.PreviewResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template.template_id, "template.template_id")
        if request.template.version < 0:
            raise InvalidArgument.of("template.version", "must not be negative")
        item = await self.catalog.renderable(
            workspace_id=ws, template_id=tid, version=request.template.version, published_only=False
        )
        return pb.PreviewResponse(message=render.render(item.compiled, request.context, sample=True))

    async def RenderBatch(self, request: pb.RenderBatchRequest, context: Any) -> pb.RenderBatchResponse:
        ws = require(request.workspace_id, "workspace_id")
        tid = require(request.template.template_id, "template.template_id")
        if request.template.version < 0:
            raise InvalidArgument.of("template.version", "must not be negative")
        if len(request.contexts) > self.max_batch_size:
            raise InvalidArgument.of("contexts", f"more than {self.max_batch_size} recipients in one call")
        item = await self.catalog.renderable(
            workspace_id=ws, template_id=tid, version=request.template.version
        )
        compiled = item.compiled
        contexts = request.contexts
        if request.as_sms and compiled.channel != common.CHANNEL_RCS:
            raise InvalidArgument.of("as_sms", "an SMS fallback is rendered from an RCS template only")

        def render_all() -> list[pb.RenderedMessage]:
            out = [render.render(compiled, ctx) for ctx in contexts]
            return [render.flatten_to_sms(m) for m in out] if request.as_sms else out

        if len(contexts) < INLINE_RENDER_MAX:
            messages = render_all()
        else:
            # A large batch is ~0.1 s of CPU: in a thread, the GIL's switch interval still lets
            # the event loop answer health checks and small calls meanwhile.
            messages = await asyncio.to_thread(render_all)
        return pb.RenderBatchResponse(
            version=item.version,
            channel=compiled.channel,  # type: ignore[arg-type]
            message_type=compiled.message_type,  # type: ignore[arg-type]
            messages=messages,
        )

    async def ValidateForLaunch(
        self, request: pb.ValidateForLaunchRequest, context: Any
    ) -> pb.ValidateForLaunchResponse:
        ws = require(request.workspace_id, "workspace_id")
        checks = [
            LaunchCheck(
                node_id=c.node_id,
                template_id=c.template.template_id,
                version=c.template.version,
                channel=c.channel,
                message_type=c.message_type,
            )
            for c in request.checks
        ]
        result = await self.catalog.validate_for_launch(workspace_id=ws, launch_checks=checks)
        return pb.ValidateForLaunchResponse(
            ok=not result.problems,
            problems=[pb.LaunchProblem(node_id=node, reason=reason) for node, reason in result.problems],
            resolved_versions=result.resolved,
        )
