"""Settings of the sandbox carrier simulator (SHOAL_SANDBOX_*), validated at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from shoal.config import SharedSettings


class SandboxSettings(SharedSettings):
    """Where the simulator listens, what it stores, and how the simulated carrier behaves.

    The behaviour switches (latency, failure rate, outage, rates) are only the start values:
    tests and operators change them at run time through `PUT /v1/control`.
    """

    model_config = SettingsConfigDict(env_prefix="SHOAL_SANDBOX_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=0, le=65535, description="0 picks a free port")
    port_file: Path | None = Field(
        default=None, description="When set, the bound port is written there once the socket listens"
    )
    database_path: Path | None = Field(
        default=None, description="SQLite file; empty means data_dir/sandbox.db"
    )
    max_batch_size: int = Field(default=5000, ge=1, le=100_000)

    latency_ms: int = Field(default=0, ge=0, le=60_000, description="Added to every send and lookup")
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of items failed as retryable")
    failure_seed: int | None = Field(
        default=None, description="Seed for the failure dice (reproducible runs)"
    )
    outage: bool = Field(default=False, description="Answer 503 to every send and lookup")
    refuse_credentials: bool = Field(
        default=False, description="Answer 401 to every send, as a carrier does to revoked credentials"
    )
    rcs_capable_rate: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Share of addresses with an RCS device"
    )

    receipts_enabled: bool = True
    callback_url: str = Field(default="", pattern=r"^(https?://\S+)?$", description="Receipts go here")
    callback_secret: SecretStr = Field(default=SecretStr(""), validate_default=True)
    open_rate: float = Field(default=0.3, ge=0.0, le=1.0, description="Share of delivered EMAIL/RCS opened")
    click_rate: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Share of opened (SMS: delivered) clicked"
    )
    receipt_batch_size: int = Field(default=500, ge=1, le=10_000)
    receipt_flush_ms: int = Field(default=100, ge=1, le=60_000)
    receipt_queue_max: int = Field(default=200_000, ge=1)
    receipt_attempts: int = Field(default=4, ge=1, le=20)

    @field_validator("callback_secret")
    @classmethod
    def _secret_required_with_callback(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Unsigned receipts would teach the receiving side to accept anything; refuse at start.
        if info.data.get("callback_url") and not value.get_secret_value():
            raise ValueError("required when SHOAL_SANDBOX_CALLBACK_URL is set")
        return value

    def resolved_database_path(self) -> Path:
        return self.database_path or self.data_dir / "sandbox.db"
