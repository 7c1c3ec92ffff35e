"""The campaign state machine of PRODUCT.md: the only legal moves, as one table."""

from __future__ import annotations

from shoal.errors import FailedPrecondition
from shoal.v1 import campaign_pb2 as cpb

DRAFT = cpb.CAMPAIGN_STATE_DRAFT
SCHEDULED = cpb.CAMPAIGN_STATE_SCHEDULED
RUNNING = cpb.CAMPAIGN_STATE_RUNNING
PAUSED = cpb.CAMPAIGN_STATE_PAUSED
PAUSED_ERROR = cpb.CAMPAIGN_STATE_PAUSED_ERROR
PAUSED_BALANCE = cpb.CAMPAIGN_STATE_PAUSED_BALANCE
COMPLETED = cpb.CAMPAIGN_STATE_COMPLETED
COMPLETED_PARTIAL = cpb.CAMPAIGN_STATE_COMPLETED_PARTIAL
ARCHIVED = cpb.CAMPAIGN_STATE_ARCHIVED

PAUSED_STATES = (PAUSED, PAUSED_ERROR, PAUSED_BALANCE)
ACTIVE_STATES = (RUNNING, *PAUSED_STATES)

# (state, action) -> next state.
MOVES: dict[tuple[int, str], int] = {
    (DRAFT, "schedule"): SCHEDULED,
    (SCHEDULED, "due"): RUNNING,
    (SCHEDULED, "unschedule"): DRAFT,
    (SCHEDULED, "missed"): DRAFT,
    (DRAFT, "start"): RUNNING,
    (DRAFT, "trigger"): RUNNING,
    (DRAFT, "activate"): RUNNING,
    # An API-triggered campaign starts a new run after its previous one finished.
    (COMPLETED, "trigger"): RUNNING,
    (COMPLETED_PARTIAL, "trigger"): RUNNING,
    (RUNNING, "pause"): PAUSED,
    (RUNNING, "breaker_open"): PAUSED_ERROR,
    (RUNNING, "balance_exhausted"): PAUSED_BALANCE,
    (PAUSED, "resume"): RUNNING,
    (PAUSED_ERROR, "resume"): RUNNING,
    (PAUSED_BALANCE, "resume"): RUNNING,
    (RUNNING, "complete"): COMPLETED,
    (RUNNING, "complete_partial"): COMPLETED_PARTIAL,
    (DRAFT, "archive"): ARCHIVED,
    (COMPLETED, "archive"): ARCHIVED,
    (COMPLETED_PARTIAL, "archive"): ARCHIVED,
}


def name(state: int) -> str:
    return cpb.CampaignState.Name(state).removeprefix("CAMPAIGN_STATE_")


def next_state(state: int, action: str) -> int:
    """The state `action` leads to from `state`, or FAILED_PRECONDITION naming the current state."""
    target = MOVES.get((state, action))
    if target is None:
        raise FailedPrecondition(
            f"cannot {action.replace('_', ' ')} a campaign in state {name(state)}", reason="wrong_state"
        )
    return target
