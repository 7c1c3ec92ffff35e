"""Gateway settings (SHOAL_GATEWAY_*), validated at start-up.

Shared settings (SHOAL_CAMPAIGN_ADDR, SHOAL_NATS_URL, SHOAL_NAMESPACE, ...) are read under their
shared names as well, through SharedSettings' own source order.

Provider callback secrets: `SHOAL_GATEWAY_PROVIDER_SECRET_<PROVIDER>` (one per provider, e.g.
`SHOAL_GATEWAY_PROVIDER_SECRET_HTTP`), and `SHOAL_GATEWAY_SANDBOX_CALLBACK_SECRET` for the
sandbox carrier. A provider without a secret has no callback endpoint (404): an unsigned
callback is never accepted.

Outgoing webhooks (`gateway.webhooks`): `SHOAL_GATEWAY_WEBHOOK_*`, e.g.
`SHOAL_GATEWAY_WEBHOOK_RETRY_SCHEDULE=0,60,300,3600,86400` (seconds before each attempt).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Self

from limits import parse_many
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from shoal.config import SharedSettings

PROVIDER_SECRET_PREFIX = "SHOAL_GATEWAY_PROVIDER_SECRET_"  # noqa: S105  # a variable name, not a secret
PROVIDER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Set explicitly (argument, SHOAL_NATS_URL or SHOAL_GATEWAY_NATS_URL), it turns the webhook
# consumer on when `webhook_dispatch` is unset: the built-in default is not reason enough.
_NATS_URL_FIELD = "nats_url"


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
    import_max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest POST /v1/contacts/import body (10,000 contacts with consents fit; 413 above)",
    )
    callback_max_receipts: int = Field(default=10_000, ge=1, le=100_000)
    callback_lookup_concurrency: int = Field(default=16, ge=1, le=256)
    bus_connect_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="How long a callback waits for NATS before answering 503"
    )
    # -- outgoing webhooks (gateway.webhooks) --
    webhook_dispatch: bool | None = Field(
        default=None,
        description=(
            "Turn bus events into webhook deliveries (a durable consumer on EVENTS). Unset: on when "
            "a NATS URL is configured (SHOAL_NATS_URL or SHOAL_GATEWAY_NATS_URL), off on the built-in "
            "default; deliveries already stored (tests, replays) are sent either way"
        ),
    )
    webhook_retry_schedule: str = Field(
        default="0,60,300,3600,86400",
        description=(
            "Seconds to wait before each attempt of a delivery, comma separated: the first is counted "
            "from the event, each next one from the previous failed attempt; one entry per attempt"
        ),
    )
    webhook_request_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Whole-request timeout of one webhook POST"
    )
    webhook_max_concurrency: int = Field(
        default=16, ge=1, le=256, description="Webhook POSTs in flight at once, per gateway process"
    )
    webhook_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long a claimed delivery is this process's; must exceed the request timeout",
    )
    webhook_poll_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often the delivery loop looks for due deliveries"
    )
    webhook_allow_http: bool = Field(
        default=False,
        description="Accept plain http:// endpoint URLs for any host (always allowed for localhost)",
    )
    webhook_retention_days: int = Field(
        default=30, ge=1, le=3650, description="Finished deliveries (and their attempts) older than this go"
    )
    webhook_max_endpoints: int = Field(default=20, ge=1, le=1000, description="Endpoints per workspace")
    # -- dashboard (gateway.routers.dashboard) --
    jaeger_url: str = Field(
        default="http://localhost:16686",
        pattern=r"^https?://[^\s]+$",
        description="Jaeger UI base URL: the dashboard links an execution to `<url>/trace/<trace id>`",
    )

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError("must be `limits` notation, e.g. `100/second;3000/minute`") from None
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @field_validator("webhook_lease_seconds")
    @classmethod
    def _lease_covers_a_request(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("webhook_request_timeout_seconds")
        if timeout is not None and value <= timeout:
            raise ValueError(
                f"must be longer than the webhook request timeout ({timeout}s): a lease outlives its POST"
            )
        return value

    @property
    def webhook_delays(self) -> tuple[float, ...]:
        """The retry schedule: seconds before attempt 1, 2, ... (its length is the attempt limit)."""
        return parse_schedule(self.webhook_retry_schedule)

    @property
    def webhook_consume(self) -> bool:
        """Whether this process turns bus events into deliveries (see `webhook_dispatch`)."""
        if self.webhook_dispatch is not None:
            return self.webhook_dispatch
        return _NATS_URL_FIELD in self.model_fields_set

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


def parse_schedule(value: str) -> tuple[float, ...]:
    """`"0,60,300"` -> (0.0, 60.0, 300.0): 1 to 10 non-negative numbers of seconds."""
    try:
        delays = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise ValueError("must be comma separated seconds, e.g. `0,60,300,3600,86400`") from None
    if not 1 <= len(delays) <= 10:
        raise ValueError("must have 1 to 10 entries (one per attempt)")
    if any(not 0 <= d <= 7 * 86400 for d in delays):
        raise ValueError("every delay must be between 0 and 604800 seconds")
    return delays


def provider_secrets_from(environ: Mapping[str, str]) -> dict[str, SecretStr]:
    return {
        key.removeprefix(PROVIDER_SECRET_PREFIX).lower(): SecretStr(value)
        for key, value in environ.items()
        if key.startswith(PROVIDER_SECRET_PREFIX) and value
    }
