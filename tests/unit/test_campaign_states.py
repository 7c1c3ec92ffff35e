"""Every (state, action) pair against the state machine of PRODUCT.md.

The expected table is written out here from the product page, independently of `states.MOVES`,
so a move added to or dropped from the code without the product saying so fails this test.
"""

from __future__ import annotations

import itertools

import pytest

from services.campaign import states as st
from shoal.errors import FailedPrecondition
from shoal.v1 import campaign_pb2 as cpb

ALL_STATES = [v for v in cpb.CampaignState.values() if v != cpb.CAMPAIGN_STATE_UNSPECIFIED]
ACTIONS = [
    "schedule",
    "unschedule",
    "due",
    "missed",
    "start",
    "trigger",
    "activate",
    "pause",
    "breaker_open",
    "balance_exhausted",
    "resume",
    "complete",
    "complete_partial",
    "archive",
]

EXPECTED = {
    (st.DRAFT, "schedule"): st.SCHEDULED,
    (st.SCHEDULED, "due"): st.RUNNING,
    (st.SCHEDULED, "unschedule"): st.DRAFT,
    # Our decision: a schedule found too late (service down past the grace) goes back to DRAFT.
    (st.SCHEDULED, "missed"): st.DRAFT,
    (st.DRAFT, "start"): st.RUNNING,
    (st.DRAFT, "trigger"): st.RUNNING,
    (st.DRAFT, "activate"): st.RUNNING,
    # An API-triggered campaign's next trigger after its run finished starts a new run.
    (st.COMPLETED, "trigger"): st.RUNNING,
    (st.COMPLETED_PARTIAL, "trigger"): st.RUNNING,
    (st.RUNNING, "pause"): st.PAUSED,
    (st.RUNNING, "breaker_open"): st.PAUSED_ERROR,
    (st.RUNNING, "balance_exhausted"): st.PAUSED_BALANCE,
    (st.PAUSED, "resume"): st.RUNNING,
    (st.PAUSED_ERROR, "resume"): st.RUNNING,
    (st.PAUSED_BALANCE, "resume"): st.RUNNING,
    (st.RUNNING, "complete"): st.COMPLETED,
    (st.RUNNING, "complete_partial"): st.COMPLETED_PARTIAL,
    # Archive takes a campaign that is not live out of the lists.
    (st.DRAFT, "archive"): st.ARCHIVED,
    (st.COMPLETED, "archive"): st.ARCHIVED,
    (st.COMPLETED_PARTIAL, "archive"): st.ARCHIVED,
}


def test_the_table_is_the_product_table() -> None:
    assert st.MOVES == EXPECTED
    assert {a for _, a in st.MOVES} == set(ACTIONS)


@pytest.mark.parametrize(
    ("state", "action"),
    list(itertools.product(ALL_STATES, ACTIONS)),
    ids=lambda v: st.name(v) if isinstance(v, int) else v,
)
def test_every_state_action_pair(state: int, action: str) -> None:
    target = EXPECTED.get((state, action))
    if target is not None:
        assert st.next_state(state, action) == target
        return
    with pytest.raises(FailedPrecondition) as info:
        st.next_state(state, action)
    err = info.value
    assert err.reason == "wrong_state"
    assert f"state {st.name(state)}" in err.message
    assert err.code.name == "FAILED_PRECONDITION"


def test_no_move_leaves_archived() -> None:
    assert not [a for (s, a) in st.MOVES if s == st.ARCHIVED]


def test_paused_states_only_resume() -> None:
    for paused in st.PAUSED_STATES:
        assert {a for (s, a) in st.MOVES if s == paused} == {"resume"}
