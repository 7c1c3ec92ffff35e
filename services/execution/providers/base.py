"""The provider interface the execution workers call, and the values that cross it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

SendStatus = Literal["accepted", "duplicate", "failed"]


class Channel(StrEnum):
    """A channel by the name both the protos (without `CHANNEL_`) and the providers use."""

    EMAIL = "EMAIL"
    SMS = "SMS"
    RCS = "RCS"

    @classmethod
    def parse(cls, name: str) -> Channel:
        """Accept "EMAIL" as well as the proto enum name "CHANNEL_EMAIL" (`Channel.Name(value)`)."""
        try:
            return cls(name.upper().removeprefix("CHANNEL_"))
        except ValueError:
            raise ValueError(f"unknown channel {name!r}, expected EMAIL, SMS or RCS") from None


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message to hand to a provider.

    `key` is the send's deterministic key (`execution_id:node_id`) and travels as the provider's
    idempotency key, so a retry after a crash is answered "duplicate" instead of sent twice.
    """

    key: str
    workspace_id: str
    channel: Channel
    to: str
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


# The client reference a provider hands the carrier with each message, for the carrier to echo in
# its receipts (what Infobip calls callbackData, Sinch client_reference, Vonage client-ref):
# `o1:<contact_id>:<campaign_id>:<run_id>`. The gateway's callback route rebuilds a receipt's
# origin from it instead of looking the execution up (`gateway.routers.providers`, which parses
# this same format); the callback's signature is what makes the echoed value trustworthy.
REFERENCE_PREFIX = "o1"
REFERENCE_MAX_LENGTH = 512
_ORIGIN_FIELDS = ("contact_id", "campaign_id", "run_id")


def client_reference(message: OutboundMessage) -> str | None:
    """The reference for `message`, from the origin the engine puts in its payload.

    None when the payload lacks a part, a part holds the separator, or the whole would be longer
    than carriers keep: the receipt then carries no reference and the gateway looks the
    execution up, as it does for a carrier that echoes nothing.
    """
    parts = [REFERENCE_PREFIX]
    for name in _ORIGIN_FIELDS:
        value = message.payload.get(name)
        if not isinstance(value, str) or not value or ":" in value:
            return None
        parts.append(value)
    reference = ":".join(parts)
    return reference if len(reference) <= REFERENCE_MAX_LENGTH else None


@dataclass(frozen=True, slots=True)
class SendResult:
    """The provider's answer for one message.

    `accepted` and `duplicate` both mean the provider holds the message (duplicate: from an
    earlier call with the same key, `provider_message_id` is the original). `failed` with
    `retryable` may succeed later with the same key; without it, retrying is pointless.
    """

    key: str
    status: SendStatus
    provider_message_id: str | None = None
    error: str | None = None
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class ProviderError(Exception):
    """A whole call to a provider failed; no item of it has an outcome."""

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


class ProviderUnavailable(ProviderError):
    """The provider could not take the call: outage, timeout, refused connection, 5xx, 429.

    Transient by nature: retry the same batch later with the same keys. The circuit breaker
    counts these.
    """


class ProviderRequestError(ProviderError):
    """The provider refused the call itself (4xx other than 408/429): our request is wrong.

    Retrying the same call cannot help, and it says nothing about the provider's health, so
    the breaker does not count it.
    """


class Provider(ABC):
    """A channel provider that sends in batches.

    Implementations keep one connection pool for their lifetime and are safe to call
    concurrently from one event loop.
    """

    name: str

    @abstractmethod
    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """Send the messages; one result per message, in input order.

        Raises ProviderUnavailable or ProviderRequestError when the call as a whole failed.
        """

    @abstractmethod
    async def rcs_capable(self, addresses: Sequence[str]) -> dict[str, bool]:
        """Whether each address can receive RCS; every distinct address is a key of the answer."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the provider is unusable afterwards."""
