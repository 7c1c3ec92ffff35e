"""The default price list and cost estimates (integer cents, EUR)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.v1 import common_pb2 as common

PriceKey = tuple[int, int, int]  # (channel, message_type, billing unit)

_EMAIL, _SMS, _RCS = common.CHANNEL_EMAIL, common.CHANNEL_SMS, common.CHANNEL_RCS
_MSG, _CONV, _NEWS = (
    common.MESSAGE_TYPE_MESSAGE,
    common.MESSAGE_TYPE_CONVERSATION,
    common.MESSAGE_TYPE_NEWSLETTER,
)

# Loaded for a workspace the first time it is billed; changed per workspace with SetPrice.
DEFAULT_PRICES: dict[PriceKey, int] = {
    **{(_EMAIL, mt, common.BILLING_UNIT_EMAIL): 1 for mt in (_MSG, _CONV, _NEWS)},
    **{(_SMS, mt, common.BILLING_UNIT_SMS_SEGMENT): 7 for mt in (_MSG, _CONV, _NEWS)},
    **{(_RCS, mt, common.BILLING_UNIT_RCS_BASIC): 4 for mt in (_MSG, _CONV, _NEWS)},
    **{(_RCS, mt, common.BILLING_UNIT_RCS_SINGLE): 8 for mt in (_MSG, _CONV, _NEWS)},
}


_DEFAULT_UNITS = {
    _EMAIL: common.BILLING_UNIT_EMAIL,
    _SMS: common.BILLING_UNIT_SMS_SEGMENT,
    _RCS: common.BILLING_UNIT_RCS_SINGLE,
}


def default_unit(channel: int) -> int:
    return _DEFAULT_UNITS.get(channel, common.BILLING_UNIT_UNSPECIFIED)


def price_of(
    prices: Mapping[PriceKey, int], channel: int, message_type: int, unit: int, units: int
) -> int | None:
    """Cents for `units` of a kind of message, or None when it has no price."""
    unit = unit or default_unit(channel)
    cents = prices.get((channel, message_type, unit))
    if cents is None:
        return None
    return cents * max(units, 1)


@dataclass(frozen=True)
class SendCost:
    cents: int
    expected_share_bp: int
    on_upper_path: bool


def estimate(audience: int, sends: Iterable[SendCost]) -> tuple[int, int]:
    """(expected, upper bound) cost of an audience through a flow's sends.

    Expected weighs each send by the share of contacts expected to reach it; the upper bound
    assumes every contact takes the most expensive path through the flow.
    """
    expected = 0
    upper = 0
    for send in sends:
        if send.on_upper_path:
            upper += audience * send.cents
        # Integer arithmetic, rounded up: an estimate never promises less than it costs.
        expected += -(-audience * send.cents * send.expected_share_bp // 10_000)
    return expected, upper
