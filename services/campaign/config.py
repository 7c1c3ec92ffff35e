"""Campaign settings (SHOAL_CAMPAIGN_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings


class CampaignSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_CAMPAIGN_", extra="ignore", frozen=True)

    port: int = Field(default=50054, ge=0, le=65535)
    scheduler_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # A scheduled campaign found due later than this (the service was down) is marked missed
    # instead of starting hours late.
    schedule_grace_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400)
    trigger_idempotency_hours: float = Field(default=24.0, gt=0, le=24 * 30)
