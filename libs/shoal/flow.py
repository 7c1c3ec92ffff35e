"""Flows as users build them (a tree of steps) and as workers run them (a graph of nodes).

Pure functions, shared by the campaign service (validation, cost profile) and the execution
service (compiling a run's flow once, then stepping executions through it). A flow is a sequence
of steps; a CONDITION or AB_TEST is the last step of its sequence and opens one sequence per
branch, so the flow is a tree: one entry, no cycles, every path ends in END.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common

SEND, WAIT, CONDITION, AB_TEST, TAG, END = "send", "wait", "condition", "ab_test", "tag", "end"
NODE_TYPES = (SEND, WAIT, CONDITION, AB_TEST, TAG, END)
SPLITS = (CONDITION, AB_TEST)

MAX_STEPS = 500
# Each split level is three protobuf levels (Step, ConditionStep/AbVariant, Branch) and protobuf
# refuses messages nested over 100 deep: past ~30 splits a flow could not even be decoded, so the
# limit sits well below that, where the error can still name the step.
MAX_DEPTH = 20
MAX_WAIT_SECONDS = 366 * 86400
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TAG = re.compile(r"^[\w:.-]{1,64}$")


@dataclass(frozen=True)
class FlowError:
    node_id: str
    path: str
    rule: str
    message: str


@dataclass
class Node:
    id: str
    kind: str
    step: cpb.Step
    # The node after this one (SEND, WAIT, TAG); empty for END and splits.
    next: str = ""
    # CONDITION: {"yes": id, "no": id}; AB_TEST: {variant name: id}.
    branches: dict[str, str] = field(default_factory=dict)
    # AB_TEST: (variant name, weight) in declared order.
    weights: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class CompiledFlow:
    entry: str
    nodes: dict[str, Node]

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]


def kind_of(step: cpb.Step) -> str:
    return step.WhichOneof("kind") or ""


def _walk(steps: list[cpb.Step], path: str, depth: int) -> Iterator[tuple[cpb.Step, str, int, bool]]:
    """Every step with its path, depth, and whether it is the last of its sequence."""
    for i, step in enumerate(steps):
        step_path = f"{path}[{i}]"
        yield step, step_path, depth, i == len(steps) - 1
        kind = kind_of(step)
        if kind == CONDITION:
            yield from _walk(list(step.condition.yes.steps), f"{step_path}.condition.yes.steps", depth + 1)
            yield from _walk(list(step.condition.no.steps), f"{step_path}.condition.no.steps", depth + 1)
        elif kind == AB_TEST:
            for v, variant in enumerate(step.ab_test.variants):
                yield from _walk(
                    list(variant.branch.steps), f"{step_path}.ab_test.variants[{v}].branch.steps", depth + 1
                )


def validate(flow: cpb.Flow) -> list[FlowError]:
    """Every rule a flow breaks, each with the node id, its path in the tree and the rule."""
    errors: list[FlowError] = []

    def err(step: cpb.Step | None, path: str, rule: str, message: str) -> None:
        errors.append(FlowError(step.id if step is not None else "", path, rule, message))

    if not flow.steps:
        err(None, "steps", "flow.not_empty", "a flow needs at least one step")
        return errors
    seen: dict[str, str] = {}
    send_ids: set[str] = set()
    count = 0
    for step, path, depth, last in _walk(list(flow.steps), "steps", 0):
        count += 1
        if count > MAX_STEPS:
            err(step, path, "flow.max_steps", f"a flow has at most {MAX_STEPS} steps")
            break
        if depth > MAX_DEPTH:
            # Reported once, at the first step too deep; the steps below it add nothing.
            if depth == MAX_DEPTH + 1:
                err(step, path, "flow.max_depth", f"branches nest at most {MAX_DEPTH} deep")
            continue
        if not _ID.match(step.id):
            err(step, f"{path}.id", "step.id", "id must be 1-64 letters, digits, '_' or '-'")
        elif step.id in seen:
            err(step, f"{path}.id", "step.id_unique", f"id {step.id!r} is also used at {seen[step.id]}")
        else:
            seen[step.id] = path
        kind = kind_of(step)
        if not kind:
            err(step, path, "step.kind", "a step must be one of send, wait, condition, ab_test, tag, end")
            continue
        if kind in SPLITS or kind == END:
            if not last:
                err(step, path, "step.terminal", f"{kind} must be the last step of its sequence")
        elif last:
            err(
                step,
                path,
                "path.ends_in_end",
                "every path must end in END (this sequence ends in " + kind + ")",
            )
        if kind == SEND:
            send_ids.add(step.id)
            _validate_send(step, path, err)
        elif kind == WAIT:
            seconds = step.wait.duration.seconds
            if seconds <= 0 and step.wait.duration.nanos <= 0:
                err(step, f"{path}.wait.duration", "wait.positive", "duration must be greater than 0")
            elif seconds > MAX_WAIT_SECONDS:
                err(
                    step,
                    f"{path}.wait.duration",
                    "wait.bounded",
                    f"duration must be at most {MAX_WAIT_SECONDS}s",
                )
        elif kind == TAG:
            if not _TAG.match(step.tag.tag):
                err(
                    step,
                    f"{path}.tag.tag",
                    "tag.required",
                    "tag must be 1-64 letters, digits, '_', ':', '.', '-'",
                )
            if step.tag.action == cpb.TAG_ACTION_UNSPECIFIED:
                err(step, f"{path}.tag.action", "tag.action", "action must be ADD or REMOVE")
        elif kind == CONDITION:
            cond = step.condition
            _validate_predicate(step, f"{path}.condition.predicate", err)
            if not cond.yes.steps:
                err(
                    step,
                    f"{path}.condition.yes",
                    "condition.branches",
                    "the yes branch needs at least one step",
                )
            if not cond.no.steps:
                err(
                    step,
                    f"{path}.condition.no",
                    "condition.branches",
                    "the no branch needs at least one step",
                )
        elif kind == AB_TEST:
            variants = step.ab_test.variants
            if not 2 <= len(variants) <= 4:
                err(step, f"{path}.ab_test.variants", "ab_test.variants", "an A/B test has 2 to 4 variants")
            names = [v.name for v in variants]
            if len(set(names)) != len(names) or not all(names):
                err(
                    step,
                    f"{path}.ab_test.variants",
                    "ab_test.names",
                    "variant names must be non-empty and unique",
                )
            if any(v.weight <= 0 for v in variants):
                err(
                    step,
                    f"{path}.ab_test.variants",
                    "ab_test.weights",
                    "every weight must be a positive integer",
                )
            if sum(v.weight for v in variants) != 100:
                err(step, f"{path}.ab_test.variants", "ab_test.weights", "weights must sum to 100")
            for v, variant in enumerate(variants):
                if not variant.branch.steps:
                    err(
                        step,
                        f"{path}.ab_test.variants[{v}].branch",
                        "ab_test.branches",
                        "every variant needs a step",
                    )
    # Engagement conditions ask about a message the contact was sent earlier on its own path.
    _check_node_refs(list(flow.steps), "steps", frozenset(), send_ids, err)
    return errors


Report = Callable[[cpb.Step | None, str, str, str], None]

ENGAGEMENT_EVENTS = ("delivered", "opened", "clicked", "failed")
CHANNELS = (common.CHANNEL_EMAIL, common.CHANNEL_RCS, common.CHANNEL_SMS)


def _validate_predicate(step: cpb.Step, path: str, report: Report) -> None:
    pred = step.condition.predicate
    which = pred.WhichOneof("kind")
    if which is None:
        report(step, path, "condition.predicate", "a predicate is required")
    elif which == "attribute" and not pred.attribute.field:
        report(step, f"{path}.attribute.field", "condition.predicate", "a field is required")
    elif which == "tag" and not _TAG.match(pred.tag.tag):
        report(step, f"{path}.tag.tag", "condition.predicate", "a valid tag is required")
    elif which == "consent" and (
        pred.consent.channel not in CHANNELS or pred.consent.message_type == common.MESSAGE_TYPE_UNSPECIFIED
    ):
        report(step, f"{path}.consent", "condition.predicate", "consent needs a channel and a message type")
    elif which == "engagement" and pred.engagement.event not in ENGAGEMENT_EVENTS:
        report(
            step,
            f"{path}.engagement.event",
            "condition.predicate",
            f"event must be one of {', '.join(ENGAGEMENT_EVENTS)}",
        )
    elif which == "channel_used" and pred.channel_used.channel not in CHANNELS:
        report(
            step, f"{path}.channel_used.channel", "condition.predicate", "channel must be EMAIL, RCS or SMS"
        )


def _check_node_refs(
    steps: list[cpb.Step], path: str, before: frozenset[str], send_ids: set[str], report: Report
) -> None:
    """Engagement and channel-used predicates must name a SEND that precedes them on the path."""
    for i, step in enumerate(steps):
        step_path = f"{path}[{i}]"
        kind = kind_of(step)
        if kind == SEND:
            before = before | {step.id}
        elif kind == CONDITION:
            pred = step.condition.predicate
            which = pred.WhichOneof("kind")
            if which in ("engagement", "channel_used"):
                target = pred.engagement.node_id if which == "engagement" else pred.channel_used.node_id
                if target not in before:
                    where = "a later or another branch's" if target in send_ids else "not a"
                    report(
                        step,
                        f"{step_path}.condition.predicate.{which}.node_id",
                        "condition.node_ref",
                        f"{target!r} is {where} SEND step; it must be a SEND earlier on this path",
                    )
            _check_node_refs(
                list(step.condition.yes.steps), f"{step_path}.condition.yes.steps", before, send_ids, report
            )
            _check_node_refs(
                list(step.condition.no.steps), f"{step_path}.condition.no.steps", before, send_ids, report
            )
        elif kind == AB_TEST:
            for v, variant in enumerate(step.ab_test.variants):
                _check_node_refs(
                    list(variant.branch.steps),
                    f"{step_path}.ab_test.variants[{v}].branch.steps",
                    before,
                    send_ids,
                    report,
                )


def _validate_send(step: cpb.Step, path: str, report: Report) -> None:
    send = step.send
    if send.channel not in CHANNELS:
        report(step, f"{path}.send.channel", "send.channel", "channel is required (EMAIL, RCS or SMS)")
    if send.message_type == common.MESSAGE_TYPE_UNSPECIFIED:
        report(step, f"{path}.send.message_type", "send.message_type", "message type is required")
    if not send.template.template_id:
        report(step, f"{path}.send.template.template_id", "send.template", "a template is required")
    if send.template.version < 0:
        report(
            step, f"{path}.send.template.version", "send.template", "version is 0 (latest published) or more"
        )
    if send.channel == common.CHANNEL_RCS:
        if send.fallback == cpb.RCS_FALLBACK_UNSPECIFIED:
            report(
                step,
                f"{path}.send.fallback",
                "send.rcs_fallback",
                "RCS sends need a fallback: none, sms or sms_custom",
            )
        if send.fallback == cpb.RCS_FALLBACK_SMS_CUSTOM and not send.sms_template.template_id:
            report(
                step,
                f"{path}.send.sms_template",
                "send.rcs_fallback",
                "sms_custom fallback needs an SMS template",
            )
    elif send.fallback != cpb.RCS_FALLBACK_UNSPECIFIED:
        report(step, f"{path}.send.fallback", "send.rcs_fallback", "a fallback applies to RCS sends only")


def compile_flow(flow: cpb.Flow) -> CompiledFlow:
    """The graph workers step through; the flow must be valid."""
    nodes: dict[str, Node] = {}

    def build(steps: list[cpb.Step]) -> str:
        first = ""
        prev: Node | None = None
        for step in steps:
            node = Node(step.id, kind_of(step), step)
            nodes[step.id] = node
            if prev is not None:
                prev.next = node.id
            first = first or node.id
            if node.kind == CONDITION:
                node.branches = {
                    "yes": build(list(step.condition.yes.steps)),
                    "no": build(list(step.condition.no.steps)),
                }
            elif node.kind == AB_TEST:
                node.weights = [(v.name, v.weight) for v in step.ab_test.variants]
                node.branches = {v.name: build(list(v.branch.steps)) for v in step.ab_test.variants}
            prev = node
        return first

    entry = build(list(flow.steps))
    return CompiledFlow(entry=entry, nodes=nodes)


def ab_variant(run_id: str, contact_id: str, node_id: str, weights: list[tuple[str, int]]) -> str:
    """A contact's variant: deterministic from a hash of (run, contact, node) against the weights."""
    digest = hashlib.sha256(f"{run_id}:{contact_id}:{node_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % sum(w for _, w in weights)
    for name, weight in weights:
        if point < weight:
            return name
        point -= weight
    return weights[-1][0]


@dataclass(frozen=True)
class SendShare:
    """A SEND step with the share of contacts expected to reach it (basis points)."""

    step: cpb.Step
    expected_share_bp: int
    on_upper_path: bool


def send_profile(flow: cpb.Flow, cost: Callable[[cpb.Step], int] | None = None) -> list[SendShare]:
    """Each SEND with its expected share and whether it lies on the most expensive path.

    Expected shares follow the AB weights; a CONDITION's outcome is unknown before the run, so
    the expected value splits it evenly. The upper bound follows, at every split, the branch whose
    SENDs cost most by `cost` (a SEND step's price; without it every SEND counts 1, so the branch
    with the most SENDs).
    """
    shares: list[SendShare] = []
    price = cost or (lambda _step: 1)

    def sends_on_max_path(steps: list[cpb.Step]) -> tuple[int, set[str]]:
        total, ids = 0, set()
        for step in steps:
            kind = kind_of(step)
            if kind == SEND:
                total += price(step)
                ids.add(step.id)
            elif kind == CONDITION:
                options = [sends_on_max_path(list(b.steps)) for b in (step.condition.yes, step.condition.no)]
                best = max(options, key=lambda o: o[0])
                total += best[0]
                ids |= best[1]
            elif kind == AB_TEST:
                options = [sends_on_max_path(list(v.branch.steps)) for v in step.ab_test.variants]
                best = max(options, key=lambda o: o[0]) if options else (0, set())
                total += best[0]
                ids |= best[1]
        return total, ids

    _, upper_ids = sends_on_max_path(list(flow.steps))

    def visit(steps: list[cpb.Step], share_bp: int) -> None:
        for step in steps:
            kind = kind_of(step)
            if kind == SEND:
                shares.append(SendShare(step, share_bp, step.id in upper_ids))
            elif kind == CONDITION:
                visit(list(step.condition.yes.steps), share_bp // 2)
                visit(list(step.condition.no.steps), share_bp - share_bp // 2)
            elif kind == AB_TEST:
                for v in step.ab_test.variants:
                    visit(list(v.branch.steps), share_bp * v.weight // 100)

    visit(list(flow.steps), 10_000)
    return shares


DEFAULT_PROVIDER = "default:"


def providers_of(flow: cpb.Flow) -> list[str]:
    """The providers a flow's SEND steps use, for routing breaker events to campaigns.

    A step naming a provider gives its name; a step relying on the channel's default gives
    `default:<CHANNEL>` (the execution service decides the default and says, in its breaker events,
    which channels a provider is the default of). An RCS step with an SMS fallback also uses the
    SMS default.
    """
    names: set[str] = set()
    for step, _p, _d, _l in _walk(list(flow.steps), "steps", 0):
        if kind_of(step) != SEND:
            continue
        send = step.send
        channel = common.Channel.Name(send.channel).removeprefix("CHANNEL_")
        names.add(send.provider or f"{DEFAULT_PROVIDER}{channel}")
        if send.fallback in (cpb.RCS_FALLBACK_SMS, cpb.RCS_FALLBACK_SMS_CUSTOM):
            names.add(f"{DEFAULT_PROVIDER}SMS")
    return sorted(names)


def uses_provider(providers: Iterable[str], provider: str, default_for: Iterable[str]) -> bool:
    """Whether a campaign whose flow uses `providers` (see `providers_of`) sends through `provider`,
    which is the default of the channels `default_for` (names like "EMAIL")."""
    used = set(providers)
    return provider in used or any(f"{DEFAULT_PROVIDER}{channel}" in used for channel in default_for)
