"""Execution settings (SHOAL_EXECUTION_*)."""

from __future__ import annotations

from email.utils import parseaddr

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.execution.providers.base import Channel
from services.execution.providers.registry import check_default, configured
from shoal.config import ServiceSettings


class ExecutionSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_EXECUTION_", extra="ignore", frozen=True)

    port: int = Field(default=50055, ge=0, le=65535)
    # Run the step workers, the timer loop and fan-outs in this process (an API-only replica sets False).
    workers: bool = True
    # Step messages per batch. Every batch costs one claim, one commit, one call to each peer and
    # one progress event whatever its size: 1000 cost ~20 % less CPU per contact than 500 in
    # bench/engine.py (all processes together), with 4 batches in flight per process.
    batch_size: int = Field(default=1000, ge=1, le=5000)
    # Batches in flight per process: while one waits on billing or the provider, another works.
    worker_concurrency: int = Field(default=4, ge=1, le=64)
    # Processes running step workers, all on the one durable consumer: this process (API, timers,
    # fan-outs, receipts and workers) starts `processes - 1` more that only run step workers
    # (`python -m services.execution --worker`), restarts one that dies, and stops them with
    # itself. One Python process works on one core at a time; more processes use more cores.
    processes: int = Field(default=1, ge=1, le=32)
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
    provider_batch_size: int = Field(default=500, ge=1, le=5000)
    # Recipients per RenderBatch call (a batch's calls run concurrently): bounds one answer's size
    # under the 64 MiB gRPC message limit even for large emails.
    render_batch_size: int = Field(default=500, ge=1, le=5000)
    # Backoff for a transient provider error before the send is tried again.
    retry_backoff_seconds: float = Field(default=5.0, ge=0, le=3600)
    # Circuit breaker per provider (see breaker.py).
    breaker_window_seconds: float = Field(default=30.0, gt=0, le=3600)
    breaker_min_calls: int = Field(default=10, ge=1, le=100_000)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_consecutive_failures: int = Field(default=5, ge=1, le=10_000)
    breaker_open_seconds: float = Field(default=10.0, gt=0, le=3600)

    # -- providers (see providers/registry.py) ---------------------------------------------------
    # SMTP: configured when the host is set. STARTTLS is required by default (credentials and
    # content must not cross the network in clear); `smtp_tls` is implicit TLS (port 465) instead.
    smtp_host: str = Field(default="", description="SMTP server; empty means no smtp provider")
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = Field(default=True, description="Require STARTTLS (ignored with smtp_tls)")
    smtp_tls: bool = Field(default=False, description="Implicit TLS from the first byte (port 465)")
    smtp_from: str = Field(
        default="",
        validate_default=True,
        description="From header and envelope sender, `addr@domain` or `Name <addr@domain>`",
    )
    smtp_timeout: float = Field(default=10.0, gt=0, le=300, description="Per SMTP command, seconds")
    # Connections kept open to the server; a batch's messages go out over them in parallel
    # (aiosmtplib does not pipeline commands within one connection).
    smtp_pool_size: int = Field(default=4, ge=1, le=64)
    # HTTP carrier for SMS and RCS: configured when the URL is set.
    http_provider_url: str = Field(default="", description="Carrier API base; empty means no http provider")
    http_provider_token: SecretStr = SecretStr("")
    http_provider_timeout: float = Field(default=5.0, gt=0, le=120)
    # Which provider a channel uses when a SEND node names none (checked against the above).
    email_provider: str = Field(default="sandbox", validate_default=True)
    sms_provider: str = Field(default="sandbox", validate_default=True)
    rcs_provider: str = Field(default="sandbox", validate_default=True)

    @field_validator("smtp_from")
    @classmethod
    def _from_required_with_smtp(cls, value: str, info: ValidationInfo) -> str:
        if not info.data.get("smtp_host"):
            return value
        if not value:
            raise ValueError("required when SHOAL_EXECUTION_SMTP_HOST is set")
        if "@" not in parseaddr(value)[1]:
            raise ValueError("must be an address, `addr@domain` or `Name <addr@domain>`")
        return value

    @field_validator("email_provider", "sms_provider", "rcs_provider")
    @classmethod
    def _default_provider_configured(cls, value: str, info: ValidationInfo) -> str:
        channel = Channel(str(info.field_name).removesuffix("_provider").upper())
        available = configured(
            smtp_host=info.data.get("smtp_host", ""), http_provider_url=info.data.get("http_provider_url", "")
        )
        return check_default(channel, value, available)
