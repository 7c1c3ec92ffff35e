"""Which providers exist in this process, and which one a channel uses by default.

`build_providers(settings)` builds the sandbox adapter always, `smtp` when SHOAL_EXECUTION_SMTP_HOST
is set and `http` when SHOAL_EXECUTION_HTTP_PROVIDER_URL is set. The default provider per channel
comes from SHOAL_EXECUTION_EMAIL_PROVIDER / _SMS_PROVIDER / _RCS_PROVIDER (each `sandbox` unless
set); a default naming a provider that is not configured, or one that cannot carry that channel
(`smtp` only sends EMAIL, `http` only SMS and RCS), is refused at start with a message naming the
variable to set. `ExecutionSettings` runs the same check when it loads, so `python -m
services.execution` stops before it touches the database.

`default_provider_for(channel)` takes no settings because the engine calls it per SEND group
without them. It reads a module-level table that `build_providers` sets: one process builds its
providers once, at start, so the table is the configuration of that process. Until
`build_providers` runs (and for settings without these fields, such as `SharedSettings`) every
channel defaults to the sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from email.utils import parseaddr
from typing import Any, Protocol

from pydantic import SecretStr

from services.execution.providers.base import Channel, Provider
from services.execution.providers.http import CHANNELS as HTTP_CHANNELS
from services.execution.providers.http import HttpProvider
from services.execution.providers.sandbox import SandboxProvider
from services.execution.providers.smtp import SmtpProvider

SANDBOX = "sandbox"
SMTP = "smtp"
HTTP = "http"

# The channels each provider can carry.
SERVES: dict[str, frozenset[Channel]] = {
    SANDBOX: frozenset(Channel),
    SMTP: frozenset({Channel.EMAIL}),
    HTTP: HTTP_CHANNELS,
}
# The setting whose presence configures a provider (the sandbox needs none: it is always built).
ENABLED_BY: dict[str, str] = {SMTP: "SHOAL_EXECUTION_SMTP_HOST", HTTP: "SHOAL_EXECUTION_HTTP_PROVIDER_URL"}
DEFAULT_SETTING: dict[Channel, str] = {
    Channel.EMAIL: "SHOAL_EXECUTION_EMAIL_PROVIDER",
    Channel.SMS: "SHOAL_EXECUTION_SMS_PROVIDER",
    Channel.RCS: "SHOAL_EXECUTION_RCS_PROVIDER",
}

_defaults: dict[Channel, str] = dict.fromkeys(Channel, SANDBOX)


class ProviderConfigError(ValueError):
    """The provider configuration cannot work; raised at start, never at send time."""


class ProviderSettings(Protocol):
    """The settings the providers read.

    Only `sandbox_url` is required (`shoal.config.SharedSettings` satisfies it); the SMTP, HTTP
    and per-channel fields of `ExecutionSettings` are read when present, so callers with the shared
    settings alone get the sandbox for everything.
    """

    @property
    def sandbox_url(self) -> str: ...


def _get(settings: object, name: str, default: Any) -> Any:
    value = getattr(settings, name, default)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def configured(*, smtp_host: str, http_provider_url: str) -> frozenset[str]:
    """The provider names a process with these settings builds."""
    names = {SANDBOX}
    if smtp_host:
        names.add(SMTP)
    if http_provider_url:
        names.add(HTTP)
    return frozenset(names)


def check_default(channel: Channel, name: str, available: frozenset[str]) -> str:
    """`name`, lower-cased, if it can be `channel`'s default provider; else ProviderConfigError."""
    setting = DEFAULT_SETTING[channel]
    name = name.strip().lower()
    if name not in SERVES:
        known = ", ".join(sorted(SERVES))
        raise ProviderConfigError(f"{setting}={name!r} names no provider; known providers: {known}")
    if channel not in SERVES[name]:
        serves = ", ".join(sorted(SERVES[name]))
        raise ProviderConfigError(f"{setting}={name!r}: the {name} provider only sends {serves}")
    if name not in available:
        raise ProviderConfigError(
            f"{setting}={name!r} but the {name} provider is not configured: set {ENABLED_BY[name]}"
        )
    return name


def check_settings(settings: object) -> dict[Channel, str]:
    """Check the provider settings; return the default provider of every channel."""
    smtp_host = _get(settings, "smtp_host", "")
    if smtp_host and "@" not in parseaddr(_get(settings, "smtp_from", ""))[1]:
        raise ProviderConfigError(
            "SHOAL_EXECUTION_SMTP_HOST is set but SHOAL_EXECUTION_SMTP_FROM is no address (addr@domain)"
        )
    available = configured(smtp_host=smtp_host, http_provider_url=_get(settings, "http_provider_url", ""))
    return {
        channel: check_default(
            channel, str(_get(settings, f"{channel.value.lower()}_provider", SANDBOX)), available
        )
        for channel in Channel
    }


def build_providers(settings: ProviderSettings, *, timeout: float = 5.0) -> dict[str, Provider]:
    """One instance per configured provider name, to share across all workers of the process.

    Also sets the per-channel defaults `default_provider_for` answers with. Raises
    ProviderConfigError (before building anything) when the configuration cannot work.
    """
    defaults = check_settings(settings)
    providers: dict[str, Provider] = {SANDBOX: SandboxProvider(settings.sandbox_url, timeout=timeout)}
    if host := _get(settings, "smtp_host", ""):
        providers[SMTP] = SmtpProvider(
            host=host,
            port=int(_get(settings, "smtp_port", 587)),
            from_address=_get(settings, "smtp_from", ""),
            username=_get(settings, "smtp_username", "") or None,
            password=_get(settings, "smtp_password", "") or None,
            starttls=bool(_get(settings, "smtp_starttls", True)),
            tls=bool(_get(settings, "smtp_tls", False)),
            timeout=float(_get(settings, "smtp_timeout", 10.0)),
            pool_size=int(_get(settings, "smtp_pool_size", 4)),
        )
    if url := _get(settings, "http_provider_url", ""):
        providers[HTTP] = HttpProvider(
            url,
            token=_get(settings, "http_provider_token", ""),
            timeout=float(_get(settings, "http_provider_timeout", 5.0)),
        )
    _defaults.update(defaults)
    return providers


def default_provider_for(channel: Channel | str) -> str:
    """The provider a SEND node on `channel` uses unless its configuration names another."""
    # Refuses unknown channels here rather than at send time.
    return _defaults[Channel.parse(str(channel))]


def defaults_of(provider: str) -> list[Channel]:
    """The channels `provider` serves when a SEND names no provider."""
    return [channel for channel, name in _defaults.items() if name == provider]


async def close_providers(providers: Mapping[str, Provider]) -> None:
    await asyncio.gather(*(p.close() for p in providers.values()))
