"""One JSON error shape for every error the gateway answers (PRODUCT.md "API conventions").

`{error: <stable code>, message, details: [{field, message}]}`. Request validation is 400 with
one detail per field; a failed gRPC call becomes its domain error (`shoal.errors.from_rpc_error`)
and then one HTTP status; anything else is a 500 with a generic message. 5xx answers never carry
the upstream text: it names hosts, ports and internals the client has no use for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.errors import ShoalError, from_rpc_error

log = logging.getLogger(__name__)

# Where FastAPI says a value came from; the client knows its own request, the field path is enough.
_LOCATIONS = {"body", "path", "query", "header", "cookie"}

_STATUS_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Codes clearer than the status phrase (413's phrase changed between Python versions).
_HTTP_CODES = {413: "payload_too_large"}

_GENERIC_5XX: dict[int, tuple[str, str]] = {
    500: ("internal", "internal error; it has been logged"),
    503: ("unavailable", "a backend service is unavailable; retry later"),
    504: ("timeout", "a backend service did not answer in time; retry later"),
}


class ErrorDetail(BaseModel):
    field: str = Field(description="Path of the offending field, dot separated (`recipients.0.email`)")
    message: str


class ErrorBody(BaseModel):
    """Every non-2xx answer has this shape."""

    error: str = Field(description="Stable machine-readable code, e.g. `not_found`, `insufficient_balance`")
    message: str = Field(description="Human-readable explanation")
    details: list[ErrorDetail] = Field(default_factory=list)


class RateLimitedBody(ErrorBody):
    """429: the error shape plus when to come back (also in the `Retry-After` header)."""

    retry_after: int = Field(ge=1, description="Seconds until the key may call again")


class ApiError(Exception):
    """An answer the gateway itself decides (auth, limits, callbacks), in the error shape."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        details: Sequence[ErrorDetail] = (),
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = dict(headers or {})
        self.details = list(details)
        self.retry_after = retry_after


def error_response(
    status: int,
    error: str,
    message: str,
    details: Sequence[ErrorDetail] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=error, message=message, details=list(details))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=dict(headers or {}))


def http_status_for(error: ShoalError) -> int:
    """The HTTP status of a domain error: the reason decides before the code (402 vs 409)."""
    if error.reason == "insufficient_balance":
        return 402
    if error.reason == "launch_blocked":
        # The flow or its templates break a launch rule: the request was fine, the content is not.
        return 422
    return _STATUS_BY_CODE.get(error.code, 500)


def domain_error_response(error: ShoalError) -> JSONResponse:
    status = http_status_for(error)
    if status >= 500:
        code, message = _GENERIC_5XX.get(status, _GENERIC_5XX[500])
        return error_response(status, code, message)
    details = [ErrorDetail(field=v.field, message=v.description) for v in error.violations]
    return error_response(status, error.reason, error.message, details)


def field_path(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "request"


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        ErrorDetail(field=field_path(e.get("loc", ())), message=str(e.get("msg", ""))) for e in exc.errors()
    ]
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    return error_response(400, "validation_failed", f"invalid request: {summary}", details)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status >= 500:
        code, message = _GENERIC_5XX.get(status, _GENERIC_5XX[500])
        return error_response(status, code, message)
    code = _HTTP_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(status, code, message, headers=exc.headers)


async def _on_domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ShoalError)
    if http_status_for(exc) >= 500:
        log.error("%s %s failed: %s (%s)", request.method, request.url.path, exc.reason, exc.message)
    return domain_error_response(exc)


async def _on_rpc(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.aio.AioRpcError)
    return await _on_domain(request, from_rpc_error(exc))


async def _on_api(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.retry_after is not None:
        body = RateLimitedBody(
            error=exc.error, message=exc.message, details=exc.details, retry_after=exc.retry_after
        )
        return JSONResponse(status_code=exc.status, content=body.model_dump(), headers=exc.headers)
    return error_response(exc.status, exc.error, exc.message, exc.details, exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: unhandled error", request.method, request.url.path, exc_info=exc)
    return error_response(500, *_GENERIC_5XX[500])


def install(app: FastAPI) -> None:
    """Route every kind of failure to the one shape."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ShoalError, _on_domain)
    app.add_exception_handler(ApiError, _on_api)
    app.add_exception_handler(grpc.aio.AioRpcError, _on_rpc)
    app.add_exception_handler(Exception, _on_unexpected)
