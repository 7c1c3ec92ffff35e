"""Billing settings (SHOAL_BILLING_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings


class BillingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_BILLING_", extra="ignore", frozen=True)

    port: int = Field(default=50053, ge=0, le=65535)
    # EUR 5,000 unless raised per account.
    default_max_balance_cents: int = Field(default=500_000, gt=0)
    min_top_up_cents: int = Field(default=1_000, gt=0)
    default_low_balance_threshold_cents: int = Field(default=1_000, ge=0)
