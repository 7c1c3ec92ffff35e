"""`/v1/templates`: message templates, their immutable versions, publishing and preview.

Over `shoal.v1.TemplateService`. The JSON mirrors the proto's shapes (content per channel:
`email`, `sms` or `rcs`) with PRODUCT.md names for enums, so the field paths the template
service names in its errors (`content.sms.text: longer than 1600 characters`) are the paths of
the request body. Content a channel cannot carry is the service's `validation_failed` (400), as
every other field rule; a preview that cannot render (a missing required variable) is 422.

The helpers shared with the billing router (billing units, proto enum conversions, the error
translation, the common error responses) live here too; channels and message types are the ones
of `gateway.flows`, as in every router.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import APIRouter, Body, Depends, Path, Query
from google.protobuf import struct_pb2, timestamp_pb2
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from gateway.auth import require
from gateway.backends import Backends, get_backends
from gateway.errors import ApiError, ErrorBody, ErrorDetail, RateLimitedBody
from gateway.flows import Channel, MessageType
from gateway.keys import Principal, Scope
from gateway.payloads import JsonObject
from shoal.errors import FieldViolation, ShoalError, from_rpc_error
from shoal.v1 import common_pb2, template_pb2

router = APIRouter(prefix="/v1/templates", tags=["templates"])

INT32_MAX = 2**31 - 1
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 500


# --- shared with the billing router ---------------------------------------------------------------


def common_responses(service: str, not_found: str | None = None) -> dict[int | str, dict[str, Any]]:
    """400/401/403/(404)/429/503 in the error shape, as every route documents them."""
    out: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "Malformed request; `details` name each field"},
        401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
        403: {"model": ErrorBody, "description": "The key lacks the scope"},
        429: {
            "model": RateLimitedBody,
            "description": "The key's rate limit is spent; see `Retry-After`",
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
        },
        503: {"model": ErrorBody, "description": f"The {service} service is unavailable"},
    }
    if not_found:
        out[404] = {"model": ErrorBody, "description": not_found}
    return out


class BillingUnit(enum.StrEnum):
    """What one message is billed as: an email, an SMS segment, a basic or a single RCS message."""

    EMAIL = "EMAIL"
    SMS_SEGMENT = "SMS_SEGMENT"
    RCS_BASIC = "RCS_BASIC"
    RCS_SINGLE = "RCS_SINGLE"


_E = TypeVar("_E", bound=enum.StrEnum)


def _from_proto(kind: type[_E], enum_type: Any, prefix: str, value: int) -> _E:
    try:
        return kind(enum_type.Name(value).removeprefix(prefix))
    except ValueError:
        # UNSPECIFIED or a value this gateway does not know yet: a bug upstream, not the client's.
        raise ShoalError(
            f"upstream answered an unknown {kind.__name__} {value}", "bad_upstream_value"
        ) from None


def channel_name(value: int) -> Channel:
    return _from_proto(Channel, common_pb2.Channel, "CHANNEL_", value)


def channel_value(channel: Channel) -> str:
    """The proto enum's name, which proto constructors take as the value."""
    return f"CHANNEL_{channel.value}"


def message_type_name(value: int) -> MessageType:
    return _from_proto(MessageType, common_pb2.MessageType, "MESSAGE_TYPE_", value)


def message_type_value(message_type: MessageType) -> str:
    return f"MESSAGE_TYPE_{message_type.value}"


def billing_unit_name(value: int) -> BillingUnit:
    return _from_proto(BillingUnit, common_pb2.BillingUnit, "BILLING_UNIT_", value)


def billing_unit_value(unit: BillingUnit) -> str:
    return f"BILLING_UNIT_{unit.value}"


def time_of(ts: timestamp_pb2.Timestamp | None) -> datetime | None:
    """An RFC 3339 UTC time, or None for an unset proto timestamp."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=UTC)


Limit = Annotated[
    int,
    Query(
        ge=1, le=LIST_LIMIT_MAX, description=f"Items per page (1..{LIST_LIMIT_MAX}; the service may cap it)"
    ),
]
Cursor = Annotated[
    str | None,
    Query(max_length=200, description="`next_cursor` of the previous page; omitted for the first page"),
]


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: JSON can escape it, protobuf cannot carry it.
        raise ValueError("must be valid Unicode text") from None
    return value


# Every string a request body hands to a service.
Text = Annotated[str, AfterValidator(_unicode)]


def bad_request(field: str, message: str) -> ApiError:
    return ApiError(
        400, "validation_failed", f"{field}: {message}", details=[ErrorDetail(field=field, message=message)]
    )


def checked_cursor(cursor: str | None) -> str:
    """The services' page tokens are row numbers: anything else is refused here, with a 400."""
    if cursor is None:
        return ""
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
        raise bad_request("cursor", "is not a cursor this API returned")
    return cursor


_INDEX = re.compile(r"\[(\d+)\]")


def rest_field(field: str, renames: Mapping[str, str]) -> str:
    """The request-body path of a proto field path (`price.cents` -> `amount_cents`, `[0]` -> `.0`)."""
    for old, new in sorted(renames.items(), key=lambda kv: -len(kv[0])):
        if field == old or field.startswith((old + ".", old + "[")):
            rest = field[len(old) :]
            field = new + rest if new else rest.lstrip(".")
            break
    return _INDEX.sub(r".\1", field)


def _semantic_code(
    error: ShoalError,
    violations: Sequence[FieldViolation],
    semantic_reasons: Sequence[str],
    semantic_fields: Mapping[str, str],
) -> str | None:
    if error.code != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    if error.reason in semantic_reasons:
        return error.reason
    for v in violations:
        for prefix, code in semantic_fields.items():
            if v.field == prefix or v.field.startswith(prefix + "."):
                # The service's own reason when it has one (balance_limit), else the route's.
                return code if error.reason == "validation_failed" else error.reason
    return None


def rest_error(
    error: ShoalError,
    renames: Mapping[str, str] = {},  # read only
    semantic_reasons: Sequence[str] = (),
    semantic_fields: Mapping[str, str] = {},  # read only
) -> Exception:
    """A service's error in REST terms: field paths of the body; 422 for broken business rules.

    A service answers INVALID_ARGUMENT (400) for every rule; the ones that are semantic rules of
    the product (a minimum top-up, the balance limit, a missing price) are named by reason, or by
    field (with the error code to answer), and become 422. Every 404 is `not_found`.
    """
    message = error.message
    violations: list[FieldViolation] = []
    for v in error.violations:
        path = rest_field(v.field, renames)
        message = message.replace(v.field, path)
        violations.append(FieldViolation(path, v.description))
    code = _semantic_code(error, violations, semantic_reasons, semantic_fields)
    if code is not None:
        details = [ErrorDetail(field=v.field, message=v.description) for v in violations]
        return ApiError(422, code, message, details=details)
    if error.code == grpc.StatusCode.NOT_FOUND:
        error.reason = "not_found"
    error.message = message
    error.violations = violations
    return error


@contextmanager
def upstream(
    renames: Mapping[str, str] = {},  # read only
    *,
    semantic_reasons: Sequence[str] = (),
    semantic_fields: Mapping[str, str] = {},  # read only
) -> Iterator[None]:
    """Translate the errors of the gRPC calls made inside the block (see `rest_error`)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise rest_error(from_rpc_error(exc), renames, semantic_reasons, semantic_fields) from None


_PAGE_FIELDS = {"page.page_token": "cursor", "page.page_size": "limit"}


# --- the models -------------------------------------------------------------------------------------


class TemplateState(enum.StrEnum):
    """DRAFT until published; RCS goes through the provider's approval (PENDING_APPROVAL)."""

    DRAFT = "DRAFT"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    PUBLISHED = "PUBLISHED"
    REJECTED = "REJECTED"


class VariableType(enum.StrEnum):
    STRING = "STRING"
    NUMBER = "NUMBER"
    BOOLEAN = "BOOLEAN"
    TIMESTAMP = "TIMESTAMP"


class Variable(BaseModel):
    """A variable the content references as `{{ contact.first_name }}` or `{{ data.order.id }}`."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(
        min_length=1,
        max_length=200,
        description="Dotted path: `contact.<field>` or `data.<name>[.<name>...]`, lower case",
    )
    type: VariableType = VariableType.STRING
    required: bool = Field(default=False, description="Rendering without a value is an error")
    default: Text | None = Field(
        default=None,
        description="Used when the value is absent (not for required variables); as text: `42`, `true`",
    )


class EmailContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: Text = Field(description="One line, at most 998 characters")
    html: Text | None = None
    text: Text | None = Field(default=None, description="Derived from `html` when omitted")


class SmsContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(description="At most 1600 characters; its length decides the SMS segments billed")


class Suggestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(description="The chip's label, at most 25 characters")
    postback: Text | None = Field(default=None, description="Sent back when the contact taps a reply chip")
    url: Text | None = Field(default=None, description="An http(s) URL the chip opens")


class RichCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Text | None = None
    description: Text | None = None
    media_url: Text | None = Field(default=None, description="An https URL")
    suggestions: list[Suggestion] = Field(default_factory=list, description="At most 4")


class RcsContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text | None = Field(
        default=None, description="Up to 160 characters of plain text is an RCS basic message"
    )
    suggestions: list[Suggestion] = Field(default_factory=list, description="At most 11")
    rich_card: RichCard | None = None
    carousel: list[RichCard] = Field(default_factory=list, description="2 to 10 cards; not with `rich_card`")


class TemplateContent(BaseModel):
    """Exactly one of `email`, `sms`, `rcs`: the one of the template's channel."""

    model_config = ConfigDict(extra="forbid")

    email: EmailContent | None = None
    sms: SmsContent | None = None
    rcs: RcsContent | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TemplateContent:
        if sum(part is not None for part in (self.email, self.sms, self.rcs)) != 1:
            raise ValueError("exactly one of email, sms, rcs")
        return self


class TemplateVersion(BaseModel):
    """One immutable version: its content, variables and state."""

    template_id: str
    version: int = Field(ge=1)
    state: TemplateState
    content: TemplateContent
    variables: list[Variable]
    rejection_reason: str | None = Field(description="Why it was REJECTED; null otherwise")
    created_at: datetime
    published_at: datetime | None


_EXAMPLE_CONTENT: dict[str, Any] = {
    "email": {"subject": "Welcome {{ contact.first_name }}", "html": "<p>Hi!</p>"}
}
_EXAMPLE_VARIABLES: list[Any] = [{"name": "contact.first_name", "type": "STRING", "required": True}]


class Template(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "tpl_5d0c8f6e2b1a4c7d9e3f0a1b2c3d4e5f",
                    "name": "welcome",
                    "channel": "EMAIL",
                    "message_type": "MESSAGE",
                    "latest_version": 1,
                    "published_version": None,
                    "current": {
                        "template_id": "tpl_5d0c8f6e2b1a4c7d9e3f0a1b2c3d4e5f",
                        "version": 1,
                        "state": "DRAFT",
                        "content": _EXAMPLE_CONTENT,
                        "variables": [{**_EXAMPLE_VARIABLES[0], "default": None}],
                        "rejection_reason": None,
                        "created_at": "2025-03-01T09:30:00Z",
                        "published_at": None,
                    },
                    "created_at": "2025-03-01T09:30:00Z",
                    "updated_at": "2025-03-01T09:30:00Z",
                }
            ]
        }
    )

    id: str = Field(description="`tpl_...`")
    name: str
    channel: Channel
    message_type: MessageType
    latest_version: int = Field(ge=1)
    published_version: int | None = Field(
        description="The version a SEND with no pinned version uses; null when none is published"
    )
    current: TemplateVersion = Field(description="The latest version")
    created_at: datetime
    updated_at: datetime


class TemplatePage(BaseModel):
    items: list[Template]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class VersionPage(BaseModel):
    items: list[TemplateVersion]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class CreateTemplate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "welcome",
                    "channel": "EMAIL",
                    "message_type": "MESSAGE",
                    "variables": _EXAMPLE_VARIABLES,
                    "content": _EXAMPLE_CONTENT,
                },
                {
                    "name": "order shipped",
                    "channel": "SMS",
                    "message_type": "MESSAGE",
                    "variables": [{"name": "data.order_id", "required": True}],
                    "content": {"sms": {"text": "Order {{ data.order_id }} is on its way."}},
                },
            ]
        },
    )

    name: Text = Field(min_length=1, max_length=200)
    channel: Channel
    message_type: MessageType
    content: TemplateContent = Field(description="The content of the template's channel")
    variables: list[Variable] = Field(default_factory=list, description="Every variable the content uses")


class UpdateTemplate(BaseModel):
    """Only the given fields change; content or variables make a new DRAFT version."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"content": {"email": {"subject": "Welcome aboard, {{ contact.first_name }}"}}}]
        },
    )

    name: Text | None = Field(
        default=None, min_length=1, max_length=200, description="A rename alone makes no version"
    )
    content: TemplateContent | None = Field(
        default=None, description="New content (same channel); the variables stay unless given"
    )
    variables: list[Variable] | None = Field(
        default=None, description="The new declarations (all of them); the content stays unless given"
    )


VersionNumber = Annotated[int, Field(ge=1, le=INT32_MAX)]


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 2}]})

    version: VersionNumber | None = Field(default=None, description="Omitted: the latest version")


class RejectRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"version": 2, "reason": "the offer has ended"}]}
    )

    version: VersionNumber | None = Field(default=None, description="Omitted: the latest version")
    reason: Text = Field(min_length=1, max_length=2000)


class PreviewRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"version": 1, "contact": {"first_name": "Ada"}, "data": {"order_id": "A-4711"}}]
        },
    )

    version: VersionNumber | None = Field(
        default=None, description="Omitted: the published version, else the latest one"
    )
    contact: JsonObject | None = Field(default=None, description="Sample `contact.*` values")
    data: JsonObject | None = Field(default=None, description="Sample `data.*` values (a trigger's payload)")
    fill_missing: bool = Field(
        default=False,
        description=(
            "Show a missing required variable as a visible `[name]` placeholder instead of answering 422"
        ),
    )


class Preview(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "template_id": "tpl_5d0c8f6e2b1a4c7d9e3f0a1b2c3d4e5f",
                    "version": 1,
                    "channel": "SMS",
                    "message_type": "MESSAGE",
                    "content": {"email": None, "sms": {"text": "Order A-4711 is on its way."}, "rcs": None},
                    "headers": {},
                    "billing_unit": "SMS_SEGMENT",
                    "units": 1,
                }
            ]
        }
    )

    template_id: str
    version: int = Field(description="The version rendered")
    channel: Channel
    message_type: MessageType
    content: TemplateContent = Field(description="The rendered content, in the shape of the template's")
    headers: dict[str, str] = Field(
        description="Email headers the send adds (List-Unsubscribe of newsletters)"
    )
    billing_unit: BillingUnit
    units: int = Field(ge=0, description="Billable units: the SMS segments of an SMS, otherwise 1")


# --- proto <-> JSON ---------------------------------------------------------------------------------


def _suggestion_pb(s: Suggestion) -> template_pb2.Suggestion:
    return template_pb2.Suggestion(text=s.text, postback=s.postback or "", url=s.url or "")


def _card_pb(c: RichCard) -> template_pb2.RichCard:
    return template_pb2.RichCard(
        title=c.title or "",
        description=c.description or "",
        media_url=c.media_url or "",
        suggestions=[_suggestion_pb(s) for s in c.suggestions],
    )


def content_pb(content: TemplateContent) -> template_pb2.TemplateContent:
    if content.email is not None:
        e = content.email
        return template_pb2.TemplateContent(
            email=template_pb2.EmailContent(subject=e.subject, html=e.html or "", text=e.text or "")
        )
    if content.sms is not None:
        return template_pb2.TemplateContent(sms=template_pb2.SmsContent(text=content.sms.text))
    assert content.rcs is not None  # exactly one is set (the model's validator)
    r = content.rcs
    return template_pb2.TemplateContent(
        rcs=template_pb2.RcsContent(
            text=r.text or "",
            suggestions=[_suggestion_pb(s) for s in r.suggestions],
            rich_card=_card_pb(r.rich_card) if r.rich_card is not None else None,
            carousel=[_card_pb(c) for c in r.carousel],
        )
    )


def _suggestion(s: template_pb2.Suggestion) -> Suggestion:
    return Suggestion(text=s.text, postback=s.postback or None, url=s.url or None)


def _card(c: template_pb2.RichCard) -> RichCard:
    return RichCard(
        title=c.title or None,
        description=c.description or None,
        media_url=c.media_url or None,
        suggestions=[_suggestion(s) for s in c.suggestions],
    )


def to_content(content: template_pb2.TemplateContent) -> TemplateContent:
    kind = content.WhichOneof("channel_content")
    if kind == "email":
        e = content.email
        return TemplateContent(
            email=EmailContent(subject=e.subject, html=e.html or None, text=e.text or None)
        )
    if kind == "sms":
        return TemplateContent(sms=SmsContent(text=content.sms.text))
    if kind == "rcs":
        r = content.rcs
        return TemplateContent(
            rcs=RcsContent(
                text=r.text or None,
                suggestions=[_suggestion(s) for s in r.suggestions],
                rich_card=_card(r.rich_card) if r.HasField("rich_card") else None,
                carousel=[_card(c) for c in r.carousel],
            )
        )
    raise ShoalError("template service answered a version without content", "bad_upstream_value")


def _rendered_content(channel: Channel, m: template_pb2.RenderedMessage) -> TemplateContent:
    if channel is Channel.EMAIL:
        return TemplateContent(
            email=EmailContent(subject=m.subject, html=m.html or None, text=m.text or None)
        )
    if channel is Channel.SMS:
        return TemplateContent(sms=SmsContent(text=m.text))
    return TemplateContent(
        rcs=RcsContent(
            text=m.text or None,
            suggestions=[_suggestion(s) for s in m.suggestions],
            rich_card=_card(m.rich_card) if m.HasField("rich_card") else None,
            carousel=[_card(c) for c in m.carousel],
        )
    )


def _variable_pb(v: Variable) -> template_pb2.Variable:
    return template_pb2.Variable(
        name=v.name,
        type=f"VARIABLE_TYPE_{v.type.value}",
        required=v.required,
        default_value=v.default or "",
    )


def _variable(v: template_pb2.Variable) -> Variable:
    kind = template_pb2.VariableType.Name(v.type).removeprefix("VARIABLE_TYPE_")
    return Variable(
        name=v.name,
        type=VariableType(kind) if kind in VariableType.__members__ else VariableType.STRING,
        required=v.required,
        default=v.default_value or None,
    )


def state_name(value: int) -> TemplateState:
    return _from_proto(TemplateState, template_pb2.TemplateState, "TEMPLATE_STATE_", value)


def state_value(state: TemplateState) -> str:
    return f"TEMPLATE_STATE_{state.value}"


def to_version(v: template_pb2.TemplateVersion) -> TemplateVersion:
    created = time_of(v.create_time)
    if created is None:
        raise ShoalError("template service answered a version without a creation time", "bad_upstream_value")
    return TemplateVersion(
        template_id=v.template_id,
        version=v.version,
        state=state_name(v.state),
        content=to_content(v.content),
        variables=[_variable(x) for x in v.variables],
        rejection_reason=v.rejection_reason or None,
        created_at=created,
        published_at=time_of(v.publish_time) if v.HasField("publish_time") else None,
    )


def to_template(t: template_pb2.Template) -> Template:
    created, updated = time_of(t.create_time), time_of(t.update_time)
    if created is None or updated is None:
        raise ShoalError("template service answered a template without times", "bad_upstream_value")
    return Template(
        id=t.id,
        name=t.name,
        channel=channel_name(t.channel),
        message_type=message_type_name(t.message_type),
        latest_version=t.latest_version,
        published_version=t.published_version or None,
        current=to_version(t.current),
        created_at=created,
        updated_at=updated,
    )


# --- preview: required variables --------------------------------------------------------------------

# Saved content is syntax-checked by the service: every `{{ ... }}` in it is one variable reference.
_REFERENCE = re.compile(r"\{\{(.*?)\}\}", re.S)


def _texts(content: template_pb2.TemplateContent) -> Iterator[str]:
    kind = content.WhichOneof("channel_content")
    if kind == "email":
        yield from (content.email.subject, content.email.html, content.email.text)
    elif kind == "sms":
        yield content.sms.text
    elif kind == "rcs":
        rcs = content.rcs
        cards = [rcs.rich_card, *rcs.carousel] if rcs.HasField("rich_card") else list(rcs.carousel)
        yield rcs.text
        suggestions = list(rcs.suggestions)
        for card in cards:
            yield from (card.title, card.description, card.media_url)
            suggestions.extend(card.suggestions)
        for s in suggestions:
            yield from (s.text, s.postback, s.url)


def _has_value(root: Mapping[str, Any] | None, path: Sequence[str]) -> bool:
    """Whether the sample holds a value the renderer shows (a string, number or boolean) at `path`."""
    value: Any = root
    for segment in path:
        if not isinstance(value, dict):
            return False
        value = value.get(segment)
    return isinstance(value, str | int | float | bool)


def missing_required(version: template_pb2.TemplateVersion, body: PreviewRequest) -> list[str]:
    """Required variables the content references that the sample lacks, as the engine would refuse them.

    The template service's Preview fills them with placeholders (it renders samples); a send
    (RenderBatch) fails the recipient instead, and that is what a preview with data must show.
    """
    used = {m.strip() for text in _texts(version.content) for m in _REFERENCE.findall(text)}
    missing = []
    for v in version.variables:
        if not v.required or v.name not in used:
            continue
        root, *path = v.name.split(".")
        sample = body.contact if root == "contact" else body.data
        if not _has_value(sample, path):
            missing.append(v.name)
    return missing


def _struct(values: dict[str, Any] | None, field: str) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if values:
        try:
            out.update(values)
        except (ValueError, TypeError, OverflowError):
            # A number beyond a double, or a string protobuf cannot encode (a lone surrogate).
            raise bad_request(field, "holds a value a message cannot carry") from None
    return out


# --- routes --------------------------------------------------------------------------------------------

TemplateIdPath = Annotated[
    str, Path(pattern=r"^tpl_[A-Za-z0-9]{1,64}$", description="Template id (`tpl_...`)")
]
_COMMON = common_responses("template", "No such template (or version) in this workspace")
_LIST = common_responses("template")
_TEMPLATE_FIELDS = {"template.version": "version", "template.template_id": "template_id"}


@router.post(
    "",
    status_code=201,
    summary="Create a template",
    description=(
        "Creates the template and its version 1 (DRAFT). The content must be the template's "
        "channel's and within its limits; every field breaking a rule is named in `details` "
        "with the limit (400). Needs `templates:write`."
    ),
    response_model=Template,
    responses=_LIST,
)
async def create_template(
    body: CreateTemplate,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Template:
    with upstream():
        reply = await backends.templates.CreateTemplate(
            template_pb2.CreateTemplateRequest(
                workspace_id=principal.workspace_id,
                name=body.name,
                channel=channel_value(body.channel),
                message_type=message_type_value(body.message_type),
                content=content_pb(body.content),
                variables=[_variable_pb(v) for v in body.variables],
            )
        )
    return to_template(reply.template)


@router.get(
    "",
    summary="List templates",
    description=(
        "Newest first, each with its latest version. Filters combine: `state=PUBLISHED` lists the "
        "templates a SEND can use (a published version, even with a newer draft on top), e.g. "
        "`?channel=EMAIL&message_type=MESSAGE&state=PUBLISHED` for an EMAIL MESSAGE node; other "
        "states filter on the latest version. Needs `templates:read`."
    ),
    response_model=TemplatePage,
    responses=_LIST,
)
async def list_templates(
    *,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    channel: Annotated[Channel | None, Query()] = None,
    message_type: Annotated[MessageType | None, Query()] = None,
    state: Annotated[TemplateState | None, Query()] = None,
    limit: Limit = LIST_LIMIT_DEFAULT,
    cursor: Cursor = None,
) -> TemplatePage:
    with upstream(_PAGE_FIELDS):
        reply = await backends.templates.ListTemplates(
            template_pb2.ListTemplatesRequest(
                workspace_id=principal.workspace_id,
                channel=channel_value(channel) if channel else None,
                message_type=message_type_value(message_type) if message_type else None,
                state=state_value(state) if state else None,
                page=common_pb2.PageRequest(page_size=limit, page_token=checked_cursor(cursor)),
            )
        )
    return TemplatePage(
        items=[to_template(t) for t in reply.templates], next_cursor=reply.page.next_page_token or None
    )


async def _get(backends: Backends, principal: Principal, template_id: str) -> template_pb2.Template:
    with upstream():
        reply: template_pb2.GetTemplateResponse = await backends.templates.GetTemplate(
            template_pb2.GetTemplateRequest(workspace_id=principal.workspace_id, template_id=template_id)
        )
    return reply.template


async def _versions(
    backends: Backends, principal: Principal, template_id: str
) -> list[template_pb2.TemplateVersion]:
    with upstream():
        reply: template_pb2.ListVersionsResponse = await backends.templates.ListVersions(
            template_pb2.ListVersionsRequest(workspace_id=principal.workspace_id, template_id=template_id)
        )
    return list(reply.versions)


def _no_version(template_id: str, number: int) -> ApiError:
    return ApiError(404, "not_found", f"template {template_id!r} has no version {number}")


@router.get(
    "/{template_id}",
    summary="Get a template",
    description="The template with its latest version. Needs `templates:read`.",
    response_model=Template,
    responses=_COMMON,
)
async def get_template(
    template_id: TemplateIdPath,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Template:
    return to_template(await _get(backends, principal, template_id))


@router.patch(
    "/{template_id}",
    summary="Edit a template",
    description=(
        "Versions are immutable: new `content` and/or `variables` make a new DRAFT version "
        "(answered as `current`); what is not given is carried over from the latest version. A "
        "`name` alone renames without a new version. Needs `templates:write`."
    ),
    response_model=Template,
    responses=_COMMON,
)
async def update_template(
    template_id: TemplateIdPath,
    body: UpdateTemplate,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Template:
    if body.name is None and body.content is None and body.variables is None:
        return to_template(await _get(backends, principal, template_id))
    request = template_pb2.UpdateTemplateRequest(
        workspace_id=principal.workspace_id, template_id=template_id, name=body.name or ""
    )
    if body.content is not None:
        request.content.CopyFrom(content_pb(body.content))
    if body.variables is not None:
        request.variables.extend(_variable_pb(v) for v in body.variables)
    # The service reads content without variables as "no variables", and no variables without
    # content as "a rename": carry over what the body does not change from the latest version.
    if body.content is not None and body.variables is None:
        request.variables.extend((await _get(backends, principal, template_id)).current.variables)
    elif body.content is None and body.variables == []:
        request.content.CopyFrom((await _get(backends, principal, template_id)).current.content)
    with upstream():
        reply = await backends.templates.UpdateTemplate(request)
    return to_template(reply.template)


@router.get(
    "/{template_id}/versions",
    summary="List the versions of a template",
    description="Oldest first. Needs `templates:read`.",
    response_model=VersionPage,
    responses=_COMMON,
)
async def list_versions(
    template_id: TemplateIdPath,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    limit: Limit = LIST_LIMIT_DEFAULT,
    cursor: Cursor = None,
) -> VersionPage:
    after = int(checked_cursor(cursor) or 0)
    versions = [v for v in await _versions(backends, principal, template_id) if v.version > after]
    page = versions[:limit]
    more = len(versions) > limit
    return VersionPage(
        items=[to_version(v) for v in page], next_cursor=str(page[-1].version) if more else None
    )


@router.post(
    "/{template_id}/publish",
    summary="Publish a version",
    description=(
        "EMAIL and SMS versions are PUBLISHED at once. RCS versions go to the provider for "
        "approval: the answer is PUBLISHED, REJECTED (with the provider's reason) or "
        "PENDING_APPROVAL. Publishing a PENDING_APPROVAL version records the provider's approval "
        "and needs the `admin` scope; otherwise `templates:write`. Only DRAFT and "
        "PENDING_APPROVAL versions can be published (409)."
    ),
    response_model=TemplateVersion,
    responses={
        **_COMMON,
        403: {"model": ErrorBody, "description": "The key lacks the scope (`admin` for a pending approval)"},
        409: {"model": ErrorBody, "description": "The version is already PUBLISHED or REJECTED"},
    },
)
async def publish_template(
    template_id: TemplateIdPath,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
    body: Annotated[PublishRequest | None, Body()] = None,
) -> TemplateVersion:
    body = body or PublishRequest()
    versions = await _versions(backends, principal, template_id)
    number = body.version or max((v.version for v in versions), default=0)
    target = next((v for v in versions if v.version == number), None)
    if target is None:
        raise _no_version(template_id, number)
    if target.state == template_pb2.TEMPLATE_STATE_PENDING_APPROVAL and not principal.allows(Scope.ADMIN):
        raise ApiError(
            403,
            "forbidden",
            f"version {number} waits for the provider's approval; recording it needs the admin scope",
        )
    with upstream(_TEMPLATE_FIELDS):
        reply = await backends.templates.PublishTemplate(
            template_pb2.PublishTemplateRequest(
                workspace_id=principal.workspace_id, template_id=template_id, version=number
            )
        )
    return to_version(reply.version)


@router.post(
    "/{template_id}/reject",
    summary="Reject a version",
    description=(
        "Moves a DRAFT or PENDING_APPROVAL version to REJECTED with the reason (e.g. the "
        "provider's answer, or a draft withdrawn). Needs `templates:write`."
    ),
    response_model=TemplateVersion,
    responses={**_COMMON, 409: {"model": ErrorBody, "description": "The version is PUBLISHED or REJECTED"}},
)
async def reject_template(
    template_id: TemplateIdPath,
    body: RejectRequest,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> TemplateVersion:
    with upstream(_TEMPLATE_FIELDS):
        reply = await backends.templates.RejectTemplate(
            template_pb2.RejectTemplateRequest(
                workspace_id=principal.workspace_id,
                template_id=template_id,
                version=body.version or 0,
                reason=body.reason,
            )
        )
    return to_version(reply.version)


@router.post(
    "/{template_id}/preview",
    summary="Render a version with sample data",
    description=(
        "Renders any version (default: the published one, else the latest) with the sample "
        "`contact` and `data`, and says how it is billed (unit, SMS segments). A required variable "
        "the content uses and the sample lacks answers 422 naming it, as a send would fail; "
        "`fill_missing: true` shows `[name]` placeholders instead. Needs `templates:read`."
    ),
    response_model=Preview,
    responses={
        **_COMMON,
        422: {
            "model": ErrorBody,
            "description": "A required variable is missing, or the rendered content breaks a limit",
        },
    },
)
async def preview_template(
    template_id: TemplateIdPath,
    principal: Annotated[Principal, Depends(require(Scope.TEMPLATES_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    body: Annotated[PreviewRequest | None, Body()] = None,
) -> Preview:
    body = body or PreviewRequest()
    contact, data = _struct(body.contact, "contact"), _struct(body.data, "data")
    template = await _get(backends, principal, template_id)
    number = body.version or template.published_version or template.latest_version
    if number == template.latest_version:
        version = template.current
    else:
        found = [v for v in await _versions(backends, principal, template_id) if v.version == number]
        if not found:
            raise _no_version(template_id, number)
        version = found[0]
    if not body.fill_missing:
        missing = missing_required(version, body)
        if missing:
            raise ApiError(
                422,
                "missing_variable",
                f"missing required variable{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                details=[ErrorDetail(field=name, message="required variable is missing") for name in missing],
            )
    with upstream(_TEMPLATE_FIELDS):
        reply = await backends.templates.Preview(
            template_pb2.PreviewRequest(
                workspace_id=principal.workspace_id,
                template=template_pb2.TemplateRef(template_id=template_id, version=number),
                context=template_pb2.RenderContext(key="preview", contact=contact, data=data),
            )
        )
    message = reply.message
    channel = channel_name(template.channel)
    if message.error:
        # "text: rendered longer than 1600 characters": the field of the rendered content, the rule.
        where, sep, what = message.error.partition(": ")
        named = bool(sep) and " " not in where
        raise ApiError(
            422,
            "render_failed",
            f"version {number} cannot be rendered: {message.error}",
            details=[
                ErrorDetail(
                    field=f"content.{channel.lower()}.{rest_field(where, {})}" if named else "content",
                    message=what if named else message.error,
                )
            ],
        )
    return Preview(
        template_id=template_id,
        version=number,
        channel=channel,
        message_type=message_type_name(template.message_type),
        content=_rendered_content(channel, message),
        headers=dict(message.headers),
        billing_unit=billing_unit_name(message.billing_unit),
        units=message.units,
    )
