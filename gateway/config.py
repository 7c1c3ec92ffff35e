"""Gateway settings (SHOAL_GATEWAY_*), validated at start-up.

Shared settings (SHOAL_CAMPAIGN_ADDR, SHOAL_NATS_URL, SHOAL_NAMESPACE, ...) are read under their
shared names as well, through SharedSettings' own source order.

Provider callback secrets: `SHOAL_GATEWAY_PROVIDER_SECRET_<PROVIDER>` (one per provider, e.g.
`SHOAL_GATEWAY_PROVIDER_SECRET_HTTP`), and `SHOAL_GATEWAY_SANDBOX_CALLBACK_SECRET` for the
sandbox carrier. A provider without a secret has no callback endpoint (404): an unsigned
callback is never accepted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Self

from limits import parse_many
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shoal.config import SharedSettings

PROVIDER_SECRET_PREFIX = "SHOAL_GATEWAY_PROVIDER_SECRET_"  # noqa: S105  # a variable name, not a secret
PROVIDER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class GatewaySettings(SharedSettings):
    """Where the REST gateway listens, its key store, limits and callback secrets."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_GATEWAY_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    readiness_timeout_seconds: float = Field(
        default=1.0, gt=0, le=30, description="How long /readyz waits for each backend's health answer"
    )
    database_url: str = Field(
        default="", description="API keys store (SQLAlchemy URL); empty means SQLite data_dir/gateway.db"
    )
    rate_limit: str = Field(
        default="100/second;3000/minute",
        description="Requests allowed per API key (moving window), `limits` notation, `;` separated",
    )
    sandbox_callback_secret: SecretStr = Field(
        default=SecretStr(""), description="HMAC secret of the sandbox carrier's receipt callbacks"
    )
    provider_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Per-provider callback secrets (from SHOAL_GATEWAY_PROVIDER_SECRET_*)",
    )
    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1024, description="Largest request body of the API routes (413 above)"
    )
    callback_max_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest provider callback body accepted (413 above)"
    )
    callback_max_receipts: int = Field(default=10_000, ge=1, le=100_000)
    callback_lookup_concurrency: int = Field(default=16, ge=1, le=256)
    bus_connect_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="How long a callback waits for NATS before answering 503"
    )

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError("must be `limits` notation, e.g. `100/second;3000/minute`") from None
        return value

    @field_validator("provider_secrets")
    @classmethod
    def _provider_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not PROVIDER_RE.match(name):
                raise ValueError(f"provider name {name!r} must be lowercase letters, digits, '_' or '-'")
            if len(secret.get_secret_value()) < 16:
                raise ValueError(f"secret of provider {name!r} must be at least 16 characters")
        return value

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        if "provider_secrets" not in overrides:
            found = provider_secrets_from(os.environ)
            if found:
                overrides["provider_secrets"] = found
        return super().load(**overrides)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    def callback_secret(self, provider: str) -> bytes | None:
        """The HMAC secret of `provider`'s callbacks, or None when it has no callback endpoint."""
        secret = self.provider_secrets.get(provider)
        if secret is None and provider == "sandbox":
            secret = self.sandbox_callback_secret
        value = secret.get_secret_value() if secret is not None else ""
        return value.encode() if value else None


def provider_secrets_from(environ: Mapping[str, str]) -> dict[str, SecretStr]:
    return {
        key.removeprefix(PROVIDER_SECRET_PREFIX).lower(): SecretStr(value)
        for key, value in environ.items()
        if key.startswith(PROVIDER_SECRET_PREFIX) and value
    }
