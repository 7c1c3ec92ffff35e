"""What the simulated carrier decides: which items are valid, which fail, which devices speak RCS.

Pure logic, no I/O, so the rules read in one place and unit tests can call them directly.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.sandbox.config import SandboxSettings

MAX_KEY_LENGTH = 256
MAX_ADDRESS_LENGTH = 320  # RFC 5321's longest mailbox
# What carriers keep and echo of a client reference (Sinch allows 2048, Infobip 4000): ours fit.
MAX_REFERENCE_LENGTH = 512
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class Channel(StrEnum):
    EMAIL = "EMAIL"
    SMS = "SMS"
    RCS = "RCS"


@dataclass
class Switches:
    """The behaviour knobs that `PUT /v1/control` changes while the process runs."""

    latency_ms: int
    failure_rate: float
    outage: bool
    refuse_credentials: bool
    rcs_capable_rate: float
    open_rate: float
    click_rate: float

    @classmethod
    def from_settings(cls, settings: SandboxSettings) -> Switches:
        return cls(
            latency_ms=settings.latency_ms,
            failure_rate=settings.failure_rate,
            outage=settings.outage,
            refuse_credentials=settings.refuse_credentials,
            rcs_capable_rate=settings.rcs_capable_rate,
            open_rate=settings.open_rate,
            click_rate=settings.click_rate,
        )


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, which
# is measurable at thousands of items per second, and nothing mutates a Message anyway.
@dataclass(slots=True)
class Message:
    """One item of a send batch that passed validation.

    `client_reference` is the sender's opaque reference, echoed in every receipt of the message
    (like Infobip's callbackData or Sinch's client_reference).
    """

    idempotency_key: str
    workspace_id: str
    channel: Channel
    to: str
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    client_reference: str | None = None


_CHANNELS = {c.value: c for c in Channel}


class InvalidItem(ValueError):
    """An item the carrier refuses for good: retrying the same item cannot succeed."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field_name = field_name


def item_key(raw: object) -> str:
    """The idempotency key of a raw item, or "" when it has none, so a failure can still be matched."""
    if isinstance(raw, dict):
        key = raw.get("idempotency_key")
        if isinstance(key, str):
            return key
    return ""


def _required_str(raw: dict[str, Any], name: str, max_length: int) -> str:
    value = raw.get(name)
    if value is None or value == "":
        raise InvalidItem(name, "required")
    if not isinstance(value, str):
        raise InvalidItem(name, "must be a string")
    if len(value) > max_length:
        raise InvalidItem(name, f"longer than {max_length} characters")
    return value


def _optional_str(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidItem(name, "must be a string")
    return value


def validate_item(raw: object) -> Message:
    """Check one raw item the way a carrier's API would; raise InvalidItem naming the field."""
    if not isinstance(raw, dict):
        raise InvalidItem("message", "must be an object")
    key = _required_str(raw, "idempotency_key", MAX_KEY_LENGTH)
    workspace_id = _required_str(raw, "workspace_id", MAX_KEY_LENGTH)
    channel = _CHANNELS.get(_required_str(raw, "channel", 16))
    if channel is None:
        raise InvalidItem("channel", "must be EMAIL, SMS or RCS")
    to = _required_str(raw, "to", MAX_ADDRESS_LENGTH)
    if channel is Channel.EMAIL and not _EMAIL.match(to):
        raise InvalidItem("to", "not an email address")
    if channel is not Channel.EMAIL and not _E164.match(to):
        raise InvalidItem("to", "not an E.164 phone number (+ and 7 to 15 digits)")
    subject = _optional_str(raw, "subject")
    text = _optional_str(raw, "text")
    html = _optional_str(raw, "html")
    payload = raw.get("payload") or {}
    if not isinstance(payload, dict):
        raise InvalidItem("payload", "must be an object")
    reference = _optional_str(raw, "client_reference")
    if reference is not None and len(reference) > MAX_REFERENCE_LENGTH:
        raise InvalidItem("client_reference", f"longer than {MAX_REFERENCE_LENGTH} characters")
    if channel is Channel.EMAIL:
        if subject is None:
            raise InvalidItem("subject", "required for EMAIL")
        if text is None and html is None:
            raise InvalidItem("text", "EMAIL needs text or html")
    elif channel is Channel.SMS and text is None:
        raise InvalidItem("text", "required for SMS")
    elif channel is Channel.RCS and text is None and not payload:
        raise InvalidItem("text", "RCS needs text or a rich payload")
    return Message(
        idempotency_key=key,
        workspace_id=workspace_id,
        channel=channel,
        to=to,
        subject=subject,
        text=text,
        html=html,
        payload=payload,
        client_reference=reference,
    )


def rcs_capable(address: str, rate: float) -> bool:
    """Whether the device behind `address` speaks RCS.

    A hash of the address, not a dice roll, so the same number answers the same way in every
    call and every process run: capability caches and fallback tests stay meaningful.
    """
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(address.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class Dice:
    """Random decisions (injected failures, opens, clicks), reproducible when seeded.

    A sequence rather than a hash of the key: a retried item must be able to succeed later,
    otherwise `retryable` would be a lie.
    """

    def __init__(self, seed: int | None) -> None:
        self._random = random.Random(seed)

    def roll(self, rate: float) -> bool:
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self._random.random() < rate
