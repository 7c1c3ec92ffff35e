"""`/v1/contacts`: contacts, bulk import, tags, consent records and custom events, over the
SegmentService gRPC API.

JSON <-> proto, decided here once (segments.py reuses the value mapping and the error helpers):
- Enums by their PRODUCT.md names: ACTIVE, EMAIL, NEWSLETTER, GRANTED (no proto prefixes).
- Custom fields (`fields`) are typed. A JSON string, number or boolean is stored as that type; a
  timestamp is written `{"timestamp": "2026-01-31T12:00:00Z"}` and answered in the same form, so
  reading a contact and writing it back never changes a field's type. `null` removes the field
  (PATCH). Anything else (a list, another object) cannot be typed: 400 naming the field.
- The service validates values (email syntax, E.164 phones, tag and field-name rules); its
  field paths (`contact.fields[plan]`, `contacts[3].email`) are answered as JSON paths
  (`fields.plan`, `email` in row 3).
- A NOT_FOUND from the service answers 404 `not_found`, whatever the service's own reason.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    StrictBool,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
)

from gateway.auth import require
from gateway.backends import Backends, get_backends
from gateway.errors import ApiError, ErrorBody, ErrorDetail, RateLimitedBody
from gateway.flows import Channel, ConsentStatus, MessageType, TimestampValue
from gateway.keys import Principal, Scope
from gateway.payloads import MAX_JSON_DEPTH, JsonObject
from shoal.errors import FieldViolation, ShoalError, from_rpc_error
from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as pb

router = APIRouter(prefix="/v1/contacts", tags=["contacts"])

T = TypeVar("T")

MAX_IMPORT = 10_000
MAX_EVENTS = 1_000
# A full import (10,000 rows validated, written in one transaction) takes seconds, not the default
# deadline's budget; it is never retried (not idempotent), so a long deadline costs nothing.
IMPORT_TIMEOUT_SECONDS = 120.0
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
EVENT_TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
RESERVED_EVENT_PREFIXES = ("message.", "email.", "contact.", "campaign.", "billing.", "webhook.")

COMMON: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request or a value breaking a rule; names the field"},
    401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
    403: {"model": ErrorBody, "description": "The key lacks the scope"},
    429: {
        "model": RateLimitedBody,
        "description": "The key's rate limit is spent; see `Retry-After`",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
    503: {"model": ErrorBody, "description": "The segment service is unavailable"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such contact in this workspace"}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "external_id already belongs to another contact"}
}

ContactIdPath = Annotated[
    str, Path(pattern=r"^c_[A-Za-z0-9]{1,60}$", description="Contact id (`c_...`)", examples=["c_01JD5Z0T9X"])
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size (1 to 500)")]
Cursor = Annotated[
    str | None,
    Query(max_length=200, description="`next_cursor` of the previous page; omit for the first page"),
]


# -- enums (Channel, MessageType, ConsentStatus and TimestampValue come from gateway.flows) ---------


class ContactStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    UNSUBSCRIBED = "UNSUBSCRIBED"
    BOUNCED = "BOUNCED"
    BLOCKED = "BLOCKED"


def enum_from_pb(number: int, proto_enum: Any, prefix: str, kind: type[enum.StrEnum]) -> Any:
    """CHANNEL_EMAIL's number -> Channel.EMAIL; an unknown or UNSPECIFIED value is the upstream's bug."""
    try:
        return kind(proto_enum.Name(number).removeprefix(prefix))
    except ValueError:
        raise ShoalError(
            f"segment service answered unknown {kind.__name__} {number}", "bad_upstream"
        ) from None


# Proto constructors and fields take enum values by their proto names as well.
def channel_pb(value: Channel) -> str:
    return "CHANNEL_" + value.value


def message_type_pb(value: MessageType) -> str:
    return "MESSAGE_TYPE_" + value.value


def consent_status_pb(value: ConsentStatus) -> str:
    return "CONSENT_STATUS_" + value.value


def contact_status_pb(value: ContactStatus) -> str:
    return "CONTACT_STATUS_" + value.value


# -- errors -----------------------------------------------------------------------------------------


def bad_request(
    details: Sequence[ErrorDetail], error: str = "validation_failed", status: int = 400
) -> ApiError:
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    return ApiError(status, error, f"invalid request: {summary}", details=details)


def json_path(proto_path: str) -> str:
    """`contact.fields[plan]` -> `contact.fields.plan`; `tags[2]` -> `tags.2`."""
    return re.sub(r"\[([^\]]*)\]", r".\1", proto_path)


def strip_prefix(prefix: str) -> Callable[[str], str]:
    """A renamer for the service's violation paths: drop `prefix.`, brackets become dots."""

    def rename(field: str) -> str:
        path = json_path(field)
        if path == prefix:
            return "request"
        return path.removeprefix(prefix + ".")

    return rename


def _same(field: str) -> str:
    return json_path(field)


def upstream_error(
    error: ShoalError, rename: Callable[[str], str] = _same, *, filter_status: int = 422
) -> Exception:
    """The service's error with its field paths renamed to this API's; 404 is always `not_found`,
    a semantic filter error (`invalid_filter`) answers `filter_status`."""
    if error.code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, "not_found", error.message)
    violations = [FieldViolation(rename(v.field), v.description) for v in error.violations]
    if error.reason == "invalid_filter":
        details = [ErrorDetail(field=v.field, message=v.description) for v in violations]
        return bad_request(details, "invalid_filter", filter_status)
    message = "; ".join(f"{v.field}: {v.description}" for v in violations) if violations else error.message
    renamed = type(error)(message, error.reason, violations)
    renamed.code = error.code
    return renamed


async def rpc(call: Awaitable[T], rename: Callable[[str], str] = _same, *, filter_status: int = 422) -> T:
    """Await a SegmentService call; a failure is raised in this API's terms (see upstream_error)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise upstream_error(from_rpc_error(exc), rename, filter_status=filter_status) from None


# -- typed custom field values -------------------------------------------------------------------------


# Declared for the schema; parsed by `field_value_pb` (so a bad value names its field).
FieldValueIn = StrictBool | float | StrictStr | TimestampValue | None
FieldValueOut = StrictBool | int | float | StrictStr | TimestampValue

_UNTYPED = 'cannot be typed: use a string, number, boolean, null or {"timestamp": "<RFC 3339>"}'


class InvalidValue(ValueError):
    """A JSON value with no typed form; `str(exc)` is the rule."""


def checked_text(value: str) -> str:
    """A string protobuf can carry (a lone surrogate cannot be encoded as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue("must be valid Unicode text") from None
    return value


def number_pb(value: float) -> float:
    try:
        number = float(value)
    except OverflowError:
        raise InvalidValue("number is too large") from None
    if not math.isfinite(number):
        raise InvalidValue("number must be finite")
    return number


def field_value_pb(value: Any, *, timestamp_strings: bool = False) -> common_pb2.FieldValue:
    """A JSON value as a typed FieldValue; `null` is the empty FieldValue (removes on merge).

    With `timestamp_strings`, a plain string is taken as a timestamp (filters, where only a
    timestamp makes sense). Raises InvalidValue with the rule.
    """
    if value is None:
        return common_pb2.FieldValue()
    if isinstance(value, bool):
        return common_pb2.FieldValue(bool_value=value)
    if isinstance(value, int | float):
        return common_pb2.FieldValue(number_value=number_pb(value))
    if isinstance(value, str):
        if timestamp_strings:
            return common_pb2.FieldValue(timestamp_value=checked_text(value))
        return common_pb2.FieldValue(string_value=checked_text(value))
    if isinstance(value, dict) and set(value) == {"timestamp"} and isinstance(value["timestamp"], str):
        return common_pb2.FieldValue(timestamp_value=checked_text(value["timestamp"]))
    raise InvalidValue(_UNTYPED)


def field_value_json(value: common_pb2.FieldValue, *, timestamp_strings: bool = False) -> Any:
    """A FieldValue as JSON: integral numbers as integers, timestamps wrapped (or plain strings)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        return value.timestamp_value if timestamp_strings else {"timestamp": value.timestamp_value}
    return None


def fields_pb(fields: dict[str, Any], prefix: str = "fields") -> dict[str, common_pb2.FieldValue]:
    out: dict[str, common_pb2.FieldValue] = {}
    problems = []
    for name, value in fields.items():
        try:
            out[checked_text(name)] = field_value_pb(value)
        except InvalidValue as exc:
            problems.append(ErrorDetail(field=f"{prefix}.{name}", message=str(exc)))
    if problems:
        raise bad_request(problems)
    return out


def timestamp(value: Any) -> datetime:
    ts: datetime = value.ToDatetime(tzinfo=UTC)
    return ts


def text_or_none(value: str) -> str | None:
    return value or None


# -- models ---------------------------------------------------------------------------------------------

_FIELDS_DESCRIPTION = (
    "Custom fields by name (letters, digits, `_`). Values are typed: a string, a number, a "
    'boolean, or a timestamp written `{"timestamp": "2026-01-31T12:00:00Z"}`; `null` removes '
    "the field (on update). A list or another object is refused with 400 naming the field."
)


class ConsentInput(BaseModel):
    """A consent record to store with the contact."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    message_type: MessageType
    status: ConsentStatus
    source: StrictStr = Field(default="", description="Where the consent came from (a form, an import)")
    proof: StrictStr = Field(default="", description="Proof text, e.g. the checkbox wording and IP")


class ContactInput(BaseModel):
    """A contact to create, upsert or import. Every field is optional; empty strings mean "not given"."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "external_id": "crm-4711",
                    "email": "ada@example.com",
                    "phone": "+4915123456789",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "status": "ACTIVE",
                    "tags": ["vip", "newsletter"],
                    "fields": {
                        "plan": "pro",
                        "seats": 5,
                        "trial": False,
                        "renews": {"timestamp": "2026-07-01T00:00:00Z"},
                    },
                    "consents": [
                        {
                            "channel": "EMAIL",
                            "message_type": "NEWSLETTER",
                            "status": "GRANTED",
                            "source": "signup-form",
                            "proof": "checkbox 'Send me the newsletter', 2026-01-02 from 203.0.113.7",
                        }
                    ],
                }
            ]
        },
    )

    external_id: StrictStr | None = Field(
        default=None, description="Your id for the contact (unique per workspace)"
    )
    email: StrictStr | None = None
    phone: StrictStr | None = Field(default=None, description="International format, stored as E.164")
    first_name: StrictStr | None = None
    last_name: StrictStr | None = None
    status: ContactStatus | None = Field(default=None, description="ACTIVE when omitted on create")
    tags: list[StrictStr] | None = None
    fields: dict[str, SkipValidation[FieldValueIn]] | None = Field(
        default=None, description=_FIELDS_DESCRIPTION
    )
    consents: list[ConsentInput] | None = Field(
        default=None, description="Consent records to set with the contact"
    )


class ContactPatch(BaseModel):
    """Only the fields given change. `tags` replaces the contact's tags; `fields` is merged (a
    field set to `null` is removed); a text field set to `null` or `""` is cleared. Consent
    changes go through `POST /v1/contacts/{contact_id}/consent`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"first_name": "Ada", "tags": ["vip"], "fields": {"plan": "team", "legacy": None}}]
        },
    )

    external_id: StrictStr | None = None
    email: StrictStr | None = None
    phone: StrictStr | None = None
    first_name: StrictStr | None = None
    last_name: StrictStr | None = None
    status: ContactStatus | None = Field(default=None, description="Cannot be cleared")
    tags: list[StrictStr] | None = Field(
        default=None, description="The new tags (replace); `[]` or `null` removes all"
    )
    fields: dict[str, SkipValidation[FieldValueIn]] | None = Field(
        default=None, description=_FIELDS_DESCRIPTION
    )


class Contact(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "c_01JD5Z0T9XK3M8Q2V7RWA4",
                    "external_id": "crm-4711",
                    "email": "ada@example.com",
                    "phone": "+4915123456789",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "status": "ACTIVE",
                    "tags": ["newsletter", "vip"],
                    "fields": {"plan": "pro", "seats": 5, "renews": {"timestamp": "2026-07-01T00:00:00Z"}},
                    "created_at": "2026-01-02T09:30:00Z",
                    "updated_at": "2026-01-05T17:12:44Z",
                }
            ]
        }
    )

    id: str = Field(description="`c_...`")
    external_id: str | None
    email: str | None = Field(description="Normalised (lower case)")
    phone: str | None = Field(description="E.164")
    first_name: str | None
    last_name: str | None
    status: ContactStatus
    tags: list[str]
    fields: dict[str, FieldValueOut] = Field(
        description='Typed custom fields (timestamps as `{"timestamp": ...}`)'
    )
    created_at: datetime
    updated_at: datetime


class ContactPage(BaseModel):
    items: list[Contact]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class Upserted(BaseModel):
    created: bool = Field(description="True when no contact matched and one was created")
    contact: Contact


class ImportRequest(BaseModel):
    """Body of a bulk import: one JSON object, at most 10,000 contacts.

    Each row is matched like an upsert (by `external_id`, else by `email`): a match is updated,
    otherwise a contact is created. A row that breaks a rule is rejected on its own; the other
    rows are still imported. A row repeating the key of an earlier row in the same call is
    rejected. Split larger files into calls of at most 10,000 rows (and at most the gateway's
    body size limit, 2 MiB by default).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "contacts": [
                        {"external_id": "crm-1", "email": "ada@example.com", "tags": ["vip"]},
                        {"email": "grace@example.com", "fields": {"plan": "pro"}},
                    ]
                }
            ]
        },
    )

    contacts: Annotated[list[SkipValidation[ContactInput]], Field(max_length=MAX_IMPORT)] = Field(
        description=f"The rows (at most {MAX_IMPORT:,}); each is a contact as in `POST /v1/contacts`"
    )


class ImportRejection(BaseModel):
    index: int = Field(ge=0, description="Position of the row in `contacts` (0-based)")
    field: str = Field(description="The row's offending field (`email`, `fields.plan`, `consents.0.status`)")
    reason: str


class ImportResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "imported": 1,
                    "updated": 0,
                    "rejected": [
                        {"index": 1, "field": "email", "reason": "is not a valid email address: ..."}
                    ],
                }
            ]
        }
    )

    imported: int = Field(ge=0, description="Rows that created a contact")
    updated: int = Field(ge=0, description="Rows that updated an existing contact")
    rejected: list[ImportRejection] = Field(description="Rows not applied, by index, with the reason")


class TagChanged(BaseModel):
    tag: str
    changed: bool = Field(description="False when the contact already had the tag")


class ConsentRecord(BaseModel):
    channel: Channel
    message_type: MessageType
    status: ConsentStatus
    source: str | None
    proof: str | None
    recorded_at: datetime
    confirmed_at: datetime | None = Field(description="When a double opt-in was confirmed")


class ContactConsent(BaseModel):
    current: list[ConsentRecord] = Field(description="The record in force per channel + message type")
    history: list[ConsentRecord] = Field(description="Every record, oldest first (includes the current ones)")


class ConsentChange(BaseModel):
    """A consent record to append. To confirm a double opt-in, send `confirm: true` (status
    omitted or GRANTED): the PENDING record of that channel + message type becomes GRANTED."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "channel": "EMAIL",
                    "message_type": "NEWSLETTER",
                    "status": "PENDING",
                    "source": "signup-form",
                    "proof": "checkbox 'Send me the newsletter' from 203.0.113.7",
                },
                {"channel": "EMAIL", "message_type": "NEWSLETTER", "confirm": True},
            ]
        },
    )

    channel: Channel
    message_type: MessageType
    status: ConsentStatus | None = Field(default=None, description="Required unless `confirm` is true")
    source: StrictStr = ""
    proof: StrictStr = ""
    confirm: StrictBool = Field(default=False, description="Confirm the pending double opt-in")


class ContactEventInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, StringConstraints(pattern=EVENT_TYPE_PATTERN)] = Field(
        description="Event type, e.g. `order.placed` (letters, digits, `_ . : -`, at most 128)"
    )
    occurred_at: AwareDatetime | None = Field(default=None, description="When it happened; now when omitted")
    properties: JsonObject = Field(
        default_factory=dict, description=f"Any JSON object, at most {MAX_JSON_DEPTH} levels deep"
    )

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        # Engagement and lifecycle events come from providers and services only: a key that could
        # record `email.opened` could steer every campaign condition that reads it.
        if value.lower().startswith(RESERVED_EVENT_PREFIXES):
            raise ValueError(
                f"types starting with {', '.join(RESERVED_EVENT_PREFIXES)} are recorded by Shoal itself"
            )
        return value


class RecordEventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "type": "order.placed",
                            "occurred_at": "2026-01-31T12:00:00Z",
                            "properties": {"total_cents": 2390},
                        }
                    ]
                }
            ]
        },
    )

    events: list[ContactEventInput] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsRecorded(BaseModel):
    recorded: int = Field(ge=0)


# -- proto <-> JSON -------------------------------------------------------------------------------------


def contact_json(msg: pb.Contact) -> Contact:
    return Contact(
        id=msg.id,
        external_id=text_or_none(msg.external_id),
        email=text_or_none(msg.email),
        phone=text_or_none(msg.phone),
        first_name=text_or_none(msg.first_name),
        last_name=text_or_none(msg.last_name),
        status=enum_from_pb(msg.status, pb.ContactStatus, "CONTACT_STATUS_", ContactStatus),
        tags=list(msg.tags),
        fields={name: field_value_json(msg.fields[name]) for name in sorted(msg.fields)},
        created_at=timestamp(msg.create_time),
        updated_at=timestamp(msg.update_time),
    )


def consent_input_pb(consent: ConsentInput) -> pb.ConsentInput:
    return pb.ConsentInput(
        channel=channel_pb(consent.channel),
        message_type=message_type_pb(consent.message_type),
        status=consent_status_pb(consent.status),
        source=checked_text(consent.source),
        proof=checked_text(consent.proof),
    )


def contact_input_pb(body: ContactInput) -> pb.ContactInput:
    """Raises ApiError 400 (paths relative to the contact) for what cannot be typed."""
    try:
        msg = pb.ContactInput(
            external_id=checked_text(body.external_id or ""),
            email=checked_text(body.email or ""),
            phone=checked_text(body.phone or ""),
            first_name=checked_text(body.first_name or ""),
            last_name=checked_text(body.last_name or ""),
            status=contact_status_pb(body.status) if body.status else pb.CONTACT_STATUS_UNSPECIFIED,
            tags=[checked_text(t) for t in body.tags or []],
            consents=[consent_input_pb(c) for c in body.consents or []],
        )
    except InvalidValue as exc:
        raise bad_request([ErrorDetail(field="request", message=str(exc))]) from None
    for name, value in fields_pb(body.fields or {}).items():
        msg.fields[name].CopyFrom(value)
    return msg


def consent_json(msg: pb.ConsentRecord) -> ConsentRecord:
    return ConsentRecord(
        channel=enum_from_pb(msg.channel, common_pb2.Channel, "CHANNEL_", Channel),
        message_type=enum_from_pb(msg.message_type, common_pb2.MessageType, "MESSAGE_TYPE_", MessageType),
        status=enum_from_pb(msg.status, pb.ConsentStatus, "CONSENT_STATUS_", ConsentStatus),
        source=text_or_none(msg.source),
        proof=text_or_none(msg.proof),
        recorded_at=timestamp(msg.record_time),
        confirmed_at=timestamp(msg.confirm_time) if msg.HasField("confirm_time") else None,
    )


_CONTACT = strip_prefix("contact")
_ROW = re.compile(r"^contacts\[(\d+)\]\.?")


def row_field(field: str) -> str:
    """`contacts[3].fields[plan]` -> `fields.plan` (the rejection carries the index)."""
    return json_path(_ROW.sub("", field)) or "row"


def row_error(exc: ValidationError | ApiError) -> tuple[str, str]:
    """(first field, reason) of a row refused here, in the service's rejection style."""
    if isinstance(exc, ApiError):
        pairs = [(d.field, d.message) for d in exc.details] or [("row", exc.message)]
    else:
        pairs = [(".".join(str(p) for p in e["loc"]) or "row", str(e["msg"])) for e in exc.errors()]
    first = pairs[0][0]
    reason = "; ".join(msg if field == first else f"{field}: {msg}" for field, msg in pairs)
    return first, reason


def import_rows(raw_rows: Sequence[Any]) -> tuple[list[pb.ContactInput], list[int], list[ImportRejection]]:
    """The rows to send, the original index of each, and the rows refused here (not sent)."""
    rows: list[pb.ContactInput] = []
    sent: list[int] = []
    rejected: list[ImportRejection] = []
    for index, raw in enumerate(raw_rows):
        try:
            rows.append(contact_input_pb(ContactInput.model_validate(raw)))
        except (ValidationError, ApiError) as exc:
            field, reason = row_error(exc)
            rejected.append(ImportRejection(index=index, field=field, reason=reason))
            continue
        sent.append(index)
    return rows, sent, rejected


# -- routes: contacts -------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    summary="Create a contact",
    description="Needs `contacts:write`. A duplicate `external_id` answers 409 `external_id_taken`.",
    response_model=Contact,
    responses={**COMMON, **CONFLICT},
)
async def create_contact(
    body: ContactInput,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Contact:
    reply = await rpc(
        backends.segments.CreateContact(
            pb.CreateContactRequest(workspace_id=principal.workspace_id, contact=contact_input_pb(body))
        ),
        _CONTACT,
    )
    return contact_json(reply.contact)


@router.post(
    "/upsert",
    summary="Create or update a contact",
    description=(
        "Matched by `external_id`, or by `email` when no `external_id` is given (one of them is "
        "required). A match is updated: given fields change, tags are replaced, custom fields are "
        "merged, consents are appended. Answers 200 with `created`. Needs `contacts:write`."
    ),
    response_model=Upserted,
    responses={**COMMON, **CONFLICT},
)
async def upsert_contact(
    body: ContactInput,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Upserted:
    reply = await rpc(
        backends.segments.UpsertContact(
            pb.UpsertContactRequest(workspace_id=principal.workspace_id, contact=contact_input_pb(body))
        ),
        _CONTACT,
    )
    return Upserted(created=reply.created, contact=contact_json(reply.contact))


_LIST_PARAMS = ("status", "tag", "email", "phone", "external_id", "segment_id")


@router.get(
    "",
    summary="List contacts",
    description=(
        "Oldest first, in pages (`limit`, `cursor`). Filters combine with AND: `status`, `tag` "
        "(repeat it: the contact must have every tag), `email` (matched lower-cased), `phone` "
        "(E.164), `external_id`, and `segment_id` (the members of a saved segment; 404 when "
        "unknown). Needs `contacts:read`."
    ),
    response_model=ContactPage,
    responses={**COMMON, 404: {"model": ErrorBody, "description": "No such segment (`segment_id`)"}},
)
async def list_contacts(
    *,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    status: Annotated[ContactStatus | None, Query(description="Only contacts in this status")] = None,
    tag: Annotated[
        list[str] | None, Query(max_length=20, description="Only contacts having this tag (repeatable)")
    ] = None,
    email: Annotated[str | None, Query(max_length=320)] = None,
    phone: Annotated[str | None, Query(max_length=32)] = None,
    external_id: Annotated[str | None, Query(max_length=255)] = None,
    segment_id: Annotated[str | None, Query(pattern=r"^seg_[A-Za-z0-9]{1,60}$")] = None,
) -> ContactPage:
    ws = principal.workspace_id
    leaves: list[tuple[str, pb.Filter]] = []

    def equals(name: str, value: str) -> pb.Filter:
        return pb.Filter(
            field=pb.FieldCondition(
                field=name, operator=pb.OPERATOR_EQ, value=common_pb2.FieldValue(string_value=value)
            )
        )

    try:
        if status is not None:
            leaves.append(("status", equals("status", status.value)))
        for t in tag or []:
            leaves.append(("tag", pb.Filter(tag=pb.TagCondition(tag=checked_text(t)))))
        if email is not None:
            leaves.append(("email", equals("email", checked_text(email.strip().lower()))))
        if phone is not None:
            leaves.append(("phone", equals("phone", checked_text(phone.strip()))))
        if external_id is not None:
            leaves.append(("external_id", equals("external_id", checked_text(external_id.strip()))))
    except InvalidValue as exc:
        raise bad_request([ErrorDetail(field="query", message=str(exc))]) from None
    if segment_id is not None:
        segment = await rpc(
            backends.segments.GetSegment(pb.GetSegmentRequest(workspace_id=ws, segment_id=segment_id))
        )
        if segment.segment.filter.WhichOneof("expr") is not None:
            leaves.append(("segment_id", segment.segment.filter))
    request = pb.ListContactsRequest(
        workspace_id=ws, page=common_pb2.PageRequest(page_size=limit, page_token=cursor or "")
    )
    if leaves:
        request.filter.all_of.filters.extend(f for _, f in leaves)
    names = {f"filter.all_of.filters[{i}]": name for i, (name, _) in enumerate(leaves)}

    def rename(field: str) -> str:
        if field.startswith("page.page_token"):
            return "cursor"
        for prefix, name in names.items():
            if field == prefix or field.startswith(prefix + "."):
                return name
        return json_path(field)

    reply = await rpc(backends.segments.ListContacts(request), rename, filter_status=400)
    return ContactPage(
        items=[contact_json(c) for c in reply.contacts], next_cursor=reply.page.next_page_token or None
    )


@router.post(
    "/import",
    summary="Bulk import contacts",
    description=(
        'Up to 10,000 contacts in one JSON body `{"contacts": [...]}` (more: 400 naming '
        "`contacts`). Each row is created or updated like an upsert; a bad row is rejected on its "
        "own and never stops the others. Answers `{imported, updated, rejected: [{index, field, "
        "reason}]}` (index into `contacts`, field relative to the row). The `shoal contacts "
        "import` CLI calls this in chunks. Needs `contacts:write`."
    ),
    response_model=ImportResult,
    responses={
        **COMMON,
        413: {
            "model": ErrorBody,
            "description": "The body is larger than the gateway accepts (2 MiB default)",
        },
    },
)
async def import_contacts(
    body: ImportRequest,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> ImportResult:
    # 10,000 rows take ~0.15 s of CPU to check and convert: off the event loop.
    rows, sent, rejected = await asyncio.to_thread(import_rows, body.contacts)
    imported = updated = 0
    if rows:
        reply = await rpc(
            backends.segments.ImportContacts(
                pb.ImportContactsRequest(workspace_id=principal.workspace_id, contacts=rows),
                timeout=IMPORT_TIMEOUT_SECONDS,
            )
        )
        imported, updated = reply.imported, reply.updated
        for r in reply.rejected:
            rejected.append(ImportRejection(index=sent[r.index], field=row_field(r.field), reason=r.reason))
    return ImportResult(imported=imported, updated=updated, rejected=sorted(rejected, key=lambda r: r.index))


@router.get(
    "/{contact_id}",
    summary="Get a contact",
    description="Needs `contacts:read`.",
    response_model=Contact,
    responses={**COMMON, **NOT_FOUND},
)
async def get_contact(
    contact_id: ContactIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Contact:
    reply = await rpc(
        backends.segments.GetContact(
            pb.GetContactRequest(workspace_id=principal.workspace_id, contact_id=contact_id)
        )
    )
    return contact_json(reply.contact)


@router.patch(
    "/{contact_id}",
    summary="Update a contact",
    description=(
        "Partial: only the fields given change. `tags` replaces the tags, `fields` is merged into "
        'the custom fields (`null` removes one), a text field set to `null` or `""` is cleared. '
        "Needs `contacts:write`."
    ),
    response_model=Contact,
    responses={**COMMON, **NOT_FOUND, **CONFLICT},
)
async def update_contact(
    contact_id: ContactIdPath,
    body: ContactPatch,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Contact:
    ws = principal.workspace_id
    given = body.model_fields_set
    if not given:
        reply = await rpc(
            backends.segments.GetContact(pb.GetContactRequest(workspace_id=ws, contact_id=contact_id))
        )
        return contact_json(reply.contact)
    problems = [
        ErrorDetail(field=name, message=rule)
        for name, rule in (
            ("status", "cannot be cleared"),
            ("fields", "must be an object (null inside removes a field)"),
        )
        if name in given and getattr(body, name) is None
    ]
    if problems:
        raise bad_request(problems)
    msg = contact_input_pb(
        ContactInput(
            external_id=body.external_id,
            email=body.email,
            phone=body.phone,
            first_name=body.first_name,
            last_name=body.last_name,
            status=body.status,
            tags=body.tags,
            fields=body.fields,
        )
    )
    reply = await rpc(
        backends.segments.UpdateContact(
            pb.UpdateContactRequest(
                workspace_id=ws, contact_id=contact_id, contact=msg, update_mask=sorted(given)
            )
        ),
        _CONTACT,
    )
    return contact_json(reply.contact)


@router.delete(
    "/{contact_id}",
    status_code=204,
    summary="Delete a contact",
    description=(
        "Deletes the contact with its tags, fields, consent records and events. Needs `contacts:write`."
    ),
    response_class=Response,
    responses={**COMMON, **NOT_FOUND},
)
async def delete_contact(
    contact_id: ContactIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Response:
    await rpc(
        backends.segments.DeleteContact(
            pb.DeleteContactRequest(workspace_id=principal.workspace_id, contact_id=contact_id)
        )
    )
    return Response(status_code=204)


# -- routes: tags ------------------------------------------------------------------------------------------

TagPath = Annotated[
    str, Path(min_length=1, max_length=64, description="The tag (surrounding spaces are trimmed)")
]


@router.post(
    "/{contact_id}/tags/{tag}",
    summary="Add a tag",
    description=(
        "Idempotent: adding a tag the contact has answers 200 with `changed: false`. Needs `contacts:write`."
    ),
    response_model=TagChanged,
    responses={**COMMON, **NOT_FOUND},
)
async def add_tag(
    contact_id: ContactIdPath,
    tag: TagPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> TagChanged:
    reply = await rpc(
        backends.segments.AddTag(
            pb.AddTagRequest(workspace_id=principal.workspace_id, contact_id=contact_id, tag=tag)
        )
    )
    return TagChanged(tag=tag.strip(), changed=reply.changed)


@router.delete(
    "/{contact_id}/tags/{tag}",
    status_code=204,
    summary="Remove a tag",
    description=(
        "Idempotent: removing a tag the contact does not have answers 204 too. Needs `contacts:write`."
    ),
    response_class=Response,
    responses={**COMMON, **NOT_FOUND},
)
async def remove_tag(
    contact_id: ContactIdPath,
    tag: TagPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Response:
    await rpc(
        backends.segments.RemoveTag(
            pb.RemoveTagRequest(workspace_id=principal.workspace_id, contact_id=contact_id, tag=tag)
        )
    )
    return Response(status_code=204)


# -- routes: consent ----------------------------------------------------------------------------------------


@router.get(
    "/{contact_id}/consent",
    summary="Consent records of a contact",
    description=(
        "`current`: the record in force per channel + message type; `history`: every record, "
        "oldest first. Needs `contacts:read`."
    ),
    response_model=ContactConsent,
    responses={**COMMON, **NOT_FOUND},
)
async def get_consent(
    contact_id: ContactIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> ContactConsent:
    ws = principal.workspace_id
    current, history = await asyncio.gather(
        rpc(backends.segments.ListConsent(pb.ListConsentRequest(workspace_id=ws, contact_id=contact_id))),
        rpc(
            backends.segments.ListConsent(
                pb.ListConsentRequest(workspace_id=ws, contact_id=contact_id, include_history=True)
            )
        ),
    )
    return ContactConsent(
        current=[consent_json(c) for c in current.consents],
        history=[consent_json(c) for c in history.consents],
    )


@router.post(
    "/{contact_id}/consent",
    status_code=201,
    summary="Record consent",
    description=(
        "Appends a consent record (GRANTED, REVOKED, or PENDING for a double opt-in not yet "
        "confirmed) for one channel + message type, with its source and proof. `confirm: true` "
        "confirms the PENDING double opt-in (409 `consent_not_pending` when there is none). "
        "Answers the new record. Needs `contacts:write`."
    ),
    response_model=ConsentRecord,
    responses={
        **COMMON,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "`confirm` without a PENDING record"},
    },
)
async def set_consent(
    contact_id: ContactIdPath,
    body: ConsentChange,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> ConsentRecord:
    try:
        consent = pb.ConsentInput(
            channel=channel_pb(body.channel),
            message_type=message_type_pb(body.message_type),
            status=consent_status_pb(body.status) if body.status else pb.CONSENT_STATUS_UNSPECIFIED,
            source=checked_text(body.source),
            proof=checked_text(body.proof),
        )
    except InvalidValue as exc:
        raise bad_request([ErrorDetail(field="request", message=str(exc))]) from None
    reply = await rpc(
        backends.segments.SetConsent(
            pb.SetConsentRequest(
                workspace_id=principal.workspace_id,
                contact_id=contact_id,
                consent=consent,
                confirm=body.confirm,
            )
        ),
        strip_prefix("consent"),
    )
    return consent_json(reply.consent)


# -- routes: events ------------------------------------------------------------------------------------------


@router.post(
    "/{contact_id}/events",
    status_code=201,
    summary="Record custom events",
    description=(
        "Stores up to 1,000 events of the contact (type, time, properties). 201: the events are "
        "stored when the answer is sent (segments and campaign conditions see them at once); "
        "event-triggered campaigns react to them asynchronously. Needs `contacts:write`."
    ),
    response_model=EventsRecorded,
    responses={**COMMON, **NOT_FOUND},
)
async def record_events(
    contact_id: ContactIdPath,
    body: RecordEventsRequest,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> EventsRecorded:
    events = []
    for i, event in enumerate(body.events):
        item = pb.ContactEventInput(contact_id=contact_id, type=event.type)
        if event.occurred_at is not None:
            try:
                item.occur_time.FromDatetime(event.occurred_at.astimezone(UTC))
            except (OverflowError, ValueError):
                raise bad_request(
                    [ErrorDetail(field=f"events.{i}.occurred_at", message="is out of range")]
                ) from None
        try:
            item.properties.update(event.properties)
        except (ValueError, TypeError, OverflowError, UnicodeError):
            raise bad_request(
                [ErrorDetail(field=f"events.{i}.properties", message="holds a value JSON cannot carry")]
            ) from None
        events.append(item)
    reply = await rpc(
        backends.segments.RecordEvents(
            pb.RecordEventsRequest(workspace_id=principal.workspace_id, events=events)
        ),
        json_path,
    )
    if reply.recorded == 0:
        # The service skips events of unknown contacts; all of these are for one contact.
        raise ApiError(404, "not_found", f"contact {contact_id} not found")
    return EventsRecorded(recorded=reply.recorded)
