"""Clients of the services the execution engine calls, one channel each, created once."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from shoal.config import SharedSettings
from shoal.grpc import channel
from shoal.v1 import billing_pb2_grpc, segment_pb2_grpc, template_pb2_grpc


@dataclass
class Peers:
    segment: segment_pb2_grpc.SegmentServiceStub
    template: template_pb2_grpc.TemplateServiceStub
    billing: billing_pb2_grpc.BillingServiceStub
    channels: list[grpc.aio.Channel]

    @classmethod
    def connect(cls, settings: SharedSettings) -> Peers:
        deadline = settings.grpc_deadline_seconds
        seg = channel(
            settings.segment_addr,
            deadline=deadline,
            service="shoal.v1.SegmentService",
            idempotent_methods=[
                "CheckEligibility",
                "GetCapabilities",
                "QueryEvents",
                "StreamMembers",
                "GetContact",
                "AddTag",
                "RemoveTag",
            ],
        )
        tpl = channel(
            settings.template_addr,
            deadline=deadline,
            service="shoal.v1.TemplateService",
            idempotent_methods=["RenderBatch", "GetTemplate", "ValidateForLaunch"],
        )
        bil = channel(
            settings.billing_addr,
            deadline=deadline,
            service="shoal.v1.BillingService",
            # Holds, captures and releases are idempotent by key, so they are safe to retry.
            idempotent_methods=["HoldBatch", "CaptureBatch", "ReleaseBatch", "GetBalance", "EstimateCost"],
        )
        return cls(
            segment=segment_pb2_grpc.SegmentServiceStub(seg),
            template=template_pb2_grpc.TemplateServiceStub(tpl),
            billing=billing_pb2_grpc.BillingServiceStub(bil),
            channels=[seg, tpl, bil],
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
