"""Settings from the environment, with the SHOAL_ prefix, validated at start-up.

Each service subclasses `ServiceSettings` with its own prefix (e.g. `SHOAL_BILLING_`), so a
variable names both the product and the service that reads it. A bad value stops the process
at start with a message naming the variable and the rule, instead of failing later mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable and the rule."""


class SharedSettings(BaseSettings):
    """Settings every process reads (SHOAL_*)."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="ignore", frozen=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server URL(s), comma separated")
    nats_stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Copies JetStream keeps of the EXEC and EVENTS streams (3 on a 3-server cluster)",
    )
    data_dir: Path = Field(default=Path(".data"), description="Folder for embedded databases")
    workspace_id: str = Field(default="ws_default", description="Workspace created by the embedded default")
    namespace: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]*$",
        description="Prefix of NATS streams, subjects and buckets (several deployments on one NATS)",
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_json: bool = True
    grpc_deadline_seconds: float = Field(default=10.0, gt=0, le=300)
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=120)
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Addresses of the services (host:port), read by whoever calls them.
    segment_addr: str = "127.0.0.1:50051"
    template_addr: str = "127.0.0.1:50052"
    billing_addr: str = "127.0.0.1:50053"
    campaign_addr: str = "127.0.0.1:50054"
    execution_addr: str = "127.0.0.1:50055"
    sandbox_url: str = "http://127.0.0.1:8025"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A service's own prefix (SHOAL_BILLING_) renames the inherited shared fields too; read
        # the shared SHOAL_* names (SHOAL_NATS_URL, SHOAL_DATA_DIR, ...) below the service's own.
        return (
            init_settings,
            env_settings,
            EnvSettingsSource(SharedSettings),
            dotenv_settings,
            file_secret_settings,
        )

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the environment; raise ConfigError with one line per bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_errors(cls, exc)) from None


class ServiceSettings(SharedSettings):
    """Settings of one gRPC service; subclasses set `env_prefix` for their own variables."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty means SQLite under data_dir")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Prometheus /metrics on host:metrics_port; unset means no endpoint, 0 picks a free port",
    )

    def resolved_database_url(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / f'{service}.db'}"


def describe_errors(settings_cls: type[BaseSettings], exc: ValidationError) -> str:
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    lines = [f"invalid configuration for {settings_cls.__name__}:"]
    for err in exc.errors():
        name = "_".join(str(p) for p in err["loc"]).upper()
        got = err.get("input")
        lines.append(f"  {prefix}{name}: {err['msg']} (got {got!r})")
    return "\n".join(lines)
