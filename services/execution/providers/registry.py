"""Which providers exist in this process, and which one a channel uses by default."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from services.execution.providers.base import Channel, Provider
from services.execution.providers.sandbox import SandboxProvider

SANDBOX = "sandbox"


class ProviderSettings(Protocol):
    """The settings the providers read; `shoal.config.SharedSettings` satisfies it."""

    @property
    def sandbox_url(self) -> str: ...


def build_providers(settings: ProviderSettings, *, timeout: float = 5.0) -> dict[str, Provider]:
    """One instance per provider name, to share across all workers of the process."""
    return {SANDBOX: SandboxProvider(settings.sandbox_url, timeout=timeout)}


def default_provider_for(channel: Channel | str) -> str:
    """The provider a SEND node on `channel` uses unless its configuration names another."""
    Channel.parse(str(channel))  # refuse unknown channels here rather than at send time
    return SANDBOX


async def close_providers(providers: Mapping[str, Provider]) -> None:
    await asyncio.gather(*(p.close() for p in providers.values()))
