"""Contact input rules and the plain values the repository stores and returns.

Everything from outside is checked here, before any query: email syntax (email-validator, no DNS),
phones parsed and normalised to E.164 (phonenumbers), the status enum, custom field names and typed
values, tags. A rule broken raises `InvalidArgument` naming the field (`contact.phone`,
`contact.fields[plan]`) and the rule, so callers can show it next to the input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

import email_validator
import phonenumbers
from email_validator import EmailNotValidError, validate_email

from shoal.errors import FieldViolation, InvalidArgument
from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as pb

ACTIVE = pb.CONTACT_STATUS_ACTIVE
STATUSES = frozenset(
    {
        pb.CONTACT_STATUS_ACTIVE,
        pb.CONTACT_STATUS_UNSUBSCRIBED,
        pb.CONTACT_STATUS_BOUNCED,
        pb.CONTACT_STATUS_BLOCKED,
    }
)
CHANNELS = frozenset({common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_RCS})
MESSAGE_TYPES = frozenset(
    {
        common_pb2.MESSAGE_TYPE_MESSAGE,
        common_pb2.MESSAGE_TYPE_CONVERSATION,
        common_pb2.MESSAGE_TYPE_NEWSLETTER,
    }
)
CONSENT_STATUSES = frozenset(
    {pb.CONSENT_STATUS_GRANTED, pb.CONSENT_STATUS_REVOKED, pb.CONSENT_STATUS_PENDING}
)

_CONTROL = re.compile(r"[\x00-\x1f]")
FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
EVENT_TYPE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TAGS = 100
MAX_TAG_LENGTH = 64
MAX_FIELDS = 100
MAX_STRING_VALUE = 4096
MAX_NAME = 255
MAX_EXTERNAL_ID = 255

FieldKind = Literal["string", "number", "bool", "timestamp"]
FieldScalar = str | float | bool | datetime

# ContactInput fields an update_mask may name.
MASKABLE = frozenset(
    {"external_id", "email", "phone", "first_name", "last_name", "status", "tags", "fields", "consents"}
)


@dataclass(frozen=True)
class FieldVal:
    kind: FieldKind
    value: FieldScalar


@dataclass(frozen=True)
class ConsentData:
    channel: int
    message_type: int
    status: int
    source: str = ""
    proof: str = ""


@dataclass
class ContactData:
    """A validated ContactInput; `None` means "not given" (kept as is on update)."""

    external_id: str | None = None
    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    status: int | None = None
    tags: list[str] | None = None
    # A name mapped to None removes that field on merge.
    fields: dict[str, FieldVal | None] = field(default_factory=dict)
    consents: list[ConsentData] = field(default_factory=list)


@dataclass(frozen=True)
class ContactView:
    """A stored contact, as the service hands it out (never an ORM object)."""

    id: str
    workspace_id: str
    external_id: str | None
    email: str | None
    phone: str | None
    first_name: str | None
    last_name: str | None
    status: int
    tags: tuple[str, ...]
    fields: Mapping[str, FieldVal]
    created_at: datetime
    updated_at: datetime


# -- single values ------------------------------------------------------------------------------


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The local parts email-validator accepts as they are: RFC 5322 dot-atom of ASCII atext (its own
# DOT_ATOM_TEXT rule), followed by one @ and an ASCII domain of hostname characters.
_ATEXT = r"a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~"
_PLAIN_EMAIL = re.compile(rf"([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@([A-Za-z0-9.\-]{{1,253}})")
_EMAIL_MAX_LENGTH = 254  # email-validator's limit, on the original, normalised and ASCII forms


@lru_cache(maxsize=16384)
def _plain_domain(domain: str, test_environment: bool, globally_deliverable: bool) -> tuple[str, int] | None:
    """(normalised domain, its longest form's length) when email-validator accepts `domain`.

    Asked through the library itself, with a local part it always accepts: the domain rules
    (labels, IDNA, special-use names, a dot for global deliverability) depend on nothing else.
    The two library defaults that change those rules are part of the cache key.
    """
    try:
        info = validate_email("a@" + domain, check_deliverability=False)
    except EmailNotValidError:
        return None
    longest = max(len(domain), len(info.domain.encode("utf-8")), len(info.ascii_domain or ""))
    return info.domain, longest


def normalise_email(raw: str) -> str:
    """Email syntax only (no DNS): the normalised form, lower-cased, or ValueError with the reason.

    Lower-casing the local part too is what users expect from "upsert by email" (Ada@ and ada@
    are one person at every mailbox provider that matters), and it keeps matching a plain
    indexed equality on SQLite and PostgreSQL alike.

    email-validator decides every address. Its domain checks (UTS-46, IDNA) are most of its cost
    and the same for every address of a domain, so a plain address (ASCII dot-atom local part,
    which the library accepts as is) is checked once per domain; anything else, and anything
    refused, goes through the whole validation, which also words the error.
    """
    plain = _PLAIN_EMAIL.fullmatch(raw)
    if plain is not None:
        known = _plain_domain(
            plain.group(2), email_validator.TEST_ENVIRONMENT, email_validator.GLOBALLY_DELIVERABLE
        )
        local = plain.group(1)
        # 64: the local part limit the library enforces only in strict mode; longer ones take the
        # whole validation whatever the mode.
        if known is not None and len(local) <= 64 and len(local) + 1 + known[1] <= _EMAIL_MAX_LENGTH:
            return f"{local}@{known[0]}".lower()
    try:
        return validate_email(raw, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from None


def normalise_phone(raw: str) -> str:
    """An international number in E.164, or ValueError with the rule."""
    if not raw.startswith("+"):
        raise ValueError("must be an international number starting with + (E.164)")
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def parse_timestamp(raw: str) -> datetime:
    """RFC 3339 with an explicit offset, as a UTC datetime; ValueError otherwise."""
    if len(raw) > 64 or "T" not in raw.upper():
        raise ValueError("must be an RFC 3339 timestamp like 2026-01-31T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError("must be an RFC 3339 timestamp like 2026-01-31T12:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must carry a time zone offset (Z or +hh:mm)")
    return parsed.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    return as_utc(value).isoformat().replace("+00:00", "Z")


def field_value(value: common_pb2.FieldValue) -> FieldVal | None:
    """The typed value of a FieldValue (None when no kind is set); ValueError on a bad value."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "string_value":
        if len(value.string_value) > MAX_STRING_VALUE:
            raise ValueError(f"string longer than {MAX_STRING_VALUE} characters")
        if "\x00" in value.string_value:
            # PostgreSQL text cannot hold NUL and SQLite cuts strings at it.
            raise ValueError("must not contain NUL characters")
        return FieldVal("string", value.string_value)
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            raise ValueError("number must be finite")
        return FieldVal("number", float(value.number_value))
    if kind == "bool_value":
        return FieldVal("bool", bool(value.bool_value))
    return FieldVal("timestamp", parse_timestamp(value.timestamp_value))


def field_value_pb(value: FieldVal) -> common_pb2.FieldValue:
    if value.kind == "string":
        return common_pb2.FieldValue(string_value=str(value.value))
    if value.kind == "number":
        return common_pb2.FieldValue(number_value=float(value.value))  # type: ignore[arg-type]
    if value.kind == "bool":
        return common_pb2.FieldValue(bool_value=bool(value.value))
    assert isinstance(value.value, datetime)
    return common_pb2.FieldValue(timestamp_value=format_timestamp(value.value))


def normalise_tag(raw: str) -> str:
    tag = raw.strip()
    if not tag:
        raise ValueError("must not be empty")
    if len(tag) > MAX_TAG_LENGTH:
        raise ValueError(f"must be at most {MAX_TAG_LENGTH} characters")
    if _CONTROL.search(tag) is not None:
        raise ValueError("must not contain control characters")
    return tag


# -- JSON documents on the contact row ------------------------------------------------------------


# json.dumps(doc, separators=(",", ":")), without building an encoder per call.
_to_json = json.JSONEncoder(separators=(",", ":")).encode


def fields_to_json(fields: Mapping[str, FieldVal]) -> str:
    doc = {
        name: [v.kind, format_timestamp(v.value) if isinstance(v.value, datetime) else v.value]
        for name, v in sorted(fields.items())
    }
    return _to_json(doc)


def fields_from_json(text: str) -> dict[str, FieldVal]:
    out: dict[str, FieldVal] = {}
    for name, (kind, raw) in json.loads(text).items():
        value: FieldScalar = parse_timestamp(raw) if kind == "timestamp" else raw
        out[name] = FieldVal(kind, value)
    return out


@lru_cache(maxsize=4096)
def tag_set(tags: tuple[str, ...]) -> tuple[str, ...]:
    """Tags as they are stored: unique, sorted. Cached: an import repeats a few tag lists."""
    return tuple(sorted(set(tags)))


@lru_cache(maxsize=4096)
def _tag_set_json(tags: tuple[str, ...]) -> str:
    return _to_json(tag_set(tags))


def tags_to_json(tags: Iterable[str]) -> str:
    return _tag_set_json(tuple(tags))


def tags_from_json(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


# -- whole inputs ---------------------------------------------------------------------------------


def _text(value: str, name: str, limit: int, violations: list[FieldViolation], prefix: str) -> str | None:
    value = value.strip()
    if len(value) > limit:
        violations.append(FieldViolation(f"{prefix}.{name}", f"must be at most {limit} characters"))
        return None
    if "\x00" in value:
        violations.append(FieldViolation(f"{prefix}.{name}", "must not contain NUL characters"))
        return None
    return value or None


def parse_contact_input(
    msg: pb.ContactInput, *, prefix: str = "contact", only: frozenset[str] | None = None
) -> ContactData:
    """Validate a ContactInput; `only` limits it to the update_mask fields.

    Empty strings mean "not given", so a partial input never blanks a stored value; to clear one,
    name it in an update_mask (an empty value then clears it).
    """
    violations: list[FieldViolation] = []
    data = ContactData()
    every = only is None
    # Without a mask every field is wanted: MASKABLE names them all.
    chosen = MASKABLE if only is None else only

    if "external_id" in chosen:
        data.external_id = _text(msg.external_id, "external_id", MAX_EXTERNAL_ID, violations, prefix)
    if "first_name" in chosen:
        data.first_name = _text(msg.first_name, "first_name", MAX_NAME, violations, prefix)
    if "last_name" in chosen:
        data.last_name = _text(msg.last_name, "last_name", MAX_NAME, violations, prefix)
    if "email" in chosen:
        email = msg.email.strip()
        if email:
            try:
                data.email = normalise_email(email)
            except ValueError as exc:
                violations.append(FieldViolation(f"{prefix}.email", str(exc)))
    if "phone" in chosen:
        phone = msg.phone.strip()
        if phone:
            try:
                data.phone = normalise_phone(phone)
            except ValueError as exc:
                violations.append(FieldViolation(f"{prefix}.phone", str(exc)))
    if "status" in chosen:
        status = msg.status
        if status in STATUSES:
            data.status = status
        elif status != pb.CONTACT_STATUS_UNSPECIFIED or not every:
            violations.append(
                FieldViolation(f"{prefix}.status", "must be ACTIVE, UNSUBSCRIBED, BOUNCED or BLOCKED")
            )
    raw_tags = msg.tags
    if "tags" in chosen and (raw_tags or not every):
        if len(raw_tags) > MAX_TAGS:
            violations.append(FieldViolation(f"{prefix}.tags", f"at most {MAX_TAGS} tags"))
        tags: list[str] = []
        for i, raw in enumerate(raw_tags):
            try:
                tag = normalise_tag(raw)
            except ValueError as exc:
                violations.append(FieldViolation(f"{prefix}.tags[{i}]", str(exc)))
                continue
            if tag not in tags:
                tags.append(tag)
        data.tags = tags
    if "fields" in chosen:
        raw_fields = msg.fields
        if len(raw_fields) > MAX_FIELDS:
            violations.append(FieldViolation(f"{prefix}.fields", f"at most {MAX_FIELDS} custom fields"))
        for name in sorted(raw_fields):
            if not FIELD_NAME_RE.match(name):
                violations.append(
                    FieldViolation(
                        f"{prefix}.fields",
                        f"name {name[:80]!r} must match {FIELD_NAME_RE.pattern} (letters, digits, _)",
                    )
                )
                continue
            try:
                data.fields[name] = field_value(raw_fields[name])
            except ValueError as exc:
                violations.append(FieldViolation(f"{prefix}.fields[{name}]", str(exc)))
    if "consents" in chosen:
        for i, consent in enumerate(msg.consents):
            try:
                data.consents.append(parse_consent_input(consent))
            except InvalidArgument as exc:
                violations.extend(
                    FieldViolation(f"{prefix}.consents[{i}].{v.field}", v.description) for v in exc.violations
                )
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations
        )
    return data


def import_keys(items: Iterable[pb.ContactInput]) -> tuple[set[str], set[str]]:
    """(external ids, emails) the rows of an import may match stored contacts by, before validation.

    A valid row is matched by its external_id, else by its email, exactly as parse_contact_input
    normalises them: every such key is in here (and maybe keys of rows validation refuses later),
    so an import can look them all up before it writes its first row.
    """
    external_ids: set[str] = set()
    emails: set[str] = set()
    for item in items:
        external_id = item.external_id.strip()
        if external_id:
            external_ids.add(external_id)
            continue
        email = item.email.strip()
        # An email refused here is refused by validation too: that row matches nothing.
        if email:
            with suppress(ValueError):
                emails.add(normalise_email(email))
    return external_ids, emails


def parse_consent_input(msg: pb.ConsentInput, *, allow_unspecified_status: bool = False) -> ConsentData:
    """Violations are named relative to the ConsentInput (`channel`, `status`, ...)."""
    violations: list[FieldViolation] = []
    if msg.channel not in CHANNELS:
        violations.append(FieldViolation("channel", "must be EMAIL, SMS or RCS"))
    if msg.message_type not in MESSAGE_TYPES:
        violations.append(FieldViolation("message_type", "must be MESSAGE, CONVERSATION or NEWSLETTER"))
    if msg.status not in CONSENT_STATUSES and not (
        allow_unspecified_status and msg.status == pb.CONSENT_STATUS_UNSPECIFIED
    ):
        violations.append(FieldViolation("status", "must be GRANTED, REVOKED or PENDING"))
    if len(msg.source) > 255:
        violations.append(FieldViolation("source", "must be at most 255 characters"))
    if len(msg.proof) > 10_000:
        violations.append(FieldViolation("proof", "must be at most 10000 characters"))
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations
        )
    return ConsentData(msg.channel, msg.message_type, msg.status, msg.source.strip(), msg.proof)


def parse_update_mask(paths: Iterable[str]) -> frozenset[str] | None:
    """None when no mask was given (apply everything that is set)."""
    mask = frozenset(p.strip() for p in paths)
    if not mask:
        return None
    unknown = sorted(mask - MASKABLE)
    if unknown:
        raise InvalidArgument.of(
            "update_mask", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(MASKABLE))}"
        )
    return mask


def contact_pb(view: ContactView) -> pb.Contact:
    msg = pb.Contact(
        id=view.id,
        workspace_id=view.workspace_id,
        external_id=view.external_id or "",
        email=view.email or "",
        phone=view.phone or "",
        first_name=view.first_name or "",
        last_name=view.last_name or "",
        status=view.status,  # type: ignore[arg-type]
        tags=list(view.tags),
    )
    for name, value in view.fields.items():
        msg.fields[name].CopyFrom(field_value_pb(value))
    msg.create_time.FromDatetime(view.created_at)
    msg.update_time.FromDatetime(view.updated_at)
    return msg


def row_to_view(row: Any) -> ContactView:
    """A Core row of the contacts table as a ContactView."""
    return ContactView(
        id=row.id,
        workspace_id=row.workspace_id,
        external_id=row.external_id,
        email=row.email,
        phone=row.phone,
        first_name=row.first_name,
        last_name=row.last_name,
        status=row.status,
        tags=tags_from_json(row.tags_json),
        fields=fields_from_json(row.fields_json),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )
