"""`GET /v1/campaigns/{id}/funnel`: how a run's executions went through each node of its flow.

The execution service counts the run's executions by (node they are at or ended at, state,
reason, A/B variants) and its sends by (node, status) in one GROUP BY each (`GetRunFunnel`); the
per-node funnel is computed here from those rows and the flow the run executes.

A flow is a tree, so every node has exactly one path from the entry: the earlier steps of its
own sequence, the split (CONDITION or AB_TEST) that opens that sequence, and that split's path.
An execution at node X (or ended there) has passed every node on X's path, so:

- entered(N) = executions at nodes whose path includes N (N itself included);
- a CONDITION's yes / no = executions in the yes / no branch subtree;
- an AB_TEST's split = the variants recorded on the executions (`ab_variant`);
- a SEND's sent = the sends it recorded, by status; skipped and failed with their reasons.

An execution parked by a WAIT is at the step after the WAIT (pending, with a wake time): it has
passed the WAIT and is counted as having entered that next step, waiting there.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import check_campaign, require
from gateway.backends import Backends, get_backends
from gateway.errors import ApiError, ErrorBody, RateLimitedBody
from gateway.keys import Principal, Scope
from gateway.routers.executions import ExecutionState, SendStatus, state_from_pb
from shoal import flow as flows
from shoal.v1 import campaign_pb2, execution_pb2

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request (the campaign or run id); names the field"},
    401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
    403: {"model": ErrorBody, "description": "The key lacks the scope, or is restricted to other campaigns"},
    404: {"model": ErrorBody, "description": "No such campaign in this workspace, or no such run of it"},
    429: {
        "model": RateLimitedBody,
        "description": "The key's rate limit is spent; see `Retry-After`",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
    503: {"model": ErrorBody, "description": "The campaign or execution service is unavailable"},
}


class NodeType(enum.StrEnum):
    """The node types of PRODUCT.md."""

    SEND = "SEND"
    WAIT = "WAIT"
    CONDITION = "CONDITION"
    AB_TEST = "AB_TEST"
    TAG = "TAG"
    END = "END"


class StateCounts(BaseModel):
    """Executions at this node now (or that ended here), by state."""

    pending: int = Field(default=0, ge=0)
    processing: int = Field(default=0, ge=0)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    skipped: int = Field(default=0, ge=0)


class ReasonCount(BaseModel):
    reason: str = Field(description="As the execution records it, e.g. `no_consent`, `rcs_not_reachable`")
    count: int = Field(ge=0)


class SendCounts(BaseModel):
    """Messages a SEND node handed to a provider, by their status now."""

    accepted: int = Field(default=0, ge=0, description="Handed to the provider, no receipt yet")
    delivered: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)


class ConditionSplit(BaseModel):
    yes: int = Field(ge=0, description="Executions that took the yes branch")
    no: int = Field(ge=0, description="Executions that took the no branch")


class VariantCount(BaseModel):
    name: str
    weight: int = Field(description="The variant's declared weight (the weights sum to 100)")
    count: int = Field(ge=0, description="Executions assigned this variant")


class FunnelNode(BaseModel):
    node_id: str
    name: str | None = Field(description="The step's label, if it has one")
    type: NodeType | None = Field(description="Null for a step without a kind (an unfinished draft)")
    parent_id: str | None = Field(description="The CONDITION or AB_TEST whose branch holds this step")
    branch: str | None = Field(description="That branch: `yes`, `no`, or the variant's name")
    depth: int = Field(ge=0, description="How many splits enclose this step")
    path: list[str] = Field(description="Node ids from the entry to this node (itself last)")
    entered: int = Field(ge=0, description="Executions that reached this node (are at it or went past it)")
    at: StateCounts = Field(description="Executions at this node now, or that ended here, by state")
    sent: int | None = Field(description="SEND: messages sent (every status); null for other types")
    sends: SendCounts | None = Field(description="SEND: the sends by status; null for other types")
    skipped: list[ReasonCount] = Field(description="Executions skipped here, by reason (SEND)")
    failed: list[ReasonCount] = Field(description="Executions that failed here, by reason")
    condition: ConditionSplit | None = Field(description="CONDITION: the yes/no split; null otherwise")
    variants: list[VariantCount] | None = Field(description="AB_TEST: the variant split; null otherwise")


class Funnel(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "campaign_id": "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94",
                    "run_id": "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f",
                    "flow_version": 3,
                    "executions": 2,
                    "unplaced": 0,
                    "nodes": [
                        {
                            "node_id": "s1",
                            "name": "welcome",
                            "type": "SEND",
                            "parent_id": None,
                            "branch": None,
                            "depth": 0,
                            "path": ["s1"],
                            "entered": 2,
                            "at": {"pending": 0, "processing": 0, "completed": 0, "failed": 0, "skipped": 1},
                            "sent": 1,
                            "sends": {"accepted": 0, "delivered": 1, "failed": 0},
                            "skipped": [{"reason": "no_consent", "count": 1}],
                            "failed": [],
                            "condition": None,
                            "variants": None,
                        },
                        {
                            "node_id": "e1",
                            "name": None,
                            "type": "END",
                            "parent_id": None,
                            "branch": None,
                            "depth": 0,
                            "path": ["s1", "e1"],
                            "entered": 1,
                            "at": {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "skipped": 0},
                            "sent": None,
                            "sends": None,
                            "skipped": [],
                            "failed": [],
                            "condition": None,
                            "variants": None,
                        },
                    ],
                }
            ]
        }
    )

    campaign_id: UUID
    run_id: str | None = Field(description="The run counted; null when the campaign has not run yet")
    flow_version: int = Field(description="The flow version the run executes")
    executions: int = Field(ge=0, description="Executions of the run")
    unplaced: int = Field(
        ge=0, description="Executions at a node the flow does not have (should be 0; counted nowhere else)"
    )
    nodes: list[FunnelNode] = Field(description="Every step of the flow, depth first in flow order")


# ---- the computation (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a step sits in the flow tree."""

    node_id: str
    kind: str
    step: campaign_pb2.Step
    # Node ids from the entry to this step, itself last.
    path: tuple[str, ...]
    # (split id, branch) of every enclosing split, outermost first.
    branches: tuple[tuple[str, str], ...]


def placements(flow: campaign_pb2.Flow) -> dict[str, Placement]:
    """Every step of the flow by id, with its path from the entry, in flow order (depth first).

    A step's path is the path of the split opening its sequence, then the earlier steps of its
    sequence, then itself. A repeated id (an invalid draft) keeps its first placement.
    """
    out: dict[str, Placement] = {}

    def visit(steps: Sequence[campaign_pb2.Step], before: tuple[str, ...], branches: tuple[Any, ...]) -> None:
        path = before
        for step in steps:
            path = (*path, step.id)
            kind = flows.kind_of(step)
            if step.id not in out:
                out[step.id] = Placement(step.id, kind, step, path, branches)
            if kind == flows.CONDITION:
                visit(step.condition.yes.steps, path, (*branches, (step.id, "yes")))
                visit(step.condition.no.steps, path, (*branches, (step.id, "no")))
            elif kind == flows.AB_TEST:
                for variant in step.ab_test.variants:
                    visit(variant.branch.steps, path, (*branches, (step.id, variant.name)))

    visit(flow.steps, (), ())
    return out


def parse_variants(value: str) -> dict[str, str]:
    """`"ab1=A;ab2=B"` (as executions record them) -> {"ab1": "A", "ab2": "B"}."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        node, sep, variant = part.partition("=")
        if sep and node:
            out[node] = variant
    return out


_SEND_STATUS = {
    execution_pb2.SEND_STATUS_ACCEPTED: SendStatus.ACCEPTED,
    execution_pb2.SEND_STATUS_DELIVERED: SendStatus.DELIVERED,
    execution_pb2.SEND_STATUS_FAILED: SendStatus.FAILED,
}


def compute(
    flow: campaign_pb2.Flow,
    rows: Iterable[execution_pb2.FunnelRow],
    sends: Iterable[execution_pb2.SendCount],
) -> tuple[list[FunnelNode], int, int]:
    """The per-node funnel, the number of executions, and how many sit at unknown nodes."""
    placed = placements(flow)
    entered: Counter[str] = Counter()
    at: dict[str, Counter[ExecutionState]] = {n: Counter() for n in placed}
    skipped: dict[str, Counter[str]] = {n: Counter() for n in placed}
    failed: dict[str, Counter[str]] = {n: Counter() for n in placed}
    taken: Counter[tuple[str, str]] = Counter()  # (condition id, branch) -> executions in it
    variants: Counter[tuple[str, str]] = Counter()  # (ab id, variant) -> executions assigned it
    total = unplaced = 0
    for row in rows:
        count = int(row.count)
        total += count
        for ab_id, variant in parse_variants(row.ab_variant).items():
            variants[(ab_id, variant)] += count
        place = placed.get(row.node_id)
        if place is None:
            unplaced += count
            continue
        for node_id in place.path:
            entered[node_id] += count
        for split_id, branch in place.branches:
            taken[(split_id, branch)] += count
        state = state_from_pb(row.state)
        if state is not None:
            at[row.node_id][state] += count
        if state == ExecutionState.skipped:
            skipped[row.node_id][row.reason or "unknown"] += count
        elif state == ExecutionState.failed:
            failed[row.node_id][row.reason or "unknown"] += count
    sent: dict[str, Counter[SendStatus]] = {}
    for s in sends:
        status = _SEND_STATUS.get(s.status)
        if status is not None:
            sent.setdefault(s.node_id, Counter())[status] += int(s.count)
    nodes = []
    for node_id, place in placed.items():
        kind = place.kind
        by_status = sent.get(node_id, Counter())
        parent = place.branches[-1] if place.branches else None
        nodes.append(
            FunnelNode(
                node_id=node_id,
                name=place.step.name or None,
                type=NodeType(kind.upper()) if kind else None,
                parent_id=parent[0] if parent else None,
                branch=parent[1] if parent else None,
                depth=len(place.branches),
                path=list(place.path),
                entered=entered[node_id],
                at=StateCounts(**{state.value: n for state, n in at[node_id].items()}),
                sent=sum(by_status.values()) if kind == flows.SEND else None,
                sends=SendCounts(
                    accepted=by_status[SendStatus.ACCEPTED],
                    delivered=by_status[SendStatus.DELIVERED],
                    failed=by_status[SendStatus.FAILED],
                )
                if kind == flows.SEND
                else None,
                skipped=_reasons(skipped[node_id]),
                failed=_reasons(failed[node_id]),
                condition=ConditionSplit(yes=taken[(node_id, "yes")], no=taken[(node_id, "no")])
                if kind == flows.CONDITION
                else None,
                variants=[
                    VariantCount(name=v.name, weight=v.weight, count=variants[(node_id, v.name)])
                    for v in place.step.ab_test.variants
                ]
                if kind == flows.AB_TEST
                else None,
            )
        )
    return nodes, total, unplaced


def _reasons(counts: Counter[str]) -> list[ReasonCount]:
    return [ReasonCount(reason=r, count=n) for r, n in sorted(counts.items(), key=lambda i: (-i[1], i[0]))]


# ---- the route ------------------------------------------------------------------------------------


@router.get(
    "/{campaign_id}/funnel",
    summary="Per-node funnel of a run",
    description=(
        "For every step of the flow a run executes: how many executions entered it (are at it or "
        "went past it), how many are at it now by state, a SEND's sends by status and its skipped "
        "and failed executions by reason, a CONDITION's yes/no split and an AB_TEST's variant "
        "split. An execution parked by a WAIT counts at the step after the WAIT (pending). "
        "`run_id` defaults to the campaign's current (or last) run; a campaign that has not run "
        "yet answers its current flow with zeros and `run_id: null`. Needs `campaigns:read`."
    ),
    response_model=Funnel,
    responses=_RESPONSES,
)
async def get_funnel(
    campaign_id: Annotated[UUID, Path(description="Campaign id (a UUID)")],
    principal: Annotated[Principal, Depends(require(Scope.CAMPAIGNS_READ))],
    backends: Annotated[Backends, Depends(get_backends)],
    run_id: Annotated[
        UUID | None,
        Query(description="The run (from `GET /v1/campaigns/{id}/runs`); default the current"),
    ] = None,
) -> Funnel:
    check_campaign(principal, str(campaign_id))
    reply = await backends.campaigns.GetCampaign(
        campaign_pb2.GetCampaignRequest(workspace_id=principal.workspace_id, campaign_id=str(campaign_id))
    )
    campaign = reply.campaign
    wanted = str(run_id) if run_id is not None else campaign.current_run_id
    if not wanted:
        nodes, _, _ = compute(campaign.flow, [], [])
        return Funnel(
            campaign_id=campaign_id,
            run_id=None,
            flow_version=campaign.flow_version,
            executions=0,
            unplaced=0,
            nodes=nodes,
        )
    funnel = await backends.executions.GetRunFunnel(
        execution_pb2.GetRunFunnelRequest(workspace_id=principal.workspace_id, run_id=wanted)
    )
    if funnel.campaign_id != str(campaign_id):
        raise ApiError(404, "not_found", f"campaign {campaign_id} has no run {wanted}")
    nodes, total, unplaced = compute(funnel.flow, funnel.rows, funnel.sends)
    return Funnel(
        campaign_id=campaign_id,
        run_id=wanted,
        flow_version=funnel.flow_version,
        executions=total,
        unplaced=unplaced,
        nodes=nodes,
    )
