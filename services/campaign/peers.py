"""Clients of the services the campaign service calls."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from shoal.config import SharedSettings
from shoal.grpc import channel
from shoal.v1 import billing_pb2_grpc, execution_pb2_grpc, segment_pb2_grpc, template_pb2_grpc


@dataclass
class Peers:
    segment: segment_pb2_grpc.SegmentServiceStub
    template: template_pb2_grpc.TemplateServiceStub
    billing: billing_pb2_grpc.BillingServiceStub
    execution: execution_pb2_grpc.ExecutionServiceStub
    channels: list[grpc.aio.Channel]

    @classmethod
    def connect(cls, settings: SharedSettings) -> Peers:
        d = settings.grpc_deadline_seconds
        seg = channel(
            settings.segment_addr,
            deadline=d,
            service="shoal.v1.SegmentService",
            idempotent_methods=["EstimateAudience", "GetSegment"],
        )
        tpl = channel(
            settings.template_addr,
            deadline=d,
            service="shoal.v1.TemplateService",
            idempotent_methods=["ValidateForLaunch"],
        )
        bil = channel(
            settings.billing_addr,
            deadline=d,
            service="shoal.v1.BillingService",
            idempotent_methods=["EstimateCost", "GetBalance"],
        )
        exe = channel(
            settings.execution_addr,
            deadline=d,
            service="shoal.v1.ExecutionService",
            # StartRun is idempotent per run id; EnterContacts per (run, contact).
            idempotent_methods=["StartRun", "GetRunCounts", "RequeuePending", "EnterContacts"],
        )
        return cls(
            segment=segment_pb2_grpc.SegmentServiceStub(seg),
            template=template_pb2_grpc.TemplateServiceStub(tpl),
            billing=billing_pb2_grpc.BillingServiceStub(bil),
            execution=execution_pb2_grpc.ExecutionServiceStub(exe),
            channels=[seg, tpl, bil, exe],
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
