"""`/v1/billing`: the workspace's prepaid balance, top-ups, auto-reload, prices and ledger.

Over `shoal.v1.BillingService`. Money is integer cents of EUR. Holds, captures and releases are
the engine's business and have no route here. The billing service answers INVALID_ARGUMENT for
every refused input; the product's business rules among them (the minimum top-up, the maximum
balance, a send without a price) answer 422 naming the field, the rest 400.

Scopes: reads need `billing:read`; top-ups, auto-reload and the low-balance threshold
`billing:write`; the balance limit and the price list are the platform's terms, not the
customer's, so they need `admin`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.auth import require
from gateway.backends import Backends, get_backends
from gateway.errors import ApiError, ErrorBody, ErrorDetail
from gateway.flows import Channel, MessageType
from gateway.keys import Principal, Scope
from gateway.routers.templates import (
    LIST_LIMIT_DEFAULT,
    BillingUnit,
    Cursor,
    Limit,
    billing_unit_name,
    billing_unit_value,
    channel_name,
    channel_value,
    checked_cursor,
    common_responses,
    message_type_name,
    message_type_value,
    time_of,
    upstream,
)
from shoal.errors import ShoalError
from shoal.v1 import billing_pb2, common_pb2

router = APIRouter(prefix="/v1/billing", tags=["billing"])

_COMMON = common_responses("billing")
_ADMIN = {**_COMMON, 403: {"model": ErrorBody, "description": "The key lacks the `admin` scope"}}
_RULE = "A business rule is broken (named in `details`)"
_TOP_UP_RULES = ("top_up_too_small", "balance_limit")
_PAGE_FIELDS = {"page.page_token": "cursor", "page.page_size": "limit"}
# The billing units a channel's messages are billed in.
UNITS_OF: dict[Channel, frozenset[BillingUnit]] = {
    Channel.EMAIL: frozenset({BillingUnit.EMAIL}),
    Channel.SMS: frozenset({BillingUnit.SMS_SEGMENT}),
    Channel.RCS: frozenset({BillingUnit.RCS_BASIC, BillingUnit.RCS_SINGLE}),
}
# Bounds far beyond any real account that keep every sum the billing service forms inside int64:
# balances (EUR 10 billion), a unit's price (EUR 10,000), an estimate's audience x sends x units.
MONEY_MAX = 10**12
PRICE_MAX = 1_000_000
AUDIENCE_MAX = 100_000_000
UNITS_MAX = 10
SENDS_MAX = 100

IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
Cents = Annotated[int, Field(ge=0, le=MONEY_MAX)]


class Balance(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "free_cents": 48_250,
                    "reserved_cents": 1_750,
                    "total_cents": 50_000,
                    "max_balance_cents": 500_000,
                    "low_balance_threshold_cents": 1_000,
                    "currency": "EUR",
                }
            ]
        }
    )

    free_cents: int = Field(description="What new sends can hold; never below zero")
    reserved_cents: int = Field(description="Held by sends in flight, captured or released when they resolve")
    total_cents: int = Field(description="free + reserved")
    max_balance_cents: int = Field(description="Top-ups taking the total above this are refused")
    low_balance_threshold_cents: int = Field(
        description="`billing.balance_low` is emitted when free balance falls below it; 0 is off"
    )
    currency: str = Field(description="Always EUR")


class TopUpRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount_cents": 5_000, "idempotency_key": "invoice-2025-0042"}]},
    )

    amount_cents: Cents = Field(description="At least 1000 (EUR 10); the balance may not exceed its maximum")
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Repeating a top-up with the same key credits it once"
    )


class AutoReload(BaseModel):
    """Tops up by `reload_amount_cents` when a send leaves free balance below the threshold.

    At most 3 times a UTC day; it never resumes a paused campaign.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"enabled": True, "trigger_threshold_cents": 2_000, "reload_amount_cents": 10_000}]
        },
    )

    enabled: bool
    trigger_threshold_cents: Cents = Field(description="Positive when enabled")
    reload_amount_cents: Cents = Field(description="At least the minimum top-up (1000) when enabled")


class Price(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "channel": "SMS",
                    "message_type": "MESSAGE",
                    "billing_unit": "SMS_SEGMENT",
                    "amount_cents": 7,
                }
            ]
        },
    )

    channel: Channel
    message_type: MessageType
    billing_unit: BillingUnit = Field(
        description="EMAIL for EMAIL, SMS_SEGMENT for SMS, RCS_BASIC or RCS_SINGLE for RCS"
    )
    amount_cents: int = Field(ge=0, le=PRICE_MAX, description="Price of one unit (one SMS segment, ...)")


class PricePage(BaseModel):
    items: list[Price]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class LowBalanceThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"threshold_cents": 2_500}]})

    threshold_cents: Cents = Field(description="0 turns the event off; setting it re-arms the event")


class BalanceLimit(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"max_balance_cents": 1_000_000}]}
    )

    max_balance_cents: int = Field(ge=1, le=MONEY_MAX, description="Lowering it takes nothing away")


class LedgerKind(enum.StrEnum):
    TOP_UP = "TOP_UP"
    HOLD = "HOLD"
    CAPTURE = "CAPTURE"
    RELEASE = "RELEASE"
    AUTO_RELOAD = "AUTO_RELOAD"
    ADJUSTMENT = "ADJUSTMENT"


class LedgerEntry(BaseModel):
    id: int
    kind: LedgerKind
    amount_cents: int = Field(ge=0, description="The amount the entry moved")
    free_delta_cents: int = Field(description="Signed change of free balance")
    reserved_delta_cents: int = Field(description="Signed change of reserved balance")
    key: str | None = Field(description="The top-up's idempotency key, or the send a hold is for")
    created_at: datetime


class LedgerPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "id": 1,
                            "kind": "TOP_UP",
                            "amount_cents": 5_000,
                            "free_delta_cents": 5_000,
                            "reserved_delta_cents": 0,
                            "key": "invoice-2025-0042",
                            "created_at": "2025-03-01T09:30:00Z",
                        }
                    ],
                    "next_cursor": None,
                }
            ]
        }
    )

    items: list[LedgerEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class SendProfileItem(BaseModel):
    """One SEND a contact may pass through a flow."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    message_type: MessageType
    billing_unit: BillingUnit | None = Field(
        default=None, description="Omitted: the channel's dearest (EMAIL, SMS_SEGMENT, RCS_SINGLE)"
    )
    units: int = Field(default=1, ge=1, le=UNITS_MAX, description="Units per message (SMS segments)")
    expected_share_bp: int = Field(
        default=10_000,
        ge=0,
        le=10_000,
        description="Share of the audience expected to reach this send, in basis points (10000 = all)",
    )
    on_upper_path: bool = Field(default=True, description="Counted in the upper bound (the dearest path)")


class EstimateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "audience_size": 12_000,
                    "sends": [
                        {"channel": "EMAIL", "message_type": "MESSAGE"},
                        {"channel": "SMS", "message_type": "MESSAGE", "units": 2, "expected_share_bp": 5_000},
                    ],
                }
            ]
        },
    )

    audience_size: int = Field(ge=0, le=AUDIENCE_MAX)
    sends: list[SendProfileItem] = Field(min_length=1, max_length=SENDS_MAX)


class Estimate(BaseModel):
    expected_cents: int = Field(description="Cost by the expected shares")
    upper_bound_cents: int = Field(description="Cost if every contact took the dearest path")
    free_cents: int = Field(description="Free balance now")
    covered: bool = Field(description="Free balance covers the upper bound")


def to_balance(b: billing_pb2.Balance) -> Balance:
    return Balance(
        free_cents=b.free_cents,
        reserved_cents=b.reserved_cents,
        total_cents=b.total_cents,
        max_balance_cents=b.max_balance_cents,
        low_balance_threshold_cents=b.low_balance_threshold_cents,
        currency=b.currency or "EUR",
    )


def to_auto_reload(a: billing_pb2.AutoReload) -> AutoReload:
    return AutoReload(
        enabled=a.enabled,
        trigger_threshold_cents=a.trigger_threshold_cents,
        reload_amount_cents=a.reload_amount_cents,
    )


def to_price(p: billing_pb2.Price) -> Price:
    return Price(
        channel=channel_name(p.channel),
        message_type=message_type_name(p.message_type),
        billing_unit=billing_unit_name(p.unit),
        amount_cents=p.cents,
    )


def to_entry(e: billing_pb2.LedgerEntry) -> LedgerEntry:
    created = time_of(e.create_time)
    if created is None:
        raise ShoalError("billing service answered a ledger entry without a time", "bad_upstream_value")
    try:
        kind = LedgerKind(billing_pb2.LedgerEntryKind.Name(e.kind).removeprefix("LEDGER_ENTRY_KIND_"))
    except ValueError:
        raise ShoalError(
            f"billing service answered unknown ledger kind {e.kind}", "bad_upstream_value"
        ) from None
    return LedgerEntry(
        id=e.id,
        kind=kind,
        amount_cents=max(abs(e.free_delta_cents), abs(e.reserved_delta_cents)),
        free_delta_cents=e.free_delta_cents,
        reserved_delta_cents=e.reserved_delta_cents,
        key=e.key or None,
        created_at=created,
    )


_READ = Depends(require(Scope.BILLING_READ))
_WRITE = Depends(require(Scope.BILLING_WRITE))
_ADMIN_KEY = Depends(require(Scope.ADMIN))
ReadKey = Annotated[Principal, _READ]
WriteKey = Annotated[Principal, _WRITE]
AdminKey = Annotated[Principal, _ADMIN_KEY]
BackendsDep = Annotated[Backends, Depends(get_backends)]


@router.get(
    "/balance",
    summary="The workspace's balance",
    description="Free, reserved and total balance in integer cents (EUR). Needs `billing:read`.",
    response_model=Balance,
    responses=_COMMON,
)
async def get_balance(principal: ReadKey, backends: BackendsDep) -> Balance:
    with upstream():
        reply = await backends.billing.GetBalance(
            billing_pb2.GetBalanceRequest(workspace_id=principal.workspace_id)
        )
    return to_balance(reply.balance)


@router.post(
    "/top-ups",
    status_code=201,
    summary="Top up the balance",
    description=(
        "Credits free balance (at least EUR 10; the total may not exceed `max_balance_cents`) and "
        "answers the new balance. With `idempotency_key`, a repeat credits nothing and answers "
        "the balance. Needs `billing:write`."
    ),
    response_model=Balance,
    responses={
        **_COMMON,
        422: {
            "model": ErrorBody,
            "description": "`top_up_too_small` or `balance_limit`, naming `amount_cents`",
        },
    },
)
async def top_up(body: TopUpRequest, principal: WriteKey, backends: BackendsDep) -> Balance:
    with upstream(semantic_reasons=_TOP_UP_RULES):
        reply = await backends.billing.TopUp(
            billing_pb2.TopUpRequest(
                workspace_id=principal.workspace_id,
                amount_cents=body.amount_cents,
                idempotency_key=body.idempotency_key or "",
            )
        )
    return to_balance(reply.balance)


@router.get(
    "/auto-reload",
    summary="The auto-reload setting",
    description="Needs `billing:read`.",
    response_model=AutoReload,
    responses=_COMMON,
)
async def get_auto_reload(principal: ReadKey, backends: BackendsDep) -> AutoReload:
    with upstream():
        reply = await backends.billing.GetAutoReload(
            billing_pb2.GetAutoReloadRequest(workspace_id=principal.workspace_id)
        )
    return to_auto_reload(reply.auto_reload)


@router.put(
    "/auto-reload",
    summary="Set auto-reload",
    description=(
        "Replaces the setting. When enabled, the reload amount must be at least the minimum "
        "top-up and within the balance maximum (422), the threshold positive (400). "
        "Needs `billing:write`."
    ),
    response_model=AutoReload,
    responses={**_COMMON, 422: {"model": ErrorBody, "description": _RULE}},
)
async def set_auto_reload(body: AutoReload, principal: WriteKey, backends: BackendsDep) -> AutoReload:
    with upstream({"auto_reload": ""}, semantic_fields={"reload_amount_cents": "top_up_too_small"}):
        reply = await backends.billing.SetAutoReload(
            billing_pb2.SetAutoReloadRequest(
                workspace_id=principal.workspace_id,
                auto_reload=billing_pb2.AutoReload(
                    enabled=body.enabled,
                    trigger_threshold_cents=body.trigger_threshold_cents,
                    reload_amount_cents=body.reload_amount_cents,
                ),
            )
        )
    return to_auto_reload(reply.auto_reload)


@router.get(
    "/prices",
    summary="The price list",
    description=(
        "Price per channel, message type and billing unit, in cents per unit. Needs `billing:read`."
    ),
    response_model=PricePage,
    responses=_COMMON,
)
async def list_prices(
    principal: ReadKey, backends: BackendsDep, limit: Limit = LIST_LIMIT_DEFAULT, cursor: Cursor = None
) -> PricePage:
    offset = int(checked_cursor(cursor) or 0)
    with upstream():
        reply = await backends.billing.ListPrices(
            billing_pb2.ListPricesRequest(workspace_id=principal.workspace_id)
        )
    prices = list(reply.prices)
    page = prices[offset : offset + limit]
    more = offset + limit < len(prices)
    return PricePage(items=[to_price(p) for p in page], next_cursor=str(offset + limit) if more else None)


@router.put(
    "/prices",
    summary="Set one price",
    description=(
        "Sets the price of one channel + message type + billing unit; it applies to sends held "
        "from now on (holds already placed keep their amount). The billing unit must be one the "
        "channel is billed in (422). Needs `admin`: prices are the platform's terms."
    ),
    response_model=Price,
    responses={**_ADMIN, 422: {"model": ErrorBody, "description": "The billing unit is not the channel's"}},
)
async def set_price(body: Price, principal: AdminKey, backends: BackendsDep) -> Price:
    if body.billing_unit not in UNITS_OF[body.channel]:
        allowed = " or ".join(sorted(UNITS_OF[body.channel]))
        raise ApiError(
            422,
            "billing_unit_mismatch",
            f"billing_unit: {body.channel} messages are billed in {allowed}",
            details=[ErrorDetail(field="billing_unit", message=f"must be {allowed} for {body.channel}")],
        )
    renames = {"price.cents": "amount_cents", "price.unit": "billing_unit", "price": ""}
    with upstream(renames):
        reply = await backends.billing.SetPrice(
            billing_pb2.SetPriceRequest(
                workspace_id=principal.workspace_id,
                price=billing_pb2.Price(
                    channel=channel_value(body.channel),
                    message_type=message_type_value(body.message_type),
                    unit=billing_unit_value(body.billing_unit),
                    cents=body.amount_cents,
                ),
            )
        )
    return to_price(reply.price)


@router.put(
    "/low-balance-threshold",
    summary="Set the low-balance threshold",
    description=(
        "`billing.balance_low` is emitted once each time free balance falls below it (at once "
        "when it already is); 0 turns it off. Answers the balance. Needs `billing:write`."
    ),
    response_model=Balance,
    responses=_COMMON,
)
async def set_low_balance_threshold(
    body: LowBalanceThreshold, principal: WriteKey, backends: BackendsDep
) -> Balance:
    with upstream():
        reply = await backends.billing.SetLowBalanceThreshold(
            billing_pb2.SetLowBalanceThresholdRequest(
                workspace_id=principal.workspace_id, threshold_cents=body.threshold_cents
            )
        )
    return to_balance(reply.balance)


@router.put(
    "/balance-limit",
    summary="Set the maximum balance",
    description=(
        "Raises (or lowers) the maximum balance (default EUR 5,000); lowering it takes nothing "
        "away, it only refuses top-ups. Answers the balance. Needs `admin`."
    ),
    response_model=Balance,
    responses=_ADMIN,
)
async def set_balance_limit(body: BalanceLimit, principal: AdminKey, backends: BackendsDep) -> Balance:
    with upstream():
        reply = await backends.billing.SetBalanceLimit(
            billing_pb2.SetBalanceLimitRequest(
                workspace_id=principal.workspace_id, max_balance_cents=body.max_balance_cents
            )
        )
    return to_balance(reply.balance)


@router.get(
    "/ledger",
    summary="The ledger",
    description=(
        "Every movement of the balance, oldest first: top-ups, auto-reloads, holds, captures, "
        "releases, adjustments. Needs `billing:read`."
    ),
    response_model=LedgerPage,
    responses=_COMMON,
)
async def list_ledger(
    principal: ReadKey, backends: BackendsDep, limit: Limit = LIST_LIMIT_DEFAULT, cursor: Cursor = None
) -> LedgerPage:
    with upstream(_PAGE_FIELDS):
        reply = await backends.billing.ListLedger(
            billing_pb2.ListLedgerRequest(
                workspace_id=principal.workspace_id,
                page=common_pb2.PageRequest(page_size=limit, page_token=checked_cursor(cursor)),
            )
        )
    return LedgerPage(
        items=[to_entry(e) for e in reply.entries], next_cursor=reply.page.next_page_token or None
    )


@router.post(
    "/estimate",
    summary="Estimate the cost of a send profile",
    description=(
        "Prices an audience through the sends one contact may pass (what a campaign's estimate "
        "computes from its flow), with today's prices: the expected cost by the shares, the upper "
        "bound by the dearest path, and whether free balance covers the upper bound. Needs "
        "`billing:read`."
    ),
    response_model=Estimate,
    responses={**_COMMON, 422: {"model": ErrorBody, "description": "A send has no price (`no_price`)"}},
)
async def estimate_cost(body: EstimateRequest, principal: ReadKey, backends: BackendsDep) -> Estimate:
    sends: list[billing_pb2.SendProfileItem] = []
    for item in body.sends:
        unit = item.billing_unit
        if unit is not None and unit not in UNITS_OF[item.channel]:
            raise ApiError(
                422,
                "billing_unit_mismatch",
                f"sends: {item.channel} messages are not billed in {unit}",
                details=[
                    ErrorDetail(
                        field=f"sends.{len(sends)}.billing_unit",
                        message=f"must be {' or '.join(sorted(UNITS_OF[item.channel]))} for {item.channel}",
                    )
                ],
            )
        sends.append(
            billing_pb2.SendProfileItem(
                channel=channel_value(item.channel),
                message_type=message_type_value(item.message_type),
                unit=billing_unit_value(unit) if unit is not None else None,
                units=item.units,
                expected_share_bp=item.expected_share_bp,
                on_upper_path=item.on_upper_path,
            )
        )
    with upstream(semantic_fields={"sends": "no_price"}):
        reply = await backends.billing.EstimateCost(
            billing_pb2.EstimateCostRequest(
                workspace_id=principal.workspace_id, audience_size=body.audience_size, sends=sends
            )
        )
    return Estimate(
        expected_cents=reply.expected_cents,
        upper_bound_cents=reply.upper_bound_cents,
        free_cents=reply.free_cents,
        covered=reply.covered,
    )
