"""Wiring of the template service: database, provider approval, catalog, gRPC server.

The template service needs no NATS: it owns no work queue and reacts to no event.
"""

from __future__ import annotations

from pathlib import Path

from services.template.approval import ProviderApproval, from_setting
from services.template.catalog import Catalog
from services.template.config import TemplateSettings
from services.template.servicer import TemplateServicer
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import template_pb2, template_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: TemplateSettings, *, approval: ProviderApproval | None = None) -> GrpcServer:
    """The server, not yet started; `approval` overrides the one SHOAL_TEMPLATE_RCS_APPROVAL picks."""
    db = Database(settings.resolved_database_url("template"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    catalog = Catalog(
        db=db,
        approval=approval or from_setting(settings.rcs_approval),
        unsubscribe_url=settings.unsubscribe_url,
        cache_size=settings.render_cache_size,
    )
    servicer = TemplateServicer(catalog=catalog, max_batch_size=settings.max_batch_size)
    server = GrpcServer(
        "template",
        [
            ServiceBinding(
                template_pb2_grpc.add_TemplateServiceServicer_to_server,
                servicer,
                template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
            )
        ],
        host=settings.host,
        port=settings.port,
    )
    server.closers.append(db.close)
    return server
