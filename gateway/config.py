"""Gateway settings (SHOAL_GATEWAY_*), validated at start-up.

Shared settings (SHOAL_CAMPAIGN_ADDR, SHOAL_WORKSPACE_ID, ...) are read under their shared names
as well, through SharedSettings' own source order.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import SharedSettings


class GatewaySettings(SharedSettings):
    """Where the REST gateway listens; peer addresses and the rest come from SharedSettings."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_GATEWAY_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    readiness_timeout_seconds: float = Field(
        default=1.0, gt=0, le=30, description="How long /readyz waits for each backend's health answer"
    )
