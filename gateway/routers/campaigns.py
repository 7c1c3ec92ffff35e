"""`/v1/campaigns`: the operational contract of PRODUCT.md ("Campaign API")."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Path, Response
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.auth import check_campaign, require
from gateway.backends import Backends, get_backends
from gateway.errors import ErrorBody, RateLimitedBody
from gateway.keys import Principal, Scope
from shoal.errors import ShoalError
from shoal.v1 import campaign_pb2

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
    data: dict[str, Any] | None = Field(
        default=None, description="A JSON object the templates can use (`{{ data.order.id }}`)"
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
    reply = await backends.campaigns.TriggerCampaign(
        campaign_pb2.TriggerCampaignRequest(
            workspace_id=principal.workspace_id,
            campaign_id=str(campaign_id),
            idempotency_key=body.idempotency_key or "",
            recipients=body.recipients or [],
            data=data,
            actor=principal.actor,
        )
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
