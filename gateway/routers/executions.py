"""`/v1/executions`: one contact's way through one run of a campaign, with its sends.

An execution carries the `trace_id` of the trace it runs under (the fan-out's trace, continued by
every node and nudge), which is what an SRE pastes into the tracing UI. The list of a campaign's
executions lives under the campaign (`GET /v1/campaigns/{id}/executions`).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path
from google.protobuf import timestamp_pb2
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import check_campaign, require
from gateway.backends import Backends, get_backends
from gateway.errors import ErrorBody, RateLimitedBody
from gateway.flows import Channel, channel_from_pb
from gateway.keys import Principal, Scope
from shoal.v1 import execution_pb2

router = APIRouter(prefix="/v1/executions", tags=["campaigns"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "Malformed request (e.g. not an execution id); names the field",
    },
    401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
    403: {
        "model": ErrorBody,
        "description": "The key lacks the scope, or is restricted to campaigns other than the execution's",
    },
    404: {"model": ErrorBody, "description": "No such execution in this workspace"},
    429: {
        "model": RateLimitedBody,
        "description": "The key's rate limit is spent; see `Retry-After`",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
    503: {"model": ErrorBody, "description": "The execution service is unavailable"},
}


class ExecutionState(enum.StrEnum):
    """The execution states of PRODUCT.md (lower case, as PRODUCT.md names them)."""

    pending = "pending"
    processing = "processing"
    completed = "completed"
    failed = "failed"
    skipped = "skipped"


class SendStatus(enum.StrEnum):
    ACCEPTED = "ACCEPTED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


def state_to_pb(state: ExecutionState | None) -> Any:
    if state is None:
        return execution_pb2.EXECUTION_STATE_UNSPECIFIED
    return execution_pb2.ExecutionState.Value("EXECUTION_STATE_" + state.value.upper())


def state_from_pb(number: int) -> ExecutionState | None:
    name = str(execution_pb2.ExecutionState.Name(number)).removeprefix("EXECUTION_STATE_").lower()
    return ExecutionState(name) if name in ExecutionState.__members__ else None


def time_of(message: Any, field: str) -> datetime | None:
    """A proto Timestamp field as an aware UTC datetime, or None when unset."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


class Send(BaseModel):
    """A message handed to a provider by a SEND node."""

    node_id: str
    channel: Channel | None = Field(description="The channel actually used (after an RCS fallback)")
    provider: str
    provider_message_id: str | None = Field(description="The provider's id of the message, when it gave one")
    status: SendStatus | None
    cost_cents: int = Field(description="What the send was billed, in integer cents (EUR)")
    created_at: datetime | None


class Execution(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ex_6b1f2c7e3c1a5d7e9a0b1c2d3e4f5a6b",
                    "campaign_id": "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94",
                    "run_id": "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f",
                    "contact_id": "c_01HZX3K8Q2ABCDEFGHJK",
                    "state": "pending",
                    "node_id": "w1",
                    "reason": None,
                    "ab_variant": None,
                    "wake_at": "2026-03-29T10:00:00Z",
                    "created_at": "2026-03-29T09:00:00Z",
                    "updated_at": "2026-03-29T09:00:01Z",
                    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                }
            ]
        }
    )

    id: str = Field(description="`ex_` + 32 hex digits")
    campaign_id: UUID
    run_id: str
    contact_id: str
    state: ExecutionState | None
    node_id: str | None = Field(description="The node the execution is at, or ended at")
    reason: str | None = Field(description="Why it failed or was skipped (e.g. `no_consent`)")
    ab_variant: str | None = Field(description="The A/B variant the contact was assigned, once it passed one")
    wake_at: datetime | None = Field(description="When a WAIT releases it (UTC)")
    created_at: datetime | None
    updated_at: datetime | None
    trace_id: str | None = Field(
        description="W3C trace id (32 hex digits) of the trace this execution runs in"
    )


class ExecutionDetail(Execution):
    sends: list[Send] = Field(description="The messages this execution sent, one per SEND node passed")


def execution_fields(e: execution_pb2.Execution) -> dict[str, Any]:
    return {
        "id": e.id,
        "campaign_id": e.campaign_id,
        "run_id": e.run_id,
        "contact_id": e.contact_id,
        "state": state_from_pb(e.state),
        "node_id": e.node_id or None,
        "reason": e.reason or None,
        "ab_variant": e.ab_variant or None,
        "wake_at": time_of(e, "wake_time"),
        "created_at": time_of(e, "create_time"),
        "updated_at": time_of(e, "update_time"),
        "trace_id": e.trace_id or None,
    }


def execution_from_pb(e: execution_pb2.Execution) -> Execution:
    return Execution(**execution_fields(e))


def send_from_pb(s: execution_pb2.Send) -> Send:
    status = str(execution_pb2.SendStatus.Name(s.status)).removeprefix("SEND_STATUS_")
    return Send(
        node_id=s.node_id,
        channel=channel_from_pb(s.channel),
        provider=s.provider,
        provider_message_id=s.provider_message_id or None,
        status=SendStatus(status) if status in SendStatus.__members__ else None,
        cost_cents=s.cost_cents,
        created_at=time_of(s, "create_time"),
    )


@router.get(
    "/{execution_id}",
    summary="One execution, with its sends and trace id",
    description=(
        "The execution of one contact in one run: its state, the node it is at, the A/B variant, "
        "the reason of a failure or skip, the `trace_id` to look the run up in tracing, and the "
        "messages it sent. A key restricted to listed campaigns sees only their executions (403 "
        "for others). Needs `campaigns:read`."
    ),
    response_model=ExecutionDetail,
    responses=_RESPONSES,
)
async def get_execution(
    execution_id: Annotated[
        str, Path(pattern=r"^ex_[0-9a-f]{32}$", description="Execution id (`ex_` + 32 hex digits)")
    ],
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
) -> ExecutionDetail:
    reply = await backends.executions.GetExecution(
        execution_pb2.GetExecutionRequest(workspace_id=principal.workspace_id, execution_id=execution_id)
    )
    # Only the execution says which campaign it belongs to, so this check follows the read.
    check_campaign(principal, reply.execution.campaign_id)
    return ExecutionDetail(**execution_fields(reply.execution), sends=[send_from_pb(s) for s in reply.sends])
