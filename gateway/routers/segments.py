"""`/v1/segments`: saved audience filters and their size, over the SegmentService gRPC API.

The filter is the proto's typed expression tree (`shoal.v1.Filter`) in a JSON form meant to be
written by hand (it appears in campaign-as-code YAML); FILTER_GUIDE below is its documentation,
shown in the OpenAPI descriptions. Shape errors (not an object, unknown key, a list where one
value goes, an unknown channel) answer 400 from the parser here; the service's semantic
errors (unknown field, a type the operator cannot compare, empty `and`, nesting too deep) answer
422 `invalid_filter`. Both name the path in the JSON tree (`filter.and.1.value`): the parser
remembers the JSON path of each proto node to translate the service's paths.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, StrictBool, StrictInt, StrictStr

from gateway.auth import require
from gateway.backends import Backends, get_backends
from gateway.errors import ErrorBody, ErrorDetail
from gateway.flows import Channel, ConsentStatus, MessageType, TimestampValue
from gateway.flows import Operator as FilterOp
from gateway.keys import Principal, Scope
from gateway.routers.contacts import (
    COMMON,
    DEFAULT_LIMIT,
    Cursor,
    InvalidValue,
    Limit,
    bad_request,
    channel_pb,
    checked_text,
    consent_status_pb,
    enum_from_pb,
    field_value_json,
    field_value_pb,
    json_path,
    message_type_pb,
    rpc,
    timestamp,
)
from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as pb

router = APIRouter(prefix="/v1/segments", tags=["segments"])

# Deeper trees are refused here before protobuf's own nesting limit; the service allows far less.
MAX_PARSE_DEPTH = 32
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such segment in this workspace"}
}
INVALID_FILTER: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "`invalid_filter`: the filter breaks a rule; names its path"}
}

SegmentIdPath = Annotated[
    str,
    Path(
        pattern=r"^seg_[A-Za-z0-9]{1,60}$", description="Segment id (`seg_...`)", examples=["seg_01JD5Z0T9X"]
    ),
]


# -- the filter, as JSON -------------------------------------------------------------------------------


FilterValue = StrictBool | StrictInt | float | StrictStr | TimestampValue

_NODE = ConfigDict(extra="forbid", populate_by_name=True)


class AndFilter(BaseModel):
    """Every filter of the list matches."""

    model_config = _NODE

    and_: list[FilterExpr] = Field(alias="and")


class OrFilter(BaseModel):
    """At least one filter of the list matches."""

    model_config = _NODE

    or_: list[FilterExpr] = Field(alias="or")


class NotFilter(BaseModel):
    """The filter does not match."""

    model_config = _NODE

    not_: FilterExpr = Field(alias="not")


class FieldFilter(BaseModel):
    """Compare a contact field: `id`, `email`, `phone`, `first_name`, `last_name`, `external_id`,
    `status` (ACTIVE, ...), `created_at`, `updated_at`, or `fields.<name>` (a custom field; a
    condition matches only values of its own type)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"field": "fields.plan", "op": "in", "value": ["pro", "team"]},
                {"field": "created_at", "op": "gte", "value": "2026-01-01T00:00:00Z"},
                {"field": "fields.renews", "op": "eq", "value": {"timestamp": "2026-07-01T00:00:00Z"}},
                {"field": "phone", "op": "exists"},
            ]
        },
    )

    field: StrictStr
    op: FilterOp = Field(
        description="eq, neq, in (value is a list), gt, gte, lt, lte (numbers, timestamps), "
        "contains (case-insensitive substring), exists (no value); upper case is accepted too"
    )
    value: FilterValue | list[FilterValue] | None = Field(
        default=None,
        description='Typed like custom fields; timestamps as {"timestamp": ...}, or a plain RFC 3339 '
        "string with gt/gte/lt/lte and for created_at/updated_at",
    )


class TagFilter(BaseModel):
    """The contact has the tag."""

    model_config = ConfigDict(extra="forbid")

    tag: StrictStr


class ConsentMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: Channel
    message_type: MessageType
    status: ConsentStatus = ConsentStatus.GRANTED


class ConsentFilter(BaseModel):
    """The contact's current consent for a channel + message type has the status."""

    model_config = ConfigDict(extra="forbid")

    consent: ConsentMatch


class EventMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: StrictStr = Field(description="Event type, e.g. `email.opened`, `order.placed`")
    min_count: StrictInt | None = Field(default=None, description="At least this many (default 1)")
    max_count: StrictInt | None = Field(default=None, description="At most this many (0 or absent: no bound)")
    within_seconds: StrictInt | None = Field(
        default=None, description="Counted over this window back from now"
    )


class EventFilter(BaseModel):
    """The contact had events of the type, counted within bounds (inclusive)."""

    model_config = ConfigDict(extra="forbid")

    event: EventMatch


FilterExpr = AndFilter | OrFilter | NotFilter | FieldFilter | TagFilter | ConsentFilter | EventFilter
for _model in (AndFilter, OrFilter, NotFilter):
    _model.model_rebuild()

FILTER_GUIDE = """
**Filter** (JSON; the same in campaign-as-code YAML). A node is one of:

| node | matches when |
|---|---|
| `{"and": [f, ...]}` | every filter matches |
| `{"or": [f, ...]}` | at least one matches |
| `{"not": f}` | f does not match |
| `{"field": "fields.plan", "op": "eq", "value": "pro"}` | the comparison holds |
| `{"tag": "vip"}` | the contact has the tag |
| `{"consent": {"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "GRANTED"}}` | the \
current consent record has the status (`status` defaults to GRANTED) |
| `{"event": {"type": "email.opened", "min_count": 1, "max_count": 5, "within_seconds": 604800}}` \
| the number of events of the type within the window (all time when absent) is within the \
inclusive bounds (`min_count` defaults to 1 when neither bound is given; no `max_count`: no upper bound) |

Fields: `id`, `email`, `phone`, `first_name`, `last_name`, `external_id`, `status`, `created_at`,
`updated_at`, or `fields.<name>` for a custom field (compared only with values of its own type).
Operators: `eq`, `neq`, `in` (value is a list), `gt`, `gte`, `lt`, `lte` (numbers or
timestamps), `contains` (case-insensitive substring), `exists` (no value). Values are typed like
custom fields; a timestamp is `{"timestamp": "2026-01-31T12:00:00Z"}`, or a plain RFC 3339
string with `gt`/`gte`/`lt`/`lte` and for `created_at`/`updated_at`.

Example: `{"and": [{"field": "fields.plan", "op": "eq", "value": "pro"}, {"tag": "vip"}]}`.

Errors name the path in the tree (`filter.and.1.value`): 400 for a wrong shape (unknown key,
a list where one value goes, an unknown channel), 422 `invalid_filter` for a rule (unknown
field, an operator the value's type cannot take, an empty `and`, nesting deeper than 12 levels,
more than 200 conditions).
"""

FILTER_EXAMPLE: dict[str, Any] = {
    "and": [
        {"field": "fields.plan", "op": "eq", "value": "pro"},
        {"tag": "vip"},
        {"consent": {"channel": "EMAIL", "message_type": "NEWSLETTER"}},
        {"not": {"event": {"type": "email.opened", "within_seconds": 2592000}}},
    ]
}
_FILTER_DESCRIPTION = (
    "The typed filter tree: `and`/`or`/`not`, field comparisons, `tag`, `consent`, `event` (see "
    "`POST /v1/segments`). Omitted or null: every contact of the workspace."
)

_BUILTINS = {
    "id": "id",
    "email": "email",
    "phone": "phone",
    "first_name": "first_name",
    "last_name": "last_name",
    "external_id": "external_id",
    "status": "status",
    "created_at": "create_time",
    "updated_at": "update_time",
}
_BUILTINS_BACK = {v: k for k, v in _BUILTINS.items()}
_TIMESTAMP_FIELDS = frozenset({"create_time", "update_time"})
_ORDERING = frozenset({FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE})
_OPS = {op.value: op for op in FilterOp}
_KINDS = ("and", "or", "not", "field", "tag", "consent", "event")
_FIELD_KEYS = frozenset({"field", "op", "value"})
# Service paths under a node -> this API's (the rest of the path is kept).
_LEAF_PATHS = (
    (".all_of.filters", ".and"),
    (".any_of.filters", ".or"),
    (".field.field", ".field"),
    (".field.operator", ".op"),
    (".field.values", ".value"),
    (".field.value", ".value"),
    (".tag.tag", ".tag"),
)


def _op_pb(op: FilterOp) -> str:
    return "OPERATOR_" + op.name


class FilterParser:
    """JSON filter -> pb.Filter, remembering each node's JSON path to name the service's errors.

    Shape problems are collected (400); names this API does not know are semantic (422).
    """

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}
        self.shape: list[ErrorDetail] = []
        self.semantic: list[ErrorDetail] = []

    def parse(self, raw: Any, path: str = "filter") -> pb.Filter:
        out = self.node(raw, path, "filter", 1)
        if self.shape:
            raise bad_request(self.shape)
        if self.semantic:
            raise bad_request(self.semantic, "invalid_filter", 422)
        return out

    def rename(self, field: str) -> str:
        """A service violation path (`filter.all_of.filters[1].field.value`) as this API's."""
        best = ""
        for proto_path in self.paths:
            if (field == proto_path or field.startswith(proto_path + ".")) and len(proto_path) > len(best):
                best = proto_path
        if not best:
            return json_path(field)
        rest = field[len(best) :]
        for proto_part, json_part in _LEAF_PATHS:
            if rest.startswith(proto_part):
                rest = json_part + rest[len(proto_part) :]
                break
        return self.paths[best] + json_path(rest)

    def fail(self, path: str, rule: str) -> pb.Filter:
        self.shape.append(ErrorDetail(field=path, message=rule))
        return pb.Filter()

    def node(self, raw: Any, path: str, proto_path: str, depth: int) -> pb.Filter:
        self.paths[proto_path] = path
        if depth > MAX_PARSE_DEPTH:
            self.semantic.append(ErrorDetail(field=path, message="the filter nests too deep"))
            return pb.Filter()
        if not isinstance(raw, dict):
            return self.fail(path, f"must be an object with one of: {', '.join(_KINDS)}")
        if "field" in raw:
            kind, allowed = "field", _FIELD_KEYS
        else:
            kinds = [k for k in raw if k in _KINDS]
            if len(kinds) != 1:
                return self.fail(path, f"must have exactly one of: {', '.join(_KINDS)}")
            kind, allowed = kinds[0], frozenset(kinds)
        extra = sorted(str(k) for k in raw if k not in allowed)
        if extra:
            return self.fail(f"{path}.{extra[0]}", f"unknown key next to {kind!r}")
        value = raw[kind]
        if kind in ("and", "or"):
            return self.group(kind, value, path, proto_path, depth)
        if kind == "not":
            out = pb.Filter()
            out.negate.CopyFrom(self.node(value, f"{path}.not", f"{proto_path}.negate", depth + 1))
            return out
        if kind == "field":
            return self.field(raw, path)
        if kind == "tag":
            if not isinstance(value, str):
                return self.fail(f"{path}.tag", "must be a string")
            return pb.Filter(tag=pb.TagCondition(tag=self.text(value, f"{path}.tag")))
        if kind == "consent":
            return self.consent(value, f"{path}.consent")
        return self.event(value, f"{path}.event")

    def text(self, value: str, path: str) -> str:
        try:
            return checked_text(value)
        except InvalidValue as exc:
            self.fail(path, str(exc))
            return ""

    def group(self, kind: str, items: Any, path: str, proto_path: str, depth: int) -> pb.Filter:
        if not isinstance(items, list):
            return self.fail(f"{path}.{kind}", "must be a list of filters")
        out = pb.Filter()
        name = "all_of" if kind == "and" else "any_of"
        group = getattr(out, name)
        group.SetInParent()
        for i, child in enumerate(items):
            group.filters.append(
                self.node(child, f"{path}.{kind}.{i}", f"{proto_path}.{name}.filters[{i}]", depth + 1)
            )
        return out

    def value(self, raw: Any, path: str, *, timestamps: bool) -> common_pb2.FieldValue:
        if raw is None:
            self.fail(path, "must not be null")
            return common_pb2.FieldValue()
        try:
            return field_value_pb(raw, timestamp_strings=timestamps and isinstance(raw, str))
        except InvalidValue as exc:
            self.fail(path, str(exc))
            return common_pb2.FieldValue()

    def field(self, raw: dict[str, Any], path: str) -> pb.Filter:
        name, op_raw = raw["field"], raw.get("op")
        if not isinstance(name, str):
            return self.fail(f"{path}.field", "must be a string: a contact field or fields.<name>")
        proto_name = _BUILTINS.get(name) or (name if name.startswith("fields.") else None)
        if proto_name is None:
            self.semantic.append(
                ErrorDetail(
                    field=f"{path}.field", message=f"must be one of {', '.join(_BUILTINS)} or fields.<name>"
                )
            )
            return pb.Filter()
        if not isinstance(op_raw, str) or op_raw.lower() not in _OPS:
            return self.fail(f"{path}.op", f"must be one of {', '.join(_OPS)}")
        op = _OPS[op_raw.lower()]
        cond = pb.FieldCondition(field=self.text(proto_name, f"{path}.field"), operator=_op_pb(op))
        timestamps = proto_name in _TIMESTAMP_FIELDS or op in _ORDERING
        given = raw.get("value")
        if op == FilterOp.EXISTS:
            if given is not None:
                return self.fail(f"{path}.value", "exists takes no value")
        elif op == FilterOp.IN:
            if not isinstance(given, list):
                return self.fail(f"{path}.value", "in takes a list of values")
            for i, item in enumerate(given):
                cond.values.append(self.value(item, f"{path}.value.{i}", timestamps=timestamps))
        elif "value" not in raw:
            return self.fail(f"{path}.value", f"is required with {op.value}")
        elif isinstance(given, list):
            return self.fail(f"{path}.value", f"{op.value} takes one value; use in for a list")
        else:
            cond.value.CopyFrom(self.value(given, f"{path}.value", timestamps=timestamps))
        return pb.Filter(field=cond)

    def keys(self, raw: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> bool:
        if not isinstance(raw, dict):
            self.fail(path, f"must be an object with {', '.join(allowed)}")
            return False
        ok = True
        for key in raw:
            if key not in allowed:
                self.fail(f"{path}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
                ok = False
        for key in required:
            if key not in raw:
                self.fail(f"{path}.{key}", "is required")
                ok = False
        return ok

    def consent(self, raw: Any, path: str) -> pb.Filter:
        if not self.keys(raw, path, ("channel", "message_type", "status"), ("channel", "message_type")):
            return pb.Filter()
        channel = self.enum(raw.get("channel"), Channel, f"{path}.channel")
        message_type = self.enum(raw.get("message_type"), MessageType, f"{path}.message_type")
        status = self.enum(raw.get("status", "GRANTED"), ConsentStatus, f"{path}.status")
        cond = pb.ConsentCondition(
            channel=channel_pb(Channel(channel)) if channel else None,
            message_type=message_type_pb(MessageType(message_type)) if message_type else None,
            status=consent_status_pb(ConsentStatus(status)) if status else None,
        )
        return pb.Filter(consent=cond)

    def enum(self, given: Any, kind: type[enum.StrEnum], path: str) -> str | None:
        names = [m.value for m in kind]
        if isinstance(given, str) and given in names:
            return given
        self.fail(path, f"must be one of {', '.join(names)}")
        return None

    def event(self, raw: Any, path: str) -> pb.Filter:
        allowed = ("type", "min_count", "max_count", "within_seconds")
        if not self.keys(raw, path, allowed, ("type",)):
            return pb.Filter()
        cond = pb.EventCondition()
        if isinstance(raw["type"], str):
            cond.type = self.text(raw["type"], f"{path}.type")
        else:
            self.fail(f"{path}.type", "must be a string")
        for key, (low, high) in (("min_count", _INT32), ("max_count", _INT32), ("within_seconds", _INT64)):
            given = raw.get(key)
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, int):
                self.fail(f"{path}.{key}", "must be an integer")
            elif not low <= given <= high:
                self.fail(f"{path}.{key}", "is out of range")
            else:
                setattr(cond, key, given)
        if raw.get("min_count") is None and raw.get("max_count") is None:
            cond.min_count = 1
        return pb.Filter(event=cond)


def filter_json(f: pb.Filter) -> dict[str, Any] | None:
    """A stored filter as the JSON form (None for the empty filter: every contact)."""
    kind = f.WhichOneof("expr")
    if kind is None:
        return None
    if kind in ("all_of", "any_of"):
        children = [filter_json(c) for c in getattr(f, kind).filters]
        return {"and" if kind == "all_of" else "or": [c for c in children if c is not None]}
    if kind == "negate":
        return {"not": filter_json(f.negate)}
    if kind == "tag":
        return {"tag": f.tag.tag}
    if kind == "consent":
        return {
            "consent": {
                "channel": enum_from_pb(f.consent.channel, common_pb2.Channel, "CHANNEL_", Channel),
                "message_type": enum_from_pb(
                    f.consent.message_type, common_pb2.MessageType, "MESSAGE_TYPE_", MessageType
                ),
                "status": enum_from_pb(f.consent.status, pb.ConsentStatus, "CONSENT_STATUS_", ConsentStatus),
            }
        }
    if kind == "event":
        event: dict[str, Any] = {"type": f.event.type}
        for key in ("min_count", "max_count", "within_seconds"):
            if getattr(f.event, key):
                event[key] = getattr(f.event, key)
        return {"event": event}
    cond = f.field
    op = FilterOp(pb.Operator.Name(cond.operator).removeprefix("OPERATOR_").lower())
    timestamps = cond.field in _TIMESTAMP_FIELDS or op in _ORDERING
    out: dict[str, Any] = {"field": _BUILTINS_BACK.get(cond.field, cond.field), "op": op.value}
    if op == FilterOp.IN:
        out["value"] = [field_value_json(v, timestamp_strings=timestamps) for v in cond.values]
    elif cond.HasField("value"):
        out["value"] = field_value_json(cond.value, timestamp_strings=timestamps)
    return out


# -- models ---------------------------------------------------------------------------------------------


class SegmentInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "Pro VIPs with newsletter", "filter": FILTER_EXAMPLE}]},
    )

    name: StrictStr = Field(description="At most 255 characters")
    filter: SkipValidation[FilterExpr] | None = Field(default=None, description=_FILTER_DESCRIPTION)


class SegmentPatch(BaseModel):
    """Only the fields given change; `filter: null` makes the segment match every contact."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"filter": {"tag": "vip"}}]})

    name: StrictStr | None = None
    filter: SkipValidation[FilterExpr] | None = Field(default=None, description=_FILTER_DESCRIPTION)


class AudienceEstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"filter": FILTER_EXAMPLE}]})

    filter: SkipValidation[FilterExpr] | None = Field(default=None, description=_FILTER_DESCRIPTION)


class Segment(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "seg_01JD5Z0T9XK3M8Q2V7RWA4",
                    "name": "Pro VIPs with newsletter",
                    "filter": FILTER_EXAMPLE,
                    "created_at": "2026-01-02T09:30:00Z",
                    "updated_at": "2026-01-02T09:30:00Z",
                }
            ]
        }
    )

    id: str = Field(description="`seg_...`")
    name: str
    filter: FilterExpr | None = Field(description="null: every contact of the workspace")
    created_at: datetime
    updated_at: datetime


class SegmentPage(BaseModel):
    items: list[Segment]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class AudienceEstimate(BaseModel):
    size: int = Field(ge=0, description="Contacts matching now")


def segment_json(msg: pb.Segment) -> Segment:
    # Validated from plain data, so the filter's nodes become their models (and keep only the
    # keys they were given: routes answer with exclude_unset, so no `"value": null` noise).
    return Segment.model_validate(
        {
            "id": msg.id,
            "name": msg.name,
            "filter": filter_json(msg.filter),
            "created_at": timestamp(msg.create_time),
            "updated_at": timestamp(msg.update_time),
        }
    )


def parse_filter(raw: Any) -> tuple[pb.Filter, FilterParser]:
    parser = FilterParser()
    if raw is None:
        return pb.Filter(), parser
    return parser.parse(raw), parser


# -- routes ---------------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    summary="Create a segment",
    description="A name and a filter. Needs `contacts:write`.\n" + FILTER_GUIDE,
    response_model=Segment,
    response_model_exclude_unset=True,
    responses={**COMMON, **INVALID_FILTER},
)
async def create_segment(
    body: SegmentInput,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Segment:
    tree, parser = parse_filter(body.filter)
    request = pb.CreateSegmentRequest(workspace_id=principal.workspace_id, name=checked_name(body.name))
    if tree.WhichOneof("expr") is not None:
        request.filter.CopyFrom(tree)
    reply = await rpc(backends.segments.CreateSegment(request), parser.rename)
    return segment_json(reply.segment)


def checked_name(name: str) -> str:
    try:
        return checked_text(name)
    except InvalidValue as exc:
        raise bad_request([ErrorDetail(field="name", message=str(exc))]) from None


@router.get(
    "",
    summary="List segments",
    description="Oldest first, in pages (`limit`, `cursor`). Needs `contacts:read`.",
    response_model=SegmentPage,
    response_model_exclude_unset=True,
    responses=COMMON,
)
async def list_segments(
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> SegmentPage:
    reply = await rpc(
        backends.segments.ListSegments(
            pb.ListSegmentsRequest(
                workspace_id=principal.workspace_id,
                page=common_pb2.PageRequest(page_size=limit, page_token=cursor or ""),
            )
        ),
        lambda field: "cursor" if field.startswith("page.page_token") else json_path(field),
    )
    return SegmentPage(
        items=[segment_json(s) for s in reply.segments], next_cursor=reply.page.next_page_token or None
    )


@router.post(
    "/estimate",
    summary="Estimate the audience of an unsaved filter",
    description=(
        "How many contacts match the filter now (omitted or null: every contact). For live "
        "previews while a segment is edited. Needs `contacts:read`.\n"
    )
    + FILTER_GUIDE,
    response_model=AudienceEstimate,
    responses={**COMMON, **INVALID_FILTER},
)
async def estimate_filter(
    body: AudienceEstimateRequest,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> AudienceEstimate:
    tree, parser = parse_filter(body.filter)
    request = pb.EstimateAudienceRequest(workspace_id=principal.workspace_id)
    request.filter.SetInParent()  # the oneof is set even for the empty filter (every contact)
    request.filter.MergeFrom(tree)
    reply = await rpc(backends.segments.EstimateAudience(request), parser.rename)
    return AudienceEstimate(size=reply.size)


@router.get(
    "/{segment_id}",
    summary="Get a segment",
    description="Needs `contacts:read`.",
    response_model=Segment,
    response_model_exclude_unset=True,
    responses={**COMMON, **NOT_FOUND},
)
async def get_segment(
    segment_id: SegmentIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Segment:
    reply = await rpc(
        backends.segments.GetSegment(
            pb.GetSegmentRequest(workspace_id=principal.workspace_id, segment_id=segment_id)
        )
    )
    return segment_json(reply.segment)


@router.patch(
    "/{segment_id}",
    summary="Update a segment",
    description=(
        "Partial: `name` and/or `filter`; `filter: null` makes the segment match every contact. "
        "Campaigns using the segment see the new filter at their next launch. Needs `contacts:write`."
    ),
    response_model=Segment,
    response_model_exclude_unset=True,
    responses={**COMMON, **NOT_FOUND, **INVALID_FILTER},
)
async def update_segment(
    segment_id: SegmentIdPath,
    body: SegmentPatch,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Segment:
    ws = principal.workspace_id
    given = body.model_fields_set
    if "name" in given and not (body.name or "").strip():
        raise bad_request([ErrorDetail(field="name", message="must not be empty")])
    if not given:
        reply = await rpc(
            backends.segments.GetSegment(pb.GetSegmentRequest(workspace_id=ws, segment_id=segment_id))
        )
        return segment_json(reply.segment)
    request = pb.UpdateSegmentRequest(
        workspace_id=ws, segment_id=segment_id, name=checked_name(body.name or "")
    )
    tree, parser = parse_filter(body.filter)
    if "filter" in given:
        request.filter.SetInParent()  # an empty filter is sent too: it clears the filter
        request.filter.MergeFrom(tree)
    update = await rpc(backends.segments.UpdateSegment(request), parser.rename)
    return segment_json(update.segment)


@router.delete(
    "/{segment_id}",
    status_code=204,
    summary="Delete a segment",
    description="Needs `contacts:write`.",
    response_class=Response,
    responses={**COMMON, **NOT_FOUND},
)
async def delete_segment(
    segment_id: SegmentIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Response:
    await rpc(
        backends.segments.DeleteSegment(
            pb.DeleteSegmentRequest(workspace_id=principal.workspace_id, segment_id=segment_id)
        )
    )
    return Response(status_code=204)


@router.get(
    "/{segment_id}/estimate",
    summary="Audience size of a segment",
    description="How many contacts match the segment's filter now. Needs `contacts:read`.",
    response_model=AudienceEstimate,
    responses={**COMMON, **NOT_FOUND},
)
async def estimate_segment(
    segment_id: SegmentIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CONTACTS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> AudienceEstimate:
    reply = await rpc(
        backends.segments.EstimateAudience(
            pb.EstimateAudienceRequest(workspace_id=principal.workspace_id, segment_id=segment_id)
        )
    )
    return AudienceEstimate(size=reply.size)
