"""Provider approval of templates, for channels whose carrier reviews content first (RCS).

The template service asks a `ProviderApproval` when a version is submitted; it answers at once
(APPROVED or REJECTED with a reason) or PENDING, in which case the version waits in
PENDING_APPROVAL until an operator (standing in for the provider's callback) publishes or
rejects it. The sandbox implementations are chosen by `SHOAL_TEMPLATE_RCS_APPROVAL`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb

# Channels whose provider must approve a template before it may be sent.
CHANNELS_NEEDING_APPROVAL = frozenset({common.CHANNEL_RCS})


class Verdict(enum.Enum):
    APPROVED = "approved"
    REJECTED = "rejected"
    PENDING = "pending"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


@dataclass(frozen=True)
class Submission:
    workspace_id: str
    template_id: str
    version: int
    channel: int
    message_type: int
    content: pb.TemplateContent


class ProviderApproval(Protocol):
    async def submit(self, submission: Submission) -> Decision: ...


class AutoApprove:
    """The sandbox provider approves everything."""

    async def submit(self, submission: Submission) -> Decision:
        return Decision(Verdict.APPROVED)


class AutoReject:
    """The sandbox provider rejects everything (to exercise the REJECTED path)."""

    def __init__(
        self, reason: str = "rejected by the provider (sandbox: SHOAL_TEMPLATE_RCS_APPROVAL=reject)"
    ):
        self.reason = reason

    async def submit(self, submission: Submission) -> Decision:
        return Decision(Verdict.REJECTED, self.reason)


class ManualReview:
    """The provider answers later; an operator records the answer with Publish/RejectTemplate."""

    async def submit(self, submission: Submission) -> Decision:
        return Decision(Verdict.PENDING)


def from_setting(mode: str) -> ProviderApproval:
    if mode == "approve":
        return AutoApprove()
    if mode == "reject":
        return AutoReject()
    if mode == "manual":
        return ManualReview()
    raise ValueError(f"unknown approval mode {mode!r}")
