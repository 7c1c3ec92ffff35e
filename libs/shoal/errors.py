"""Domain errors and their gRPC form.

Services raise these from domain code; the server interceptor in `shoal.grpc` turns them into a
status with a stable reason (google.rpc.ErrorInfo) and field violations (google.rpc.BadRequest).
Clients (the gateway, other services) turn an `AioRpcError` back into the same error with
`from_rpc_error`, so a reason survives every hop and maps to one HTTP status at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "shoal"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ShoalError(Exception):
    """Base of every error a Shoal service answers on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "internal"

    def __init__(
        self, message: str, reason: str | None = None, violations: list[FieldViolation] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = list(violations or [])


class InvalidArgument(ShoalError):
    """Input broke a rule; `violations` name each field and rule."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "validation_failed"

    @classmethod
    def of(cls, field_name: str, description: str, reason: str | None = None) -> InvalidArgument:
        return cls(f"{field_name}: {description}", reason, [FieldViolation(field_name, description)])


class NotFound(ShoalError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "not_found"


class FailedPrecondition(ShoalError):
    """The thing is in the wrong state for the operation (REST 409)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "wrong_state"


class Conflict(ShoalError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "conflict"


class InsufficientBalance(ShoalError):
    """Free balance does not cover the cost (REST 402)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "insufficient_balance"


class PermissionDenied(ShoalError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "forbidden"


class Unavailable(ShoalError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "unavailable"


_BY_CODE: dict[grpc.StatusCode, type[ShoalError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def to_status(error: ShoalError) -> grpc.Status:
    """The rich gRPC status for a domain error."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
    details.append(info)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ShoalError:
    """The domain error carried by a failed call (reason and violations included)."""
    code = exc.code()
    message = exc.details() or code.name
    reason = code.name.lower()
    violations: list[FieldViolation] = []
    status = rpc_status.from_call(exc)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    if reason == "insufficient_balance":
        return InsufficientBalance(message, reason, violations)
    cls = _BY_CODE.get(code)
    if cls is None:
        error = ShoalError(message, reason, violations)
        error.code = code
        return error
    return cls(message, reason, violations)
