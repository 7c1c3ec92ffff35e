"""`/v1/campaigns`: the operational contract of PRODUCT.md ("Campaign API")."""

from __future__ import annotations

import enum
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from gateway.backends import Backends, get_backends
from gateway.errors import ErrorBody
from shoal.errors import ShoalError
from shoal.v1 import campaign_pb2

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "Malformed request (e.g. the id is not a UUID)"},
    404: {"model": ErrorBody, "description": "No such campaign in this workspace"},
    503: {"model": ErrorBody, "description": "The campaign service is unavailable"},
}


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
    responses=_ERRORS,
)
async def get_campaign_status(
    campaign_id: Annotated[UUID, Path(description="Campaign id (a UUID)")],
    backends: Annotated[Backends, Depends(get_backends)],
) -> CampaignStatus:
    # The workspace comes from the API key once keys exist; until then, the embedded default's.
    reply = await backends.campaigns.GetCampaignStatus(
        campaign_pb2.GetCampaignStatusRequest(
            workspace_id=backends.settings.workspace_id, campaign_id=str(campaign_id)
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
