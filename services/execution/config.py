"""Execution settings (SHOAL_EXECUTION_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings


class ExecutionSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_EXECUTION_", extra="ignore", frozen=True)

    port: int = Field(default=50055, ge=0, le=65535)
    # Run the step workers, the timer loop and fan-outs in this process (an API-only replica sets False).
    workers: bool = True
    batch_size: int = Field(default=500, ge=1, le=5000)
    # Batches in flight per process: while one waits on billing or the provider, another works.
    worker_concurrency: int = Field(default=4, ge=1, le=64)
    fetch_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    # A worker that dies mid-node leaves its executions `processing`; after the lease they return.
    lease_seconds: float = Field(default=60.0, ge=1, le=3600)
    timer_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    # A pending execution not picked up this long after its last nudge is nudged again (a lost
    # step message heals itself). Duplicate nudges are harmless: one claim wins.
    renudge_seconds: float = Field(default=300.0, ge=1, le=86400)
    max_deliver: int = Field(default=20, ge=2, le=1000)
    fanout_page_size: int = Field(default=1000, ge=1, le=10000)
    provider_concurrency: int = Field(default=8, ge=1, le=256)
    provider_batch_size: int = Field(default=250, ge=1, le=5000)
    # Backoff for a transient provider error before the send is tried again.
    retry_backoff_seconds: float = Field(default=5.0, ge=0, le=3600)
    # Circuit breaker per provider (see breaker.py).
    breaker_window_seconds: float = Field(default=30.0, gt=0, le=3600)
    breaker_min_calls: int = Field(default=10, ge=1, le=100_000)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_consecutive_failures: int = Field(default=5, ge=1, le=10_000)
    breaker_open_seconds: float = Field(default=10.0, gt=0, le=3600)
