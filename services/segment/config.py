"""Segment settings (SHOAL_SEGMENT_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings


class SegmentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_SEGMENT_", extra="ignore", frozen=True)

    port: int = Field(default=50051, ge=0, le=65535)
    # How long an RCS capability answer is trusted before the provider is asked again.
    capability_ttl_seconds: int = Field(default=4 * 3600, gt=0)
    capability_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Publish contact events on NATS; off runs the service without a bus (tests, tooling).
    publish_events: bool = True
    # Record provider receipts (shoal.events.message.>) as contact events; needs the bus.
    consume_receipts: bool = True
