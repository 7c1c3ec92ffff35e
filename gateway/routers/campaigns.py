"""`/v1/campaigns`: the operational contract of PRODUCT.md ("Campaign API") and authoring.

Operations: trigger, pause, resume, status. Authoring and management: create, list, get, update
(PATCH), validate, estimate, schedule, unschedule, start, archive, and the campaign's runs, state
transitions and executions. The JSON form of flows and triggers is `gateway.flows`.

Scopes: reads (`GET`, and `POST .../validate`, which changes nothing) need `campaigns:read`;
everything else `campaigns:write` (trigger: `campaigns:trigger`). A key restricted to listed
campaigns sees only those in lists, gets 403 on any other, and may not create campaigns (403):
a campaign it created would be one it could not touch.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import grpc
from fastapi import APIRouter, Body, Depends, Path, Query, Response
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from gateway import flows
from gateway.auth import check_campaign, require
from gateway.backends import Backends, get_backends
from gateway.errors import ApiError, ErrorBody, ErrorDetail, RateLimitedBody
from gateway.keys import Principal, Scope
from gateway.payloads import MAX_JSON_DEPTH, JsonObject
from gateway.routers.executions import (
    Execution,
    ExecutionState,
    execution_from_pb,
)
from gateway.routers.executions import state_to_pb as execution_state_to_pb
from gateway.routers.executions import time_of as _time
from shoal.errors import FieldViolation, ShoalError, from_rpc_error
from shoal.v1 import campaign_pb2, execution_pb2
from shoal.v1.common_pb2 import PageRequest

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])

MAX_RECIPIENTS = 10_000
REPLAYED_HEADER = "Idempotent-Replayed"

_COMMON: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "Malformed request (e.g. the id is not a UUID); names the field",
    },
    401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
    403: {"model": ErrorBody, "description": "The key lacks the scope, or is restricted to other campaigns"},
    404: {"model": ErrorBody, "description": "No such campaign in this workspace"},
    429: {
        "model": RateLimitedBody,
        "description": "The key's rate limit is spent; see `Retry-After`",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
    503: {"model": ErrorBody, "description": "The campaign service is unavailable"},
}
_BALANCE: dict[int | str, dict[str, Any]] = {
    402: {"model": ErrorBody, "description": "Free balance does not cover the estimated cost"}
}

ContactId = Annotated[str, StringConstraints(pattern=r"^c_[A-Za-z0-9]{1,60}$")]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]


class CampaignState(enum.StrEnum):
    """The campaign states of PRODUCT.md."""

    DRAFT = "DRAFT"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    PAUSED_ERROR = "PAUSED_ERROR"
    PAUSED_BALANCE = "PAUSED_BALANCE"
    COMPLETED = "COMPLETED"
    COMPLETED_PARTIAL = "COMPLETED_PARTIAL"
    ARCHIVED = "ARCHIVED"


class ExecutionCounts(BaseModel):
    """Executions of the current run, by state."""

    pending: int = Field(ge=0)
    processing: int = Field(ge=0)
    completed: int = Field(ge=0)
    failed: int = Field(ge=0)
    skipped: int = Field(ge=0)


class CampaignStatus(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94",
                    "state": "RUNNING",
                    "run_id": "run_01",
                    "counts": {"pending": 120, "processing": 8, "completed": 870, "failed": 1, "skipped": 1},
                    "sent": 871,
                    "estimated_remaining_cost": 1536,
                }
            ]
        }
    )

    id: UUID
    state: CampaignState
    run_id: str | None = Field(description="The current (or last) run; null before the first launch")
    counts: ExecutionCounts
    sent: int = Field(ge=0, description="Messages handed to a provider in the current run")
    estimated_remaining_cost: int = Field(
        description=(
            "Projected cost of the executions still pending, in integer cents of EUR "
            "(1536 means EUR 15.36); never a float"
        )
    )


CampaignIdPath = Annotated[UUID, Path(description="Campaign id (a UUID)")]


class TriggerRequest(BaseModel):
    """Body of a trigger; every field is optional and an empty body is a trigger too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "idempotency_key": "order-4711",
                    "recipients": ["c_01HZX3K8Q2"],
                    "data": {"order": {"id": 4711, "total": "EUR 23.90"}},
                }
            ]
        },
    )

    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description="Repeat a trigger safely: the same key within 24 h returns the original run id",
    )
    recipients: list[ContactId] | None = Field(
        default=None,
        max_length=MAX_RECIPIENTS,
        description=(
            f"Contact ids (`c_...`, at most {MAX_RECIPIENTS:,}); omitted means the campaign's segment"
        ),
    )
    data: JsonObject | None = Field(
        default=None,
        description=(
            "A JSON object the templates can use (`{{ data.order.id }}`); at most "
            f"{MAX_JSON_DEPTH} levels deep"
        ),
    )


class TriggerAccepted(BaseModel):
    run_id: str = Field(description="The run this trigger started (or, on a replay, the original run)")
    status: Literal["RUNNING"] = "RUNNING"


class Paused(BaseModel):
    status: Literal["PAUSED"] = "PAUSED"


class Resumed(BaseModel):
    status: Literal["RUNNING"] = "RUNNING"


def state_name(value: int) -> CampaignState:
    """The PRODUCT.md name of a proto CampaignState (CAMPAIGN_STATE_RUNNING -> RUNNING)."""
    try:
        return CampaignState(campaign_pb2.CampaignState.Name(value).removeprefix("CAMPAIGN_STATE_"))
    except ValueError:
        # UNSPECIFIED or a value this gateway does not know yet: a bug upstream, not the client's.
        raise ShoalError(f"campaign service answered unknown state {value}", "bad_upstream_state") from None


@router.get(
    "/{campaign_id}/status",
    summary="Status of a campaign",
    description=(
        "State, current run, execution counts and the projected cost of what is still pending. "
        "Money is in integer cents (EUR)."
    ),
    response_model=CampaignStatus,
    responses=_COMMON,
)
async def get_campaign_status(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> CampaignStatus:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.GetCampaignStatus(
        campaign_pb2.GetCampaignStatusRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id)
        )
    )
    return CampaignStatus(
        id=UUID(reply.id) if reply.id else campaign_id,
        state=state_name(reply.state),
        run_id=reply.run_id or None,
        counts=ExecutionCounts(
            pending=reply.counts.pending,
            processing=reply.counts.processing,
            completed=reply.counts.completed,
            failed=reply.counts.failed,
            skipped=reply.counts.skipped,
        ),
        sent=reply.sent,
        estimated_remaining_cost=reply.estimated_remaining_cost_cents,
    )


@router.post(
    "/{campaign_id}/trigger",
    status_code=202,
    summary="Trigger an API-triggered campaign",
    description=(
        "Starts a run for the named recipients (or the campaign's segment). Idempotent with "
        "`idempotency_key` for 24 h: a replay answers 202 with the original run id and the "
        f"`{REPLAYED_HEADER}: true` header. Needs the `campaigns:trigger` scope."
    ),
    response_model=TriggerAccepted,
    responses={
        **_COMMON,
        **_BALANCE,
        409: {"model": ErrorBody, "description": "A run is in progress, or not an API-triggered campaign"},
        422: {"model": ErrorBody, "description": "The flow cannot launch (e.g. a template is not published)"},
    },
)
async def trigger_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_TRIGGER))],
    backends: Annotated[Backends, Depends(get_backends)],
    response: Response,
    body: Annotated[TriggerRequest | None, Body()] = None,
) -> TriggerAccepted:
    check_campaign(principal, str(campaign_id))
    body = body or TriggerRequest()
    data = struct_pb2.Struct()
    if body.data:
        data.update(body.data)
    # A launch refused for the flow names each problem by its JSON path, as start does.
    reply = await _precise(
        backends.campaigns.TriggerCampaign(
            campaign_pb2.TriggerCampaignRequest(
                workspace_id=principal.workspace_id,
                campaign_id=str(campaign_id),
                idempotency_key=body.idempotency_key or "",
                recipients=body.recipients or [],
                data=data,
                actor=principal.actor,
            )
        ),
        flow_of=lambda: _flow(backends, principal, campaign_id),
    )
    if reply.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return TriggerAccepted(run_id=reply.run_id)


@router.post(
    "/{campaign_id}/pause",
    summary="Pause a running campaign",
    description=(
        "Stops enqueuing new executions; executions inside a node finish that node. "
        "Needs the `campaigns:write` scope."
    ),
    response_model=Paused,
    responses={**_COMMON, 409: {"model": ErrorBody, "description": "Already paused, or completed"}},
)
async def pause_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Paused:
    check_campaign(principal, str(campaign_id))
    await backends.campaigns.PauseCampaign(
        campaign_pb2.PauseCampaignRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id), actor=principal.actor
        )
    )
    return Paused()


@router.post(
    "/{campaign_id}/resume",
    summary="Resume a paused campaign",
    description=(
        "From PAUSED, PAUSED_ERROR or PAUSED_BALANCE; re-queues only pending executions after "
        "checking the balance covers them. Needs the `campaigns:write` scope."
    ),
    response_model=Resumed,
    responses={**_COMMON, **_BALANCE, 409: {"model": ErrorBody, "description": "Not paused"}},
)
async def resume_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Resumed:
    check_campaign(principal, str(campaign_id))
    await backends.campaigns.ResumeCampaign(
        campaign_pb2.ResumeCampaignRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id), actor=principal.actor
        )
    )
    return Resumed()


# ---- authoring and management ----------------------------------------------------------------

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

_READ: dict[int | str, dict[str, Any]] = {
    **_COMMON,
    400: {
        "model": ErrorBody,
        "description": "Malformed request (an id, a filter, a cursor); names the field",
    },
}
_WRITE: dict[int | str, dict[str, Any]] = {
    **_COMMON,
    400: {
        "model": ErrorBody,
        "description": (
            "Malformed request or flow JSON; each detail names the field path (`flow.steps.2.send`)"
        ),
    },
}
_LAUNCH_BLOCKED: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorBody,
        "description": (
            "The flow or its templates break a launch rule: one detail per problem, `field` the path "
            "in the flow (`flow.steps.0.send.template`), `message` starting with the node id and rule"
        ),
    }
}

CampaignName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
SegmentId = Annotated[str, StringConstraints(pattern=r"^seg_[A-Za-z0-9]{1,64}$")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size (1-500)")]
Cursor = Annotated[
    str | None,
    Query(
        min_length=1, max_length=200, description="`next_cursor` of the previous page; omitted for the first"
    ),
]


class CampaignSummary(BaseModel):
    """A campaign as lists show it (the flow only on `GET /v1/campaigns/{id}`)."""

    id: UUID
    name: str
    segment_id: str | None = Field(
        description="The audience (`seg_...`); null for API/event campaigns without"
    )
    trigger: flows.Trigger
    state: CampaignState
    flow_version: int = Field(description="Grows by one on every flow edit; a run records the version it ran")
    current_run_id: str | None = Field(description="The current (or last) run; null before the first launch")
    due_at: datetime | None = Field(description="When SCHEDULED: the instant (UTC) it starts")
    created_at: datetime
    updated_at: datetime


class Campaign(CampaignSummary):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94",
                    "name": "Welcome series",
                    "segment_id": "seg_01HZX3K8Q2ABCDEFGHJK",
                    "trigger": {"manual": {}},
                    "state": "DRAFT",
                    "flow_version": 1,
                    "current_run_id": None,
                    "due_at": None,
                    "created_at": "2026-03-01T09:00:00Z",
                    "updated_at": "2026-03-01T09:00:00Z",
                    "flow": {
                        "steps": [
                            {
                                "id": "s1",
                                "send": {
                                    "channel": "EMAIL",
                                    "message_type": "MESSAGE",
                                    "template": {"template_id": "tpl_0123abcd", "version": 0},
                                },
                            },
                            {"id": "e1", "end": {}},
                        ]
                    },
                }
            ]
        }
    )

    flow: flows.Flow


class CampaignPage(BaseModel):
    items: list[CampaignSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last")


class CampaignCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "Welcome series",
                    "segment_id": "seg_01HZX3K8Q2ABCDEFGHJK",
                    "trigger": {"schedule": {"at": "2026-03-29T09:00", "time_zone": "Europe/Paris"}},
                    "flow": {
                        "steps": [
                            {
                                "id": "s1",
                                "send": {
                                    "channel": "EMAIL",
                                    "message_type": "MESSAGE",
                                    "template": {"template_id": "tpl_0123abcd", "version": 0},
                                },
                            },
                            {"id": "e1", "end": {}},
                        ]
                    },
                }
            ]
        },
    )

    name: CampaignName
    segment_id: SegmentId | None = Field(
        default=None, description="The audience; required to launch a manual or scheduled campaign"
    )
    trigger: flows.Trigger
    flow: flows.Flow = Field(
        default_factory=flows.Flow,
        description="May be incomplete while DRAFT; `validate` says what is missing",
    )


class CampaignUpdate(BaseModel):
    """Only the fields given change; a DRAFT only (409 otherwise). `segment_id: null` clears it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "Welcome series (v2)", "flow": {"steps": [{"id": "e1", "end": {}}]}}]
        },
    )

    name: CampaignName | None = None
    segment_id: SegmentId | None = None
    trigger: flows.Trigger | None = None
    flow: flows.Flow | None = None

    @field_validator("name", "trigger", "flow", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be left out, not null")
        return value


class FlowProblem(BaseModel):
    node_id: str | None = Field(description="The step that breaks the rule; null for campaign-level rules")
    field: str = Field(description="Path in the campaign JSON, e.g. `flow.steps.2.ab_test.variants`")
    rule: str = Field(description="Stable rule name, e.g. `ab_test.weights`, `path.ends_in_end`")
    message: str


class ValidationResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "valid": False,
                    "errors": [
                        {
                            "node_id": "ab",
                            "field": "flow.steps.1.ab_test.variants",
                            "rule": "ab_test.weights",
                            "message": "weights must sum to 100",
                        }
                    ],
                }
            ]
        }
    )

    valid: bool
    errors: list[FlowProblem]


class CampaignEstimate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "audience_size": 1200,
                    "expected_cost_cents": 1536,
                    "upper_bound_cost_cents": 2400,
                    "free_balance_cents": 10000,
                    "balance_sufficient": True,
                }
            ]
        }
    )

    audience_size: int = Field(description="Contacts in the segment now")
    expected_cost_cents: int = Field(
        description=(
            "Expected cost in integer cents (EUR): A/B branches by weight, CONDITION branches split "
            "evenly. Launch is refused (402) when free balance is below this figure"
        )
    )
    upper_bound_cost_cents: int = Field(
        description="Cost if every contact took the most expensive branch at every split, in cents"
    )
    free_balance_cents: int = Field(description="The workspace's free balance now, in cents")
    balance_sufficient: bool = Field(
        description="Free balance covers the expected cost: a launch now is not 402"
    )


class ScheduleRequest(BaseModel):
    """When to start. An empty body schedules the time the campaign's trigger already holds."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"at": "2026-03-29T09:00", "time_zone": "Europe/Paris"},
                {"at": "2026-03-29T07:00:00Z", "time_zone": "Europe/Paris"},
            ]
        },
    )

    at: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None,
        description=(
            "A wall-clock time in `time_zone` (`YYYY-MM-DDTHH:MM[:SS]`, DST-correct), or an RFC 3339 "
            "instant with an offset, kept as that instant's wall-clock time in `time_zone` (UTC when "
            "`time_zone` is left out)"
        ),
    )
    time_zone: flows.TimeZone | None = Field(default=None, description="IANA zone, e.g. `Europe/Paris`")


class LaunchAccepted(BaseModel):
    run_id: str = Field(description="The run this launch started")
    status: Literal["RUNNING"] = "RUNNING"


class RunState(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPLETED_PARTIAL = "COMPLETED_PARTIAL"


class Run(BaseModel):
    id: str
    flow_version: int = Field(description="The flow version the run executes")
    state: RunState | None
    started_at: datetime | None
    ended_at: datetime | None = Field(description="When the last execution ended; null while running")
    idempotency_key: str | None = Field(description="The trigger's idempotency key, if it had one")


class RunPage(BaseModel):
    items: list[Run] = Field(description="Newest first")
    next_cursor: str | None


class Transition(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "from_state": "RUNNING",
                    "to_state": "PAUSED_BALANCE",
                    "actor": "billing",
                    "reason": "free balance exhausted",
                    "at": "2026-03-29T09:12:03Z",
                    "run_id": "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f",
                }
            ]
        }
    )

    from_state: CampaignState
    to_state: CampaignState
    actor: str = Field(
        description=(
            "Who or what moved it: `api_key:<key id>`, `operator`, `scheduler`, `billing`, "
            "`breaker:<provider>`, `execution` (completion), `system` (an undone launch)"
        )
    )
    reason: str | None
    at: datetime
    run_id: str | None


class TransitionPage(BaseModel):
    items: list[Transition] = Field(description="Oldest first")
    next_cursor: str | None


class ExecutionPage(BaseModel):
    items: list[Execution] = Field(description="Ordered by execution id")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last")


# ---- mapping ----------------------------------------------------------------------------------


def _summary_fields(c: campaign_pb2.Campaign) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "segment_id": c.segment_id or None,
        "trigger": flows.trigger_from_pb(c.trigger),
        "state": state_name(c.state),
        "flow_version": c.flow_version,
        "current_run_id": c.current_run_id or None,
        "due_at": _time(c, "due_time"),
        "created_at": _time(c, "create_time"),
        "updated_at": _time(c, "update_time"),
    }


def to_summary(c: campaign_pb2.Campaign) -> CampaignSummary:
    return CampaignSummary(**_summary_fields(c))


def to_campaign(c: campaign_pb2.Campaign) -> Campaign:
    return Campaign(**_summary_fields(c), flow=flows.flow_from_pb(c.flow))


def to_run(r: campaign_pb2.Run) -> Run:
    state = str(campaign_pb2.RunState.Name(r.state)).removeprefix("RUN_STATE_")
    return Run(
        id=r.id,
        flow_version=r.flow_version,
        state=RunState(state) if state in RunState.__members__ else None,
        started_at=_time(r, "start_time"),
        ended_at=_time(r, "end_time"),
        idempotency_key=r.idempotency_key or None,
    )


def to_transition(t: campaign_pb2.Transition) -> Transition:
    return Transition(
        from_state=state_name(t.from_state),
        to_state=state_name(t.to_state),
        actor=t.actor,
        reason=t.reason or None,
        at=_time(t, "time") or datetime.fromtimestamp(0, UTC),
        run_id=t.run_id or None,
    )


# The campaign service describes a launch problem as "<node id>: <rule>: <message>".
_NODE_PREFIX = re.compile(r"^([A-Za-z0-9_-]{1,64}): ")


def _violation_text(description: str) -> str:
    # The service writes "<node id>: <rule>: <message>"; a campaign-level problem has no node.
    return description.removeprefix(": ")


async def _precise(
    call: Awaitable[T],
    *,
    rename: Mapping[str, str] | None = None,
    flow_of: Callable[[], Awaitable[campaign_pb2.Flow]] | None = None,
) -> T:
    """Await a backend call; on failure raise its domain error with fields named as in our JSON.

    `rename` maps the service's field names to ours; `flow_of` (an async function giving the
    campaign's proto flow) resolves a launch problem reported by node to its path in the flow.
    """
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
    if error.reason == "launch_blocked":
        flow = None
        if flow_of is not None and any(v.field.startswith("node:") for v in error.violations):
            try:
                flow = await flow_of()
            except grpc.aio.AioRpcError:
                flow = None
        violations = []
        for v in error.violations:
            match = _NODE_PREFIX.match(v.description)
            field = flows.error_field(v.field, match.group(1) if match else "", flow, v.description)
            violations.append(FieldViolation(field, _violation_text(v.description)))
        error.violations = violations
    elif rename:
        error.violations = [
            FieldViolation(rename.get(v.field, v.field), v.description) for v in error.violations
        ]
        for old, new in rename.items():
            error.message = error.message.replace(f"{old}:", f"{new}:")
    raise error


_AUTHORING_FIELDS = {
    "schedule.local_time": "trigger.schedule.at",
    "schedule.time_zone": "trigger.schedule.time_zone",
}


def _flow_problems(errors: Any, flow: campaign_pb2.Flow | None) -> list[FlowProblem]:
    return [
        FlowProblem(
            node_id=e.node_id or None,
            field=flows.error_field(e.path, e.node_id, flow, e.message),
            rule=e.rule,
            message=e.message,
        )
        for e in errors
    ]


async def _get(backends: Backends, principal: Principal, campaign_id: UUID) -> campaign_pb2.Campaign:
    reply = await backends.campaigns.GetCampaign(
        campaign_pb2.GetCampaignRequest(workspace_id=principal.workspace_id, campaign_id=str(campaign_id))
    )
    campaign: campaign_pb2.Campaign = reply.campaign
    return campaign


def _bad_request(field: str, message: str) -> ApiError:
    return ApiError(
        400,
        "validation_failed",
        f"invalid request: {field}: {message}",
        details=[ErrorDetail(field=field, message=message)],
    )


# ---- routes -----------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    summary="Create a campaign (DRAFT)",
    description=(
        "A new DRAFT campaign with its trigger and flow. The flow may be incomplete: `validate` "
        "lists what breaks the rules and launch refuses until it is fixed; only malformed JSON is "
        "a 400 here. A key restricted to listed campaigns may not create campaigns (403). "
        "Needs `campaigns:write`."
    ),
    response_model=Campaign,
    responses={k: v for k, v in _WRITE.items() if k != 404},
)
async def create_campaign(
    body: CampaignCreate,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Campaign:
    if principal.campaign_ids:
        raise ApiError(
            403, "forbidden", "this API key is restricted to listed campaigns; it cannot create campaigns"
        )
    reply = await _precise(
        backends.campaigns.CreateCampaign(
            campaign_pb2.CreateCampaignRequest(
                workspace_id=principal.workspace_id,
                name=body.name,
                segment_id=body.segment_id or "",
                trigger=flows.trigger_to_pb(body.trigger),
                flow=flows.flow_to_pb(body.flow),
            )
        ),
        rename=_AUTHORING_FIELDS,
    )
    return to_campaign(reply.campaign)


@router.get(
    "",
    summary="List campaigns",
    description=(
        "The workspace's campaigns ordered by id, optionally in one state; without their flows. "
        "A key restricted to listed campaigns sees only those. Needs `campaigns:read`."
    ),
    response_model=CampaignPage,
    responses={k: v for k, v in _READ.items() if k != 404},
)
async def list_campaigns(
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    state: Annotated[CampaignState | None, Query(description="Only campaigns in this state")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> CampaignPage:
    wanted: Any = campaign_pb2.CampaignState.Value(f"CAMPAIGN_STATE_{state.value}") if state else 0
    if principal.campaign_ids:
        # A restricted key names a handful of campaigns: read those, not the whole workspace.
        items: list[CampaignSummary] = []
        ids = sorted(i for i in principal.campaign_ids if cursor is None or i > cursor)
        for index, cid in enumerate(ids):
            try:
                reply = await backends.campaigns.GetCampaign(
                    campaign_pb2.GetCampaignRequest(workspace_id=principal.workspace_id, campaign_id=cid)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                raise
            if wanted and reply.campaign.state != wanted:
                continue
            items.append(to_summary(reply.campaign))
            if len(items) == limit:
                return CampaignPage(items=items, next_cursor=cid if index < len(ids) - 1 else None)
        return CampaignPage(items=items, next_cursor=None)
    listed = await backends.campaigns.ListCampaigns(
        campaign_pb2.ListCampaignsRequest(
            workspace_id=principal.workspace_id,
            state=wanted,
            page=PageRequest(page_size=limit, page_token=cursor or ""),
        )
    )
    return CampaignPage(
        items=[to_summary(c) for c in listed.campaigns], next_cursor=listed.page.next_page_token or None
    )


@router.get(
    "/{campaign_id}",
    summary="Get a campaign with its flow",
    description="The campaign, its trigger and its current flow. Needs `campaigns:read`.",
    response_model=Campaign,
    responses=_READ,
)
async def get_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Campaign:
    check_campaign(principal, str(campaign_id))
    return to_campaign(await _get(backends, principal, campaign_id))


@router.patch(
    "/{campaign_id}",
    summary="Edit a DRAFT campaign",
    description=(
        "Changes only the fields given (name, segment_id, trigger, flow); a new flow is a new flow "
        "version. Only a DRAFT can be edited: 409 otherwise (unschedule a SCHEDULED campaign "
        "first). `segment_id: null` clears the segment. Needs `campaigns:write`."
    ),
    response_model=Campaign,
    responses={**_WRITE, 409: {"model": ErrorBody, "description": "The campaign is not a DRAFT"}},
)
async def update_campaign(
    campaign_id: CampaignIdPath,
    body: CampaignUpdate,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Campaign:
    check_campaign(principal, str(campaign_id))
    mask = sorted(body.model_fields_set)
    if not mask:
        raise _bad_request("request", "give at least one of name, segment_id, trigger, flow")
    request = campaign_pb2.UpdateCampaignRequest(
        workspace_id=principal.workspace_id,
        campaign_id=str(campaign_id),
        name=body.name or "",
        segment_id=body.segment_id or "",
        update_mask=mask,
    )
    if body.trigger is not None:
        request.trigger.CopyFrom(flows.trigger_to_pb(body.trigger))
    if body.flow is not None:
        request.flow.CopyFrom(flows.flow_to_pb(body.flow))
    reply = await _precise(backends.campaigns.UpdateCampaign(request), rename=_AUTHORING_FIELDS)
    return to_campaign(reply.campaign)


@router.post(
    "/{campaign_id}/validate",
    summary="Check a campaign against the launch rules",
    description=(
        "Every rule the flow, its templates and the campaign break, each with the node id, the "
        "path in the campaign JSON and the rule. A broken rule is data here (200 with "
        "`valid: false`), not an error status. Changes nothing, so `campaigns:read` is enough."
    ),
    response_model=ValidationResult,
    responses=_READ,
)
async def validate_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> ValidationResult:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.ValidateCampaign(
        campaign_pb2.ValidateCampaignRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id)
        )
    )
    flow = None
    if any(e.path.startswith("node:") for e in reply.errors):
        flow = (await _get(backends, principal, campaign_id)).flow
    return ValidationResult(valid=reply.ok, errors=_flow_problems(reply.errors, flow))


@router.get(
    "/{campaign_id}/estimate",
    summary="Audience and projected cost",
    description=(
        "The audience size now, the expected cost (A/B branches by weight, CONDITION branches split "
        "evenly: what launch checks against free balance) and the upper bound (the most expensive "
        "branch at every split), in integer cents (EUR). Needs `campaigns:read`."
    ),
    response_model=CampaignEstimate,
    responses=_READ,
)
async def estimate_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> CampaignEstimate:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.EstimateCampaign(
        campaign_pb2.EstimateCampaignRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id)
        )
    )
    return CampaignEstimate(
        audience_size=reply.audience_size,
        expected_cost_cents=reply.expected_cost_cents,
        upper_bound_cost_cents=reply.upper_bound_cost_cents,
        free_balance_cents=reply.free_balance_cents,
        balance_sufficient=reply.free_balance_cents >= reply.expected_cost_cents,
    )


def _schedule_pb(body: ScheduleRequest) -> campaign_pb2.ScheduledTrigger:
    """The wall-clock time and zone the campaign service schedules (400 on a bad combination)."""
    if body.at is None:
        if body.time_zone is not None:
            raise _bad_request("at", "is required with time_zone")
        return campaign_pb2.ScheduledTrigger()
    if flows.is_local_time(body.at):
        if body.time_zone is None:
            raise _bad_request("time_zone", "is required with a wall-clock at")
        return campaign_pb2.ScheduledTrigger(local_time=body.at, time_zone=body.time_zone)
    try:
        instant = datetime.fromisoformat(body.at)
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise _bad_request(
            "at", "must be YYYY-MM-DDTHH:MM[:SS] in time_zone, or an RFC 3339 instant with an offset"
        )
    zone_name = body.time_zone or "UTC"
    zone = flows.zone_of(zone_name)
    wall = instant.astimezone(zone).replace(tzinfo=None, microsecond=0)
    if wall.replace(tzinfo=zone, fold=0).astimezone(UTC) != instant.replace(microsecond=0).astimezone(UTC):
        # The second occurrence of a repeated wall-clock time: a schedule runs at the first.
        raise _bad_request(
            "at", f"is the second occurrence of {wall.isoformat()} in {zone_name}; give it as UTC"
        )
    return campaign_pb2.ScheduledTrigger(local_time=wall.isoformat(timespec="seconds"), time_zone=zone_name)


@router.post(
    "/{campaign_id}/schedule",
    summary="Schedule a DRAFT campaign",
    description=(
        "Moves a DRAFT campaign with a scheduled trigger to SCHEDULED, starting at `at` in "
        "`time_zone` (DST-correct: a time in the spring-forward gap runs shifted by the gap, a "
        "repeated time at its first occurrence). The flow and templates are checked now (422), not "
        "at the due time. An empty body uses the time the trigger holds. No recurrence: a "
        "schedule starts one run. Needs `campaigns:write`."
    ),
    response_model=Campaign,
    responses={
        **_WRITE,
        **_LAUNCH_BLOCKED,
        409: {"model": ErrorBody, "description": "Not a DRAFT, or not a campaign with a scheduled trigger"},
    },
)
async def schedule_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
    body: Annotated[ScheduleRequest | None, Body()] = None,
) -> Campaign:
    check_campaign(principal, str(campaign_id))
    body = body or ScheduleRequest()
    schedule = _schedule_pb(body)
    given = body.at is not None
    await _precise(
        backends.campaigns.ScheduleCampaign(
            campaign_pb2.ScheduleCampaignRequest(
                workspace_id=principal.workspace_id, campaign_id=str(campaign_id), schedule=schedule
            )
        ),
        rename={"schedule.local_time": "at", "schedule.time_zone": "time_zone"}
        if given
        else _AUTHORING_FIELDS,
        flow_of=lambda: _flow(backends, principal, campaign_id),
    )
    return to_campaign(await _get(backends, principal, campaign_id))


async def _flow(backends: Backends, principal: Principal, campaign_id: UUID) -> campaign_pb2.Flow:
    return (await _get(backends, principal, campaign_id)).flow


@router.post(
    "/{campaign_id}/unschedule",
    summary="Unschedule a SCHEDULED campaign",
    description="Back to DRAFT; the trigger keeps its time. Needs `campaigns:write`.",
    response_model=Campaign,
    responses={**_COMMON, 409: {"model": ErrorBody, "description": "The campaign is not SCHEDULED"}},
)
async def unschedule_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Campaign:
    check_campaign(principal, str(campaign_id))
    await backends.campaigns.UnscheduleCampaign(
        campaign_pb2.UnscheduleCampaignRequest(
            workspace_id=principal.workspace_id, campaign_id=str(campaign_id)
        )
    )
    return to_campaign(await _get(backends, principal, campaign_id))


@router.post(
    "/{campaign_id}/start",
    status_code=202,
    summary="Start a campaign now (manual launch)",
    description=(
        "Launches a DRAFT manual campaign (one run over its segment) or activates an event-triggered "
        "one. The flow and templates must pass validation (422 with one detail per problem), and "
        "free balance must cover the expected cost (402). The audience is fanned out in the "
        "background: follow it with `GET /v1/campaigns/{id}/status`. API-triggered campaigns start "
        "with `trigger` instead (409). Needs `campaigns:write`."
    ),
    response_model=LaunchAccepted,
    responses={
        **_COMMON,
        **_BALANCE,
        **_LAUNCH_BLOCKED,
        409: {"model": ErrorBody, "description": "Not a DRAFT, or an API-triggered campaign"},
    },
)
async def start_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> LaunchAccepted:
    check_campaign(principal, str(campaign_id))
    reply = await _precise(
        backends.campaigns.StartCampaign(
            campaign_pb2.StartCampaignRequest(
                workspace_id=principal.workspace_id, campaign_id=str(campaign_id), actor=principal.actor
            )
        ),
        flow_of=lambda: _flow(backends, principal, campaign_id),
    )
    return LaunchAccepted(run_id=reply.run_id)


@router.post(
    "/{campaign_id}/archive",
    summary="Archive a campaign",
    description="From DRAFT, COMPLETED or COMPLETED_PARTIAL; an archived campaign is read-only. "
    "Needs `campaigns:write`.",
    response_model=Campaign,
    responses={**_COMMON, 409: {"model": ErrorBody, "description": "Running, paused or scheduled"}},
)
async def archive_campaign(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_WRITE))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> Campaign:
    check_campaign(principal, str(campaign_id))
    await backends.campaigns.ArchiveCampaign(
        campaign_pb2.ArchiveCampaignRequest(workspace_id=principal.workspace_id, campaign_id=str(campaign_id))
    )
    return to_campaign(await _get(backends, principal, campaign_id))


def _page_after(ids: list[str], cursor: str | None) -> int:
    """Where a page starts in a list read whole: after the item the cursor names (400 if unknown)."""
    if cursor is None:
        return 0
    try:
        return ids.index(cursor) + 1
    except ValueError:
        raise _bad_request("cursor", "is not a cursor of this list") from None


@router.get(
    "/{campaign_id}/runs",
    summary="Runs of a campaign",
    description=(
        "Each launch is a run (an API-triggered campaign has one per accepted trigger), newest "
        "first. Needs `campaigns:read`."
    ),
    response_model=RunPage,
    responses=_READ,
)
async def list_runs(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> RunPage:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.ListRuns(
        campaign_pb2.ListRunsRequest(workspace_id=principal.workspace_id, campaign_id=str(campaign_id))
    )
    runs = list(reply.runs)
    start = _page_after([r.id for r in runs], cursor)
    page = runs[start : start + limit]
    more = start + limit < len(runs)
    return RunPage(items=[to_run(r) for r in page], next_cursor=page[-1].id if more and page else None)


@router.get(
    "/{campaign_id}/transitions",
    summary="State history of a campaign",
    description=(
        "Every state move, oldest first: from, to, who or what moved it, why, when, and the run. "
        "Needs `campaigns:read`."
    ),
    response_model=TransitionPage,
    responses=_READ,
)
async def list_transitions(
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> TransitionPage:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.ListTransitions(
        campaign_pb2.ListTransitionsRequest(workspace_id=principal.workspace_id, campaign_id=str(campaign_id))
    )
    transitions = list(reply.transitions)
    # The history only grows at its end, so a position is a stable cursor.
    if cursor is not None and not (cursor.isdigit() and int(cursor) <= len(transitions)):
        raise _bad_request("cursor", "is not a cursor of this list")
    start = int(cursor or 0)
    end = start + limit
    return TransitionPage(
        items=[to_transition(t) for t in transitions[start:end]],
        next_cursor=str(end) if end < len(transitions) else None,
    )


@router.get(
    "/{campaign_id}/executions",
    summary="Executions of a campaign",
    description=(
        "One execution per contact per run, ordered by id, filtered by run, state and the node an "
        "execution is at (or ended at). Needs `campaigns:read`."
    ),
    response_model=ExecutionPage,
    responses=_READ,
)
async def list_executions(
    *,
    campaign_id: CampaignIdPath,
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    run_id: Annotated[UUID | None, Query(description="Only this run's executions")] = None,
    state: Annotated[ExecutionState | None, Query(description="Only executions in this state")] = None,
    node_id: Annotated[
        str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Only executions at this node")
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> ExecutionPage:
    check_campaign(principal, str(campaign_id))
    await _get(backends, principal, campaign_id)  # 404 for a campaign this workspace does not have

    reply = await backends.executions.ListExecutions(
        execution_pb2.ListExecutionsRequest(
            workspace_id=principal.workspace_id,
            campaign_id=str(campaign_id),
            run_id=str(run_id) if run_id else "",
            state=execution_state_to_pb(state),
            node_id=node_id or "",
            page=PageRequest(page_size=limit, page_token=cursor or ""),
        )
    )
    return ExecutionPage(
        items=[execution_from_pb(e) for e in reply.executions],
        next_cursor=reply.page.next_page_token or None,
    )
