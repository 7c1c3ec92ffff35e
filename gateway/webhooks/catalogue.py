"""The customer event catalogue: which bus events become which webhooks, with which `data`.

`from_bus(subject, payload)` turns one EVENTS message into an `Event` (or None when customers are
not told about it); `envelope(event)` is the JSON body every attempt POSTs; `signature(secret,
body)` the `X-Shoal-Signature` header value. See the package docstring for the table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from shoal.v1 import campaign_pb2, common_pb2, events_pb2

TEST_EVENT = "webhook.test"
ALL = "*"

CAMPAIGN_STATES = (
    "draft",
    "scheduled",
    "running",
    "paused",
    "paused_error",
    "paused_balance",
    "completed",
    "completed_partial",
    "archived",
)

# Every event an endpoint may subscribe to, with what it means (shown in the API docs).
EVENTS: dict[str, str] = {
    "campaign.scheduled": "A campaign was scheduled (DRAFT -> SCHEDULED)",
    "campaign.draft": "A scheduled campaign went back to DRAFT (unscheduled, missed, or refused at its time)",
    "campaign.running": "A campaign started a run or resumed (-> RUNNING)",
    "campaign.paused": "An operator paused a campaign",
    "campaign.paused_error": "A provider outage paused a campaign (circuit breaker open)",
    "campaign.paused_balance": "The free balance ran out and paused a campaign",
    "campaign.completed": "Every execution of the run completed",
    "campaign.completed_partial": "The run finished with some executions failed or skipped",
    "campaign.archived": "A campaign was archived",
    "message.delivered": "A provider delivered a message",
    "message.failed": "A provider could not deliver a message",
    "message.bounced": "A message bounced",
    "message.opened": "A contact opened a (non-email) message",
    "message.clicked": "A contact clicked in a (non-email) message",
    "email.opened": "A contact opened an email",
    "email.clicked": "A contact clicked a link in an email",
    "consent.updated": "A contact's consent for a channel and message type changed",
    "billing.balance_low": "The free balance fell below the low-balance threshold",
    "billing.balance_exhausted": "A send found the free balance short (campaigns pause)",
    "billing.auto_reload_succeeded": "Auto-reload topped the balance up",
    "billing.auto_reload_failed": "An auto-reload payment failed",
}

# The subjects the dispatcher's consumer reads (logical, not namespaced). Nothing else on EVENTS
# (run progress, breakers, other contact events) becomes a webhook, so it is not even fetched.
SUBJECTS = [
    "shoal.events.campaign.state_changed",
    "shoal.events.message.>",
    "shoal.events.billing.>",
    "shoal.events.contact.consent_updated",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True)
class Event:
    """One customer event: the envelope's fields plus the workspace whose endpoints get it."""

    id: str
    name: str
    workspace_id: str
    time: datetime
    data: dict[str, Any]


def event_id(seed: bytes) -> str:
    """`evt_` + 20 Crockford base32 characters of SHA-256(seed): the same event, the same id."""
    value = int.from_bytes(hashlib.sha256(seed).digest()[:13], "big") >> 4  # 100 bits
    chars = []
    for _ in range(20):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "evt_" + "".join(reversed(chars))


def rfc3339(value: datetime) -> str:
    """UTC, millisecond precision, `Z`: `2026-11-26T06:00:00.000Z`."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(event: Event) -> str:
    """The body POSTed for `event` (compact JSON; stored, so every attempt sends the same bytes)."""
    return json.dumps(
        {"id": event.id, "event": event.name, "timestamp": rfc3339(event.time), "data": event.data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of the raw body>`, keyed with the endpoint's secret (UTF-8)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def subscribed(events: str, name: str) -> bool:
    """Whether an endpoint's stored event list (space separated, or `*`) includes `name`."""
    wanted = events.split()
    return ALL in wanted or name in wanted


# -- from bus messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mapped:
    message: Message
    workspace_id: str
    time: datetime
    name: str
    data: dict[str, Any]


def _time(message: Any) -> datetime:
    """The event's own time (every event message has `time`), or now when the producer left it unset."""
    if message.HasField("time"):
        stamp: timestamp_pb2.Timestamp = message.time
        return stamp.ToDatetime(tzinfo=UTC)
    return datetime.now(UTC)


def _enum(value: str, prefix: str) -> str:
    """`CHANNEL_EMAIL` -> `EMAIL` (a name already without the prefix stays as is)."""
    return value.removeprefix(prefix)


def _or_none(value: str) -> str | None:
    return value or None


def _campaign(kind: str, payload: bytes) -> _Mapped | None:
    m = events_pb2.CampaignStateChanged.FromString(payload)
    to_state = _enum(campaign_pb2.CampaignState.Name(m.to_state), "CAMPAIGN_STATE_")
    name = f"campaign.{to_state.lower()}"
    if name not in EVENTS:
        return None
    data = {
        "campaign_id": m.campaign_id,
        "run_id": _or_none(m.run_id),
        "from_state": _enum(campaign_pb2.CampaignState.Name(m.from_state), "CAMPAIGN_STATE_"),
        "to_state": to_state,
        "actor": m.actor,
        "reason": m.reason,
    }
    return _Mapped(m, m.workspace_id, _time(m), name, data)


_RECEIPTS = {
    events_pb2.RECEIPT_STATUS_DELIVERED: "message.delivered",
    events_pb2.RECEIPT_STATUS_FAILED: "message.failed",
    events_pb2.RECEIPT_STATUS_BOUNCED: "message.bounced",
    events_pb2.RECEIPT_STATUS_OPENED: "message.opened",
    events_pb2.RECEIPT_STATUS_CLICKED: "message.clicked",
}
# Engagement with an email is named as the segment service names it (`email.opened`, ...).
_EMAIL_RECEIPTS = {
    events_pb2.RECEIPT_STATUS_OPENED: "email.opened",
    events_pb2.RECEIPT_STATUS_CLICKED: "email.clicked",
}


def _receipt(kind: str, payload: bytes) -> _Mapped | None:
    m = events_pb2.MessageReceipt.FromString(payload)
    name = (_EMAIL_RECEIPTS if m.channel == common_pb2.CHANNEL_EMAIL else {}).get(m.status) or _RECEIPTS.get(
        m.status
    )
    if name is None:
        return None
    data = {
        "message_id": m.provider_message_id,
        "channel": _enum(common_pb2.Channel.Name(m.channel), "CHANNEL_"),
        "contact_id": _or_none(m.contact_id),
        "campaign_id": _or_none(m.campaign_id),
        "run_id": _or_none(m.run_id),
        "node_id": _or_none(m.node_id),
        "provider": m.provider,
        "error": _or_none(m.error),
    }
    return _Mapped(m, m.workspace_id, _time(m), name, data)


def _balance(kind: str, payload: bytes) -> _Mapped | None:
    m = events_pb2.BalanceEvent.FromString(payload)
    data: dict[str, Any] = {"free_cents": m.free_cents}
    if kind == "balance_low":
        data["threshold_cents"] = m.threshold_cents
    else:
        data["campaign_ids"] = list(m.campaign_ids)
    return _Mapped(m, m.workspace_id, _time(m), f"billing.{kind}", data)


def _reload(kind: str, payload: bytes) -> _Mapped | None:
    m = events_pb2.AutoReloadResult.FromString(payload)
    data: dict[str, Any] = {"amount_cents": m.amount_cents}
    if kind == "auto_reload_failed":
        data["error"] = m.error
    return _Mapped(m, m.workspace_id, _time(m), f"billing.{kind}", data)


def _consent(kind: str, payload: bytes) -> _Mapped | None:
    m = events_pb2.ContactEvent.FromString(payload)
    props = json_format.MessageToDict(m.properties)
    data = {
        "contact_id": m.contact_id,
        "channel": _enum(str(props.get("channel", "")), "CHANNEL_") or None,
        "message_type": _enum(str(props.get("message_type", "")), "MESSAGE_TYPE_") or None,
        "status": _enum(str(props.get("status", "")), "CONSENT_STATUS_") or None,
        "source": str(props.get("source", "")) or None,
    }
    return _Mapped(m, m.workspace_id, _time(m), "consent.updated", data)


_Mapper = Callable[[str, bytes], _Mapped | None]
# (domain, kind) of the subject -> its mapper.
_MAPPERS: dict[tuple[str, str], _Mapper] = {
    ("campaign", "state_changed"): _campaign,
    **{("message", status): _receipt for status in ("delivered", "failed", "bounced", "opened", "clicked")},
    ("billing", "balance_low"): _balance,
    ("billing", "balance_exhausted"): _balance,
    ("billing", "auto_reload_succeeded"): _reload,
    ("billing", "auto_reload_failed"): _reload,
    ("contact", "consent_updated"): _consent,
}


def from_bus(subject: str, payload: bytes) -> Event | None:
    """The customer event of one EVENTS message (`subject` without the namespace), or None.

    Raises `google.protobuf.message.DecodeError` for a payload that is not the subject's message.
    The event id is derived from the subject and the message's content, so the same event
    published twice (whatever its Nats-Msg-Id) or delivered twice has one id.
    """
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["shoal", "events"]:
        return None
    domain, kind = parts[2], parts[3]
    mapper = _MAPPERS.get((domain, kind))
    if mapper is None:
        return None
    mapped = mapper(kind, payload)
    if mapped is None or not mapped.workspace_id:
        return None
    seed = f"{domain}.{kind}\x1f".encode() + mapped.message.SerializeToString(deterministic=True)
    return Event(
        id=event_id(seed),
        name=mapped.name,
        workspace_id=mapped.workspace_id,
        time=mapped.time,
        data=mapped.data,
    )
