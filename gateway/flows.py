"""The JSON form of campaign flows and triggers, and its exact mapping to and from the protos.

This is the shape a person writes by hand (campaign-as-code YAML uses exactly this shape):

    {"steps": [
      {"id": "s1", "send": {"channel": "EMAIL", "message_type": "MESSAGE",
                            "template": {"template_id": "tpl_...", "version": 0}}},
      {"id": "w1", "wait": {"duration": "PT1H"}},
      {"id": "c1", "condition": {
          "predicate": {"engagement": {"node_id": "s1", "event": "opened"}},
          "yes": [{"id": "t1", "tag": {"tag": "engaged", "action": "ADD"}}, {"id": "e1", "end": {}}],
          "no": [{"id": "ab", "ab_test": {"variants": [
              {"name": "A", "weight": 50, "steps": [{"id": "e2", "end": {}}]},
              {"name": "B", "weight": 50, "steps": [{"id": "e3", "end": {}}]}]}}]}}]}

Decisions:
- A step is an object with `id`, an optional `name` and exactly one kind key (`send`, `wait`,
  `condition`, `ab_test`, `tag`, `end`), mirroring the proto `Step`; a split's branches are lists
  of steps (`yes`, `no`, a variant's `steps`), not `{steps: [...]}` wrappers.
- The edge (400) checks only that the JSON is well formed: types, known field names, enum
  names, one kind per step, predicate and trigger, ISO durations, local times and IANA zones,
  nesting depth. The flow rules (ids unique, every path ends in END, splits last, A/B weights
  sum to 100, RCS fallback, a SEND's template, ...) are the campaign service's: a DRAFT may be
  saved half-built, `POST /v1/campaigns/{id}/validate` lists what breaks them and launch refuses.
- Durations are ISO 8601 with days, hours, minutes and seconds (`PT1H`, `P1DT12H`, `PT90S`),
  whole seconds; a day is 24 hours. Answers spell them canonically, largest unit first
  (`PT90M` comes back as `PT1H30M`).
- Answers omit a field that is unset (an empty string or an unset enum in the proto); numbers,
  booleans and lists are always answered. So a flow written in the canonical form comes back
  byte for byte; `template.version` and an A/B `weight` omitted come back as 0.
- A CONDITION's predicate is written like a segment filter's leaf (`POST /v1/segments`):
  `{"field": "fields.plan", "op": "eq", "value": "pro"}`, `{"tag": "vip"}`,
  `{"consent": {"channel", "message_type", "status"}}`, plus the flow-only
  `{"engagement": {"node_id", "event"}}` and `{"channel_used": {"node_id", "channel"}}`. The
  flow rules do not look inside a field comparison, so its shape (field name, `op`, one value
  or a list for `in`, none for `exists`) is checked here (400).
- Enum names follow PRODUCT.md: channels, message types, consent statuses and tag actions in
  capitals (`EMAIL`, `GRANTED`, `ADD`), the RCS fallback as PRODUCT.md writes it (`none`,
  `sms`, `sms_custom`); operators and engagement events as segment filters and the service
  write them (`eq`, `in`; `delivered`, `opened`, `clicked`, `failed`).
- Channel, MessageType, ConsentStatus and TimestampValue are defined here once and shared by
  the contacts and segments routers (one name each in the OpenAPI document).
- A scheduled trigger's `at` is a wall-clock time in `time_zone` (`YYYY-MM-DDTHH:MM[:SS]`),
  which is what the proto stores, so it round-trips exactly. Recurrence is not supported (the
  proto has none).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, TypeAlias, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    model_validator,
)

from shoal import flow as flows
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb

# The largest google.protobuf.Duration (10,000 years); the 366-day limit of a WAIT is a flow rule.
MAX_DURATION_SECONDS = 315_576_000_000
INT32_MAX = 2**31 - 1
KINDS = flows.NODE_TYPES


def _unset(value: Any) -> bool:
    return value is None


def _omit(**kwargs: Any) -> Any:
    """A field that answers omit when unset (null)."""
    return Field(default=None, exclude_if=_unset, **kwargs)


class _Json(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- enums ------------------------------------------------------------------------------------


class Channel(enum.StrEnum):
    EMAIL = "EMAIL"
    RCS = "RCS"
    SMS = "SMS"


class MessageType(enum.StrEnum):
    MESSAGE = "MESSAGE"
    CONVERSATION = "CONVERSATION"
    NEWSLETTER = "NEWSLETTER"


class ConsentStatus(enum.StrEnum):
    GRANTED = "GRANTED"
    REVOKED = "REVOKED"
    PENDING = "PENDING"


class Operator(enum.StrEnum):
    """Comparison operators, written as segment filters write them (`POST /v1/segments`)."""

    EQ = "eq"
    NEQ = "neq"
    IN = "in"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    CONTAINS = "contains"
    EXISTS = "exists"


class RcsFallback(enum.StrEnum):
    """PRODUCT.md: `none` skips the contact, `sms` sends the same text, `sms_custom` an SMS template."""

    NONE = "none"
    SMS = "sms"
    SMS_CUSTOM = "sms_custom"


class TagAction(enum.StrEnum):
    ADD = "ADD"
    REMOVE = "REMOVE"


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum_to_pb(value: enum.StrEnum | None, proto_enum: Any, prefix: str) -> Any:
    """The proto enum number (typed Any: each proto enum field has its own value type)."""
    return 0 if value is None else proto_enum.Value(prefix + value.name)


def _enum_from_pb(number: int, proto_enum: Any, prefix: str, cls: type[_E]) -> _E | None:
    if not number:
        return None
    try:
        return cls[str(proto_enum.Name(number)).removeprefix(prefix)]
    except (KeyError, ValueError):
        return None


def channel_to_pb(value: Channel | None) -> Any:
    return _enum_to_pb(value, common.Channel, "CHANNEL_")


def channel_from_pb(number: int) -> Channel | None:
    return _enum_from_pb(number, common.Channel, "CHANNEL_", Channel)


# ---- scalar formats ---------------------------------------------------------------------------

_DURATION = re.compile(r"^P(?:(\d{1,9})D)?(?:T(?:(\d{1,12})H)?(?:(\d{1,12})M)?(?:(\d{1,14})S)?)?$")
_LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")
_ZONE = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")


def parse_duration(text: str) -> int:
    """Seconds of an ISO 8601 duration in days, hours, minutes and seconds."""
    match = _DURATION.match(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise ValueError("must be an ISO 8601 duration in whole days, hours, minutes, seconds, e.g. PT1H")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total > MAX_DURATION_SECONDS:
        raise ValueError("is longer than any duration can be")
    return total


def format_duration(seconds: int, nanos: int = 0) -> str:
    """The canonical ISO 8601 spelling: largest unit first, zero parts left out."""
    if seconds < 0 or nanos < 0:
        return "-" + format_duration(-seconds, -nanos)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    second_text = f"{secs}.{nanos:09d}".rstrip("0") if nanos else str(secs)
    clock = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n) + (
        f"{second_text}S" if secs or nanos else ""
    )
    if not days and not clock:
        return "PT0S"
    return "P" + (f"{days}D" if days else "") + (f"T{clock}" if clock else "")


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


def _check_local_time(text: str) -> str:
    if not _LOCAL_TIME.match(text):
        raise ValueError("must be a wall-clock time YYYY-MM-DDTHH:MM[:SS], without offset")
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid date and time") from None
    return text


def zone_of(name: str) -> ZoneInfo:
    """The IANA zone, or ValueError."""
    if not _ZONE.match(name) or len(name) > 64:
        raise ValueError(f"{name!r} is not an IANA time zone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone, e.g. Europe/Paris") from None


def is_local_time(text: str) -> bool:
    try:
        _check_local_time(text)
    except ValueError:
        return False
    return True


def _check_zone(name: str) -> str:
    zone_of(name)
    return name


def _check_timestamp(text: str) -> str:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("must be an RFC 3339 timestamp, e.g. 2026-01-31T09:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must carry an offset (Z for UTC)")
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]
LocalTime = Annotated[str, AfterValidator(_check_local_time)]
TimeZone = Annotated[str, AfterValidator(_check_zone)]
StepId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TemplateId = Annotated[str, StringConstraints(pattern=r"^tpl_[A-Za-z0-9]{1,64}$")]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]


# ---- flow models ------------------------------------------------------------------------------


class TemplateRef(_Json):
    template_id: TemplateId = Field(description="The template (`tpl_...`)")
    version: int = Field(
        default=0, ge=0, le=INT32_MAX, description="A pinned version, or 0 (default) for the latest published"
    )


class SendStep(_Json):
    """Sends one message; billed per send. Channel, message type and template are needed to launch."""

    channel: Channel | None = _omit()
    message_type: MessageType | None = _omit()
    template: TemplateRef | None = _omit(description="For `channel`; its channel and message type must match")
    fallback: RcsFallback | None = _omit(
        description="RCS only, and required there: what happens to a contact whose device is not RCS capable"
    )
    sms_template: TemplateRef | None = _omit(description="The SMS template of the `sms_custom` fallback")
    provider: Text | None = _omit(description="A provider name; omitted means the channel's default")


class WaitStep(_Json):
    duration: Duration | None = _omit(
        description="ISO 8601 duration in days, hours, minutes, seconds (`PT1H`, `P2D`); at most 366 days"
    )


class TimestampValue(_Json):
    """A typed timestamp value (RFC 3339 with an offset)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"timestamp": "2026-01-31T12:00:00Z"}]}
    )

    timestamp: Annotated[str, AfterValidator(_check_timestamp)] = Field(
        description="RFC 3339 with an offset, e.g. `2026-01-31T12:00:00Z`"
    )


class InvalidValue(ValueError):
    """A value protobuf cannot carry; `str(exc)` is the rule."""


FilterValue: TypeAlias = (
    StrictBool | StrictInt | Annotated[float, Field(allow_inf_nan=False)] | StrictStr | TimestampValue
)

# Built-in contact fields as the contacts API names them -> the segment service's names.
BUILTIN_FIELDS = {
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
_BUILTINS_BACK = {v: k for k, v in BUILTIN_FIELDS.items()}
_TIMESTAMP_FIELDS = frozenset({"create_time", "update_time"})
_ORDERING = frozenset({Operator.GT, Operator.GTE, Operator.LT, Operator.LTE})
_CUSTOM_FIELD = re.compile(r"^fields\.[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _check_field_name(name: str) -> str:
    if name not in BUILTIN_FIELDS and not _CUSTOM_FIELD.match(name):
        raise ValueError(f"must be one of {', '.join(BUILTIN_FIELDS)} or fields.<name>")
    return name


FieldName = Annotated[str, AfterValidator(_check_field_name)]


class ConsentPredicate(_Json):
    channel: Channel | None = _omit()
    message_type: MessageType | None = _omit()
    status: ConsentStatus = Field(
        default=ConsentStatus.GRANTED, description="The contact's current consent for channel + message type"
    )


class EngagementPredicate(_Json):
    node_id: StepId | None = _omit(description="A SEND step earlier on this path")
    event: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = _omit(
        description="`delivered`, `opened`, `clicked` or `failed`"
    )


class ChannelUsedPredicate(_Json):
    node_id: StepId | None = _omit(description="A SEND step earlier on this path")
    channel: Channel | None = _omit(description="The channel that SEND actually used (after an RCS fallback)")


class Predicate(_Json):
    """One question about the contact: exactly one of `field` (with `op`, `value`), `tag`,
    `consent`, `engagement`, `channel_used`. The first three are written as a segment filter's
    leaf (see `POST /v1/segments`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"field": "fields.plan", "op": "eq", "value": "pro"},
                {"field": "fields.score", "op": "in", "value": [1, 2, 3]},
                {"tag": "vip"},
                {"consent": {"channel": "SMS", "message_type": "MESSAGE", "status": "GRANTED"}},
                {"engagement": {"node_id": "s1", "event": "opened"}},
                {"channel_used": {"node_id": "s1", "channel": "SMS"}},
            ]
        },
    )

    field: FieldName | None = _omit(
        description=(
            "A contact field: `id`, `email`, `phone`, `first_name`, `last_name`, `external_id`, "
            "`status`, `created_at`, `updated_at`, or `fields.<name>`"
        )
    )
    op: Operator | None = _omit(
        description=(
            "With `field`: eq, neq, in (value is a list), gt, gte, lt, lte, contains, exists (no value)"
        )
    )
    value: FilterValue | list[FilterValue] | None = _omit(
        description=(
            'With `field`: typed like custom fields; a timestamp as {"timestamp": ...}, or a plain '
            "RFC 3339 string with gt/gte/lt/lte and for created_at/updated_at"
        )
    )
    tag: Tag | None = _omit(description="The contact carries this tag")
    consent: ConsentPredicate | None = _omit()
    engagement: EngagementPredicate | None = _omit(
        description="Did the message of a SEND step get this event?"
    )
    channel_used: ChannelUsedPredicate | None = _omit(description="Which channel did a SEND step use?")

    @model_validator(mode="after")
    def _one_kind(self) -> Predicate:
        _at_most_one(self, ("field", "tag", "consent", "engagement", "channel_used"), "a predicate")
        if self.field is None:
            if self.op is not None or self.value is not None:
                raise ValueError("op and value go with field")
            return self
        # The flow rules do not look inside a comparison, so its shape is checked here.
        if self.op is None:
            raise ValueError("op: is required with field")
        if self.op == Operator.EXISTS:
            if self.value is not None:
                raise ValueError("value: exists takes no value")
        elif self.op == Operator.IN:
            if not isinstance(self.value, list) or not self.value:
                raise ValueError("value: in takes a non-empty list of values")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"value: {self.op.value} takes one value (in takes a list)")
        try:
            _field_condition(self)
        except ValueError as exc:
            raise ValueError(f"value: {exc}") from None
        return self


class ConditionStep(_Json):
    predicate: Predicate | None = _omit()
    yes: list[Step] = Field(default_factory=list, description="Steps when the predicate holds")
    no: list[Step] = Field(default_factory=list, description="Steps when it does not")


class AbVariant(_Json):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = _omit()
    weight: int = Field(default=0, ge=0, le=100, description="Integer share; the weights sum to 100")
    steps: list[Step] = Field(default_factory=list)


class AbTestStep(_Json):
    variants: list[AbVariant] = Field(default_factory=list, max_length=16, description="2 to 4 variants")


class TagStep(_Json):
    tag: Tag | None = _omit()
    action: TagAction | None = _omit()


class EndStep(_Json):
    pass


class Step(_Json):
    """One node: `id`, optional `name`, and exactly one kind."""

    id: StepId | None = _omit(description="Unique in the flow, stable across edits: 1-64 of A-Z a-z 0-9 _ -")
    name: Text | None = _omit(description="A label for people")
    send: SendStep | None = _omit()
    wait: WaitStep | None = _omit()
    condition: ConditionStep | None = _omit(description="Two branches; the last step of its sequence")
    ab_test: AbTestStep | None = _omit(description="2 to 4 weighted variants; the last step of its sequence")
    tag: TagStep | None = _omit(description="Adds or removes one tag on the contact")
    end: EndStep | None = _omit(description="Completes the execution")

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        _at_most_one(self, KINDS, "a step")
        return self


class Flow(_Json):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "steps": [
                        {
                            "id": "s1",
                            "send": {
                                "channel": "EMAIL",
                                "message_type": "MESSAGE",
                                "template": {"template_id": "tpl_0123abcd", "version": 0},
                            },
                        },
                        {"id": "w1", "wait": {"duration": "P1D"}},
                        {
                            "id": "c1",
                            "condition": {
                                "predicate": {"engagement": {"node_id": "s1", "event": "opened"}},
                                "yes": [
                                    {"id": "t1", "tag": {"tag": "engaged", "action": "ADD"}},
                                    {"id": "e1", "end": {}},
                                ],
                                "no": [{"id": "e2", "end": {}}],
                            },
                        },
                    ]
                }
            ]
        },
    )

    steps: list[Step] = Field(default_factory=list, description="The entry sequence")

    @model_validator(mode="after")
    def _depth(self) -> Flow:
        for _step, path, depth in walk(self.steps, "steps", 0):
            if depth > flows.MAX_DEPTH:
                raise ValueError(f"{path}: branches nest at most {flows.MAX_DEPTH} deep")
        return self


ConditionStep.model_rebuild()
AbVariant.model_rebuild()


def _at_most_one(model: BaseModel, names: tuple[str, ...], what: str) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) > 1:
        raise ValueError(f"{what} has exactly one of {', '.join(names)}; got {' and '.join(given)}")


def walk(steps: list[Step], path: str, depth: int) -> Iterator[tuple[Step, str, int]]:
    """Every step with its JSON path (dot separated) and split depth."""
    for i, step in enumerate(steps):
        here = f"{path}.{i}"
        yield step, here, depth
        if step.condition is not None:
            yield from walk(step.condition.yes, f"{here}.condition.yes", depth + 1)
            yield from walk(step.condition.no, f"{here}.condition.no", depth + 1)
        elif step.ab_test is not None:
            for v, variant in enumerate(step.ab_test.variants):
                yield from walk(variant.steps, f"{here}.ab_test.variants.{v}.steps", depth + 1)


# ---- triggers ---------------------------------------------------------------------------------


class ManualTrigger(_Json):
    """An operator starts it (`POST /v1/campaigns/{id}/start`)."""


class ApiTrigger(_Json):
    """Your backend starts a run per call (`POST /v1/campaigns/{id}/trigger`)."""


class ScheduleTrigger(_Json):
    at: LocalTime | None = _omit(
        description="Wall-clock date and time in `time_zone`, `YYYY-MM-DDTHH:MM[:SS]` (DST-correct)"
    )
    time_zone: TimeZone | None = _omit(description="IANA zone, e.g. `Europe/Paris`")

    @model_validator(mode="after")
    def _both(self) -> ScheduleTrigger:
        if (self.at is None) != (self.time_zone is None):
            raise ValueError("at and time_zone go together (or both are left for the schedule call)")
        return self


class EventTrigger(_Json):
    event_type: Annotated[str, StringConstraints(min_length=1, max_length=80)] | None = _omit(
        description="A contact event, `contact.<type>`, e.g. `contact.created`"
    )
    required_tag: Tag | None = _omit(description="Only contacts carrying this tag enter")
    allow_reentry: bool = Field(
        default=False, description="A contact may enter again after its execution ended"
    )


class Trigger(_Json):
    """Exactly one of `manual`, `api`, `schedule`, `event`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"schedule": {"at": "2026-03-29T09:00", "time_zone": "Europe/Paris"}}]
        },
    )

    manual: ManualTrigger | None = _omit()
    api: ApiTrigger | None = _omit()
    schedule: ScheduleTrigger | None = _omit()
    event: EventTrigger | None = _omit(description="Each contact whose event matches enters")

    @model_validator(mode="after")
    def _exactly_one(self) -> Trigger:
        names = ("manual", "api", "schedule", "event")
        _at_most_one(self, names, "a trigger")
        if all(getattr(self, n) is None for n in names):
            raise ValueError(f"a trigger needs one of {', '.join(names)}")
        return self


# ---- JSON -> proto ----------------------------------------------------------------------------


def _ref_to_pb(ref: TemplateRef | None) -> tpb.TemplateRef | None:
    return None if ref is None else tpb.TemplateRef(template_id=ref.template_id, version=ref.version)


def _typed_pb(value: Any, *, timestamp_string: bool) -> common.FieldValue:
    """A predicate operand as a typed FieldValue (a plain string is a timestamp where only a
    timestamp makes sense: ordering operators and the created_at/updated_at fields)."""
    if isinstance(value, TimestampValue):
        return common.FieldValue(timestamp_value=value.timestamp)
    if isinstance(value, bool):
        return common.FieldValue(bool_value=value)
    if isinstance(value, int | float):
        try:
            return common.FieldValue(number_value=float(value))
        except OverflowError:
            raise InvalidValue("number is too large") from None
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue("must be valid Unicode text") from None
    if timestamp_string:
        _check_timestamp(text)
        return common.FieldValue(timestamp_value=text)
    return common.FieldValue(string_value=text)


def _field_condition(pred: Predicate) -> spb.FieldCondition:
    assert pred.field is not None and pred.op is not None
    name = BUILTIN_FIELDS.get(pred.field, pred.field)
    timestamps = name in _TIMESTAMP_FIELDS or pred.op in _ORDERING

    def typed(value: Any) -> common.FieldValue:
        return _typed_pb(value, timestamp_string=timestamps and isinstance(value, str))

    cond = spb.FieldCondition(field=name, operator=_enum_to_pb(pred.op, spb.Operator, "OPERATOR_"))
    if isinstance(pred.value, list):
        cond.values.extend(typed(v) for v in pred.value)
    elif pred.value is not None:
        cond.value.CopyFrom(typed(pred.value))
    return cond


def _predicate_to_pb(pred: Predicate) -> cpb.Predicate:
    out = cpb.Predicate()
    if pred.field is not None:
        out.attribute.CopyFrom(_field_condition(pred))
    elif pred.tag is not None:
        out.tag.tag = pred.tag
    elif pred.consent is not None:
        c = pred.consent
        out.consent.SetInParent()
        out.consent.channel = channel_to_pb(c.channel)
        out.consent.message_type = _enum_to_pb(c.message_type, common.MessageType, "MESSAGE_TYPE_")
        out.consent.status = _enum_to_pb(c.status, spb.ConsentStatus, "CONSENT_STATUS_")
    elif pred.engagement is not None:
        out.engagement.SetInParent()
        out.engagement.node_id = pred.engagement.node_id or ""
        out.engagement.event = pred.engagement.event or ""
    elif pred.channel_used is not None:
        out.channel_used.SetInParent()
        out.channel_used.node_id = pred.channel_used.node_id or ""
        out.channel_used.channel = channel_to_pb(pred.channel_used.channel)
    return out


def step_to_pb(step: Step) -> cpb.Step:
    out = cpb.Step(id=step.id or "", name=step.name or "")
    if step.send is not None:
        s = step.send
        out.send.SetInParent()
        out.send.channel = channel_to_pb(s.channel)
        out.send.message_type = _enum_to_pb(s.message_type, common.MessageType, "MESSAGE_TYPE_")
        out.send.fallback = _enum_to_pb(s.fallback, cpb.RcsFallback, "RCS_FALLBACK_")
        out.send.provider = s.provider or ""
        template, sms_template = _ref_to_pb(s.template), _ref_to_pb(s.sms_template)
        if template is not None:
            out.send.template.CopyFrom(template)
        if sms_template is not None:
            out.send.sms_template.CopyFrom(sms_template)
    elif step.wait is not None:
        out.wait.SetInParent()
        if step.wait.duration is not None:
            out.wait.duration.seconds = parse_duration(step.wait.duration)
    elif step.condition is not None:
        c = step.condition
        out.condition.SetInParent()
        if c.predicate is not None:
            out.condition.predicate.CopyFrom(_predicate_to_pb(c.predicate))
        out.condition.yes.SetInParent()
        out.condition.yes.steps.extend(step_to_pb(s) for s in c.yes)
        out.condition.no.SetInParent()
        out.condition.no.steps.extend(step_to_pb(s) for s in c.no)
    elif step.ab_test is not None:
        out.ab_test.SetInParent()
        for v in step.ab_test.variants:
            variant = out.ab_test.variants.add(name=v.name or "", weight=v.weight)
            variant.branch.SetInParent()
            variant.branch.steps.extend(step_to_pb(s) for s in v.steps)
    elif step.tag is not None:
        out.tag.SetInParent()
        out.tag.tag = step.tag.tag or ""
        out.tag.action = _enum_to_pb(step.tag.action, cpb.TagAction, "TAG_ACTION_")
    elif step.end is not None:
        out.end.SetInParent()
    return out


def flow_to_pb(flow: Flow) -> cpb.Flow:
    return cpb.Flow(steps=[step_to_pb(s) for s in flow.steps])


def schedule_to_pb(schedule: ScheduleTrigger) -> cpb.ScheduledTrigger:
    return cpb.ScheduledTrigger(local_time=schedule.at or "", time_zone=schedule.time_zone or "")


def trigger_to_pb(trigger: Trigger) -> cpb.Trigger:
    if trigger.manual is not None:
        return cpb.Trigger(manual=cpb.ManualTrigger())
    if trigger.api is not None:
        return cpb.Trigger(api=cpb.ApiTrigger())
    if trigger.schedule is not None:
        return cpb.Trigger(scheduled=schedule_to_pb(trigger.schedule))
    event = trigger.event or EventTrigger()
    return cpb.Trigger(
        event=cpb.EventTrigger(
            event_type=event.event_type or "",
            required_tag=event.required_tag or "",
            allow_reentry=event.allow_reentry,
        )
    )


# ---- proto -> JSON ----------------------------------------------------------------------------
# Built with model_construct: what the service stores is answered as it is, even when a flow made
# over gRPC breaks a rule the edge would refuse (validate names it; GET must not fail on it).


def _text(value: str) -> str | None:
    return value or None


def _ref_from_pb(ref: tpb.TemplateRef) -> TemplateRef:
    return TemplateRef.model_construct(template_id=ref.template_id, version=ref.version)


def _value_from_pb(value: common.FieldValue, timestamps: bool) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "timestamp_value":
        if timestamps:
            return value.timestamp_value
        return TimestampValue.model_construct(timestamp=value.timestamp_value)
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    return value.string_value


def _predicate_from_pb(pred: cpb.Predicate) -> Predicate:
    kind = pred.WhichOneof("kind")
    parts: dict[str, Any] = dict.fromkeys(
        ("field", "op", "value", "tag", "consent", "engagement", "channel_used")
    )
    if kind == "attribute":
        a = pred.attribute
        op = _enum_from_pb(a.operator, spb.Operator, "OPERATOR_", Operator)
        timestamps = a.field in _TIMESTAMP_FIELDS or op in _ORDERING
        parts["field"] = _BUILTINS_BACK.get(a.field, a.field) or None
        parts["op"] = op
        if op == Operator.IN or a.values:
            parts["value"] = [_value_from_pb(v, timestamps) for v in a.values]
        elif a.HasField("value"):
            parts["value"] = _value_from_pb(a.value, timestamps)
    elif kind == "tag":
        parts["tag"] = _text(pred.tag.tag)
    elif kind == "consent":
        c = pred.consent
        parts["consent"] = ConsentPredicate.model_construct(
            channel=channel_from_pb(c.channel),
            message_type=_enum_from_pb(c.message_type, common.MessageType, "MESSAGE_TYPE_", MessageType),
            status=_enum_from_pb(c.status, spb.ConsentStatus, "CONSENT_STATUS_", ConsentStatus)
            or ConsentStatus.GRANTED,
        )
    elif kind == "engagement":
        parts["engagement"] = EngagementPredicate.model_construct(
            node_id=_text(pred.engagement.node_id), event=_text(pred.engagement.event)
        )
    elif kind == "channel_used":
        parts["channel_used"] = ChannelUsedPredicate.model_construct(
            node_id=_text(pred.channel_used.node_id), channel=channel_from_pb(pred.channel_used.channel)
        )
    return Predicate.model_construct(**parts)


def step_from_pb(step: cpb.Step) -> Step:
    kind = flows.kind_of(step)
    parts: dict[str, Any] = {"id": _text(step.id), "name": _text(step.name)}
    if kind == flows.SEND:
        s = step.send
        parts["send"] = SendStep.model_construct(
            channel=channel_from_pb(s.channel),
            message_type=_enum_from_pb(s.message_type, common.MessageType, "MESSAGE_TYPE_", MessageType),
            template=_ref_from_pb(s.template) if s.HasField("template") else None,
            fallback=_enum_from_pb(s.fallback, cpb.RcsFallback, "RCS_FALLBACK_", RcsFallback),
            sms_template=_ref_from_pb(s.sms_template) if s.HasField("sms_template") else None,
            provider=_text(s.provider),
        )
    elif kind == flows.WAIT:
        w = step.wait
        duration = format_duration(w.duration.seconds, w.duration.nanos) if w.HasField("duration") else None
        parts["wait"] = WaitStep.model_construct(duration=duration)
    elif kind == flows.CONDITION:
        c = step.condition
        parts["condition"] = ConditionStep.model_construct(
            predicate=_predicate_from_pb(c.predicate) if c.HasField("predicate") else None,
            yes=[step_from_pb(s) for s in c.yes.steps],
            no=[step_from_pb(s) for s in c.no.steps],
        )
    elif kind == flows.AB_TEST:
        parts["ab_test"] = AbTestStep.model_construct(
            variants=[
                AbVariant.model_construct(
                    name=_text(v.name), weight=v.weight, steps=[step_from_pb(s) for s in v.branch.steps]
                )
                for v in step.ab_test.variants
            ]
        )
    elif kind == flows.TAG:
        parts["tag"] = TagStep.model_construct(
            tag=_text(step.tag.tag),
            action=_enum_from_pb(step.tag.action, cpb.TagAction, "TAG_ACTION_", TagAction),
        )
    elif kind == flows.END:
        parts["end"] = EndStep.model_construct()
    full = dict.fromkeys(("send", "wait", "condition", "ab_test", "tag", "end")) | parts
    return Step.model_construct(**full)


def flow_from_pb(flow: cpb.Flow) -> Flow:
    return Flow.model_construct(steps=[step_from_pb(s) for s in flow.steps])


def trigger_from_pb(trigger: cpb.Trigger) -> Trigger:
    kind = trigger.WhichOneof("kind")
    parts: dict[str, Any] = dict.fromkeys(("manual", "api", "schedule", "event"))
    if kind == "manual":
        parts["manual"] = ManualTrigger.model_construct()
    elif kind == "api":
        parts["api"] = ApiTrigger.model_construct()
    elif kind == "scheduled":
        parts["schedule"] = ScheduleTrigger.model_construct(
            at=_text(trigger.scheduled.local_time), time_zone=_text(trigger.scheduled.time_zone)
        )
    elif kind == "event":
        e = trigger.event
        parts["event"] = EventTrigger.model_construct(
            event_type=_text(e.event_type), required_tag=_text(e.required_tag), allow_reentry=e.allow_reentry
        )
    return Trigger.model_construct(**parts)


# ---- error paths ------------------------------------------------------------------------------

_BRANCH = re.compile(r"\.condition\.(yes|no)\.steps\[")
_INDEX = re.compile(r"\[(\d+)\]")
# A predicate's field comparison and tag are flat in the JSON (`{"field": ..., "op": ...}`).
_PREDICATE_PATHS = (
    (".predicate.attribute.field", ".predicate.field"),
    (".predicate.attribute.operator", ".predicate.op"),
    (".predicate.attribute.values", ".predicate.value"),
    (".predicate.attribute.value", ".predicate.value"),
    (".predicate.attribute", ".predicate"),
    (".predicate.tag.tag", ".predicate.tag"),
)


def json_path(proto_path: str) -> str:
    """The JSON path (dot separated, like every 400 detail) of a path in the proto flow.

    `steps[2].condition.yes.steps[0].send.template` -> `flow.steps.2.condition.yes.0.send.template`;
    an A/B variant's `branch.steps[i]` is the variant's `steps.i`.
    """
    path = _BRANCH.sub(r".condition.\1[", proto_path)
    path = path.replace(".branch.steps[", ".steps[")
    for proto_part, json_part in _PREDICATE_PATHS:
        path = path.replace(proto_part, json_part)
    if path.endswith(".branch"):
        path = path.removesuffix(".branch") + ".steps"
    return "flow." + _INDEX.sub(r".\1", path)


def node_path(flow: cpb.Flow, node_id: str) -> str | None:
    """The proto path of the step with this id, if the flow has it."""

    def find(steps: Any, path: str) -> str | None:
        for i, step in enumerate(steps):
            here = f"{path}[{i}]"
            if step.id == node_id:
                return here
            kind = flows.kind_of(step)
            if kind == flows.CONDITION:
                found = find(step.condition.yes.steps, f"{here}.condition.yes.steps") or find(
                    step.condition.no.steps, f"{here}.condition.no.steps"
                )
                if found:
                    return found
            elif kind == flows.AB_TEST:
                for v, variant in enumerate(step.ab_test.variants):
                    found = find(variant.branch.steps, f"{here}.ab_test.variants[{v}].branch.steps")
                    if found:
                        return found
        return None

    return find(flow.steps, "steps")


def error_field(path: str, node_id: str, flow: cpb.Flow | None, message: str = "") -> str:
    """Where a flow problem the campaign service reported lies, in the request's JSON.

    The service names flow rules by proto path (`steps[0].wait.duration`), template problems by
    node (`node:<id>`, the message naming the template) and campaign-level rules by field
    (`segment_id`).
    """
    if path == "steps" or path.startswith("steps["):
        return json_path(path)
    if path.startswith("node:") or (not path and node_id):
        node = path.removeprefix("node:") or node_id
        where = node_path(flow, node) if flow is not None else None
        if where is None:
            return f"flow.node:{node}"
        step = _step_at(flow, node) if flow is not None else None
        send = step.send if step is not None else None
        if (
            send is not None
            and send.sms_template.template_id
            and send.sms_template.template_id in message
            and send.template.template_id not in message
        ):
            return json_path(where) + ".send.sms_template"
        return json_path(where) + ".send.template"
    return path or "flow"


def _step_at(flow: cpb.Flow, node_id: str) -> cpb.Step | None:
    def find(steps: Any) -> cpb.Step | None:
        for step in steps:
            if step.id == node_id:
                return step  # type: ignore[no-any-return]
            kind = flows.kind_of(step)
            branches = (
                [step.condition.yes.steps, step.condition.no.steps]
                if kind == flows.CONDITION
                else [v.branch.steps for v in step.ab_test.variants]
                if kind == flows.AB_TEST
                else []
            )
            for branch in branches:
                found = find(branch)
                if found is not None:
                    return found
        return None

    return find(flow.steps)
