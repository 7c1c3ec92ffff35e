"""Billing settings (SHOAL_BILLING_*)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings


class BillingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_BILLING_", extra="ignore", frozen=True)

    port: int = Field(default=50053, ge=0, le=65535)
    # EUR 5,000 unless raised per account (SetBalanceLimit).
    default_max_balance_cents: int = Field(default=500_000, gt=0)
    min_top_up_cents: int = Field(default=1_000, gt=0)
    # Per account with SetLowBalanceThreshold; 0 turns billing.balance_low off.
    default_low_balance_threshold_cents: int = Field(default=1_000, ge=0)
    # Auto-reload: reloads per account per UTC day, and the one retry of a failed payment.
    auto_reload_daily_cap: int = Field(default=3, ge=0)
    auto_reload_retry_after_seconds: float = Field(default=86_400.0, gt=0)
    # How often the background loop looks for due retries, interrupted attempts and unsent events.
    background_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    # The sandbox payment gateway's behaviour at start (switchable at run time).
    payment_mode: Literal["succeed", "fail", "slow"] = "succeed"
    payment_slow_seconds: float = Field(default=5.0, ge=0)
    # A payment call slower than this counts as failed (and is retried once, with the same key).
    payment_timeout_seconds: float = Field(default=30.0, gt=0)
    # Tests only: sleep after the HoldBatch commit, before replying, so a test can kill the
    # process between the two. Never set it in production.
    debug_reply_delay_seconds: float = Field(default=0.0, ge=0, le=600)
