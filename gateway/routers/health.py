"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: its backends do)."""

from __future__ import annotations

from typing import Annotated, Literal

import grpc
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from gateway.backends import CAMPAIGN_SERVICE, Backends, get_backends
from gateway.errors import ErrorBody, ErrorDetail, error_response

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, str]


@router.get("/healthz", summary="Liveness: the gateway process is up", response_model=Health)
async def healthz() -> Health:
    # Deliberately no backend call: a restart would not fix a backend outage.
    return Health()


@router.get(
    "/readyz",
    summary="Readiness: the services the gateway calls answer SERVING",
    response_model=Readiness,
    responses={503: {"model": ErrorBody, "description": "A backend is not SERVING"}},
)
async def readyz(backends: Annotated[Backends, Depends(get_backends)]) -> Readiness | JSONResponse:
    stub = health_pb2_grpc.HealthStub(backends.campaign_health_channel)
    try:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=CAMPAIGN_SERVICE),
            timeout=backends.settings.readiness_timeout_seconds,
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        status = exc.code().name
    if status != "SERVING":
        return error_response(
            503,
            "not_ready",
            "a backend service is not ready",
            [ErrorDetail(field="campaign", message=status)],
        )
    return Readiness(checks={"campaign": status})
