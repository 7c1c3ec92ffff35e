"""The pure flow kit: validation (node id, path, rule), compilation, A/B variants, send profile."""

from __future__ import annotations

from collections import Counter

import pytest
from google.protobuf import duration_pb2

from shoal import flow as flows
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb

EMAIL, SMS, RCS = common.CHANNEL_EMAIL, common.CHANNEL_SMS, common.CHANNEL_RCS
MESSAGE = common.MESSAGE_TYPE_MESSAGE


# -- builders ------------------------------------------------------------------------------------


def send(step_id: str, channel: int = EMAIL, **kw: object) -> cpb.Step:
    return cpb.Step(
        id=step_id,
        send=cpb.SendStep(
            channel=channel, message_type=MESSAGE, template=tpb.TemplateRef(template_id="tpl_1"), **kw
        ),
    )


def end(step_id: str) -> cpb.Step:
    return cpb.Step(id=step_id, end=cpb.EndStep())


def wait(step_id: str, seconds: int) -> cpb.Step:
    return cpb.Step(id=step_id, wait=cpb.WaitStep(duration=duration_pb2.Duration(seconds=seconds)))


def tag(step_id: str, name: str = "vip", action: int = cpb.TAG_ACTION_ADD) -> cpb.Step:
    return cpb.Step(id=step_id, tag=cpb.TagStep(tag=name, action=action))


def condition(
    step_id: str, yes: list[cpb.Step], no: list[cpb.Step], predicate: cpb.Predicate | None = None
) -> cpb.Step:
    pred = predicate if predicate is not None else cpb.Predicate(tag=spb.TagCondition(tag="vip"))
    return cpb.Step(
        id=step_id,
        condition=cpb.ConditionStep(predicate=pred, yes=cpb.Branch(steps=yes), no=cpb.Branch(steps=no)),
    )


def ab(step_id: str, *variants: tuple[str, int, list[cpb.Step]]) -> cpb.Step:
    return cpb.Step(
        id=step_id,
        ab_test=cpb.AbTestStep(
            variants=[
                cpb.AbVariant(name=name, weight=weight, branch=cpb.Branch(steps=steps))
                for name, weight, steps in variants
            ]
        ),
    )


def flow(*steps: cpb.Step) -> cpb.Flow:
    return cpb.Flow(steps=list(steps))


def errors_of(f: cpb.Flow) -> set[tuple[str, str, str]]:
    return {(e.node_id, e.path, e.rule) for e in flows.validate(f)}


def opened(node_id: str, event: str = "opened") -> cpb.Predicate:
    return cpb.Predicate(engagement=cpb.EngagementPredicate(node_id=node_id, event=event))


def rich_flow() -> cpb.Flow:
    """send -> condition(opened s1?) -> yes: tag, ab(a: send, b: wait+end) ; no: end."""
    return flow(
        send("s1"),
        condition(
            "c1",
            yes=[
                tag("t1"),
                ab(
                    "ab1",
                    ("a", 30, [send("s2", SMS), end("e2")]),
                    ("b", 70, [wait("w1", 3600), end("e3")]),
                ),
            ],
            no=[end("e1")],
            predicate=opened("s1"),
        ),
    )


# -- validation: valid flows ---------------------------------------------------------------------


def test_valid_flows_have_no_errors() -> None:
    assert flows.validate(flow(send("s1"), end("e1"))) == []
    assert flows.validate(rich_flow()) == []
    assert flows.validate(flow(send("r1", RCS, fallback=cpb.RCS_FALLBACK_NONE), end("e"))) == []


# -- validation: structure -----------------------------------------------------------------------


def test_empty_flow_is_refused() -> None:
    assert errors_of(cpb.Flow()) == {("", "steps", "flow.not_empty")}


def test_one_entry_every_path_ends_in_end() -> None:
    # The flow is a sequence: its first step is the one entry; a sequence not ending in END fails.
    assert errors_of(flow(send("s1"))) == {("s1", "steps[0]", "path.ends_in_end")}
    nested = flow(condition("c1", yes=[send("s2")], no=[end("e1")]))
    assert errors_of(nested) == {("s2", "steps[0].condition.yes.steps[0]", "path.ends_in_end")}
    in_variant = flow(ab("ab1", ("a", 50, [end("e1")]), ("b", 50, [tag("t1")])))
    assert errors_of(in_variant) == {
        ("t1", "steps[0].ab_test.variants[1].branch.steps[0]", "path.ends_in_end")
    }


def test_end_and_splits_must_be_last_of_their_sequence() -> None:
    assert errors_of(flow(end("e1"), send("s1"), end("e2"))) == {("e1", "steps[0]", "step.terminal")}
    split_then_more = flow(condition("c1", yes=[end("e1")], no=[end("e2")]), end("e3"))
    assert errors_of(split_then_more) == {("c1", "steps[0]", "step.terminal")}
    ab_then_more = flow(ab("ab1", ("a", 50, [end("e1")]), ("b", 50, [end("e2")])), send("s1"), end("e3"))
    assert ("ab1", "steps[0]", "step.terminal") in errors_of(ab_then_more)


def test_duplicate_ids_name_both_places() -> None:
    f = flow(send("s1"), condition("c1", yes=[send("s1"), end("e1")], no=[end("e2")]))
    errs = flows.validate(f)
    assert [(e.node_id, e.path, e.rule) for e in errs] == [
        ("s1", "steps[1].condition.yes.steps[0].id", "step.id_unique")
    ]
    assert "steps[0]" in errs[0].message


@pytest.mark.parametrize("bad_id", ["", "has space", "x" * 65, "semi;colon"])
def test_step_ids_are_checked(bad_id: str) -> None:
    assert errors_of(flow(send(bad_id), end("e1"))) == {(bad_id, "steps[0].id", "step.id")}


def test_step_without_kind_is_refused() -> None:
    assert errors_of(flow(cpb.Step(id="x1"), end("e1"))) == {("x1", "steps[0]", "step.kind")}


def test_depth_limit_is_reported_once() -> None:
    branch = [end("e_last")]
    for level in range(flows.MAX_DEPTH + 3):
        branch = [condition(f"c{level}", yes=branch, no=[end(f"n{level}")])]
    errs = [e for e in flows.validate(flow(*branch)) if e.rule == "flow.max_depth"]
    # Once per branch that goes too deep (the yes and no of the deepest allowed split), not
    # again for every step below.
    assert len(errs) == 2
    assert all(e.path.count(".condition.") == flows.MAX_DEPTH + 1 for e in errs)
    assert {e.path.rsplit(".", 2)[-2] for e in errs} == {"yes", "no"}


def test_size_limit() -> None:
    f = flow(*[tag(f"t{i}") for i in range(flows.MAX_STEPS + 5)], end("e1"))
    errs = [e for e in flows.validate(f) if e.rule == "flow.max_steps"]
    assert [(e.node_id, e.path) for e in errs] == [(f"t{flows.MAX_STEPS}", f"steps[{flows.MAX_STEPS}]")]


# -- validation: splits --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 5])
def test_ab_test_needs_2_to_4_variants(count: int) -> None:
    weights = [100] if count == 1 else [20] * 5
    step = ab("ab1", *[(f"v{i}", w, [end(f"e{i}")]) for i, w in enumerate(weights)])
    assert errors_of(flow(step)) == {("ab1", "steps[0].ab_test.variants", "ab_test.variants")}


@pytest.mark.parametrize("count", [2, 3, 4])
def test_ab_test_with_2_to_4_variants_is_valid(count: int) -> None:
    weights = {2: [50, 50], 3: [33, 33, 34], 4: [25, 25, 25, 25]}[count]
    step = ab("ab1", *[(f"v{i}", w, [end(f"e{i}")]) for i, w in enumerate(weights)])
    assert flows.validate(flow(step)) == []


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([60, 30], "weights must sum to 100"),
        ([100, 0], "every weight must be a positive integer"),
        ([120, -20], "every weight must be a positive integer"),
    ],
)
def test_ab_test_weights(weights: list[int], message: str) -> None:
    step = ab("ab1", ("a", weights[0], [end("e1")]), ("b", weights[1], [end("e2")]))
    errs = flows.validate(flow(step))
    assert {(e.node_id, e.path, e.rule) for e in errs} == {
        ("ab1", "steps[0].ab_test.variants", "ab_test.weights")
    }
    assert message in {e.message for e in errs}


@pytest.mark.parametrize("names", [("a", "a"), ("a", "")])
def test_ab_test_variant_names_unique_and_present(names: tuple[str, str]) -> None:
    step = ab("ab1", (names[0], 50, [end("e1")]), (names[1], 50, [end("e2")]))
    assert errors_of(flow(step)) == {("ab1", "steps[0].ab_test.variants", "ab_test.names")}


def test_ab_test_variant_needs_a_branch() -> None:
    step = ab("ab1", ("a", 50, [end("e1")]), ("b", 50, []))
    assert errors_of(flow(step)) == {("ab1", "steps[0].ab_test.variants[1].branch", "ab_test.branches")}


def test_condition_needs_both_branches() -> None:
    assert errors_of(flow(condition("c1", yes=[], no=[end("e1")]))) == {
        ("c1", "steps[0].condition.yes", "condition.branches")
    }
    assert errors_of(flow(condition("c1", yes=[end("e1")], no=[]))) == {
        ("c1", "steps[0].condition.no", "condition.branches")
    }


@pytest.mark.parametrize(
    ("predicate", "path"),
    [
        (cpb.Predicate(), "steps[0].condition.predicate"),
        (cpb.Predicate(tag=spb.TagCondition(tag="")), "steps[0].condition.predicate.tag.tag"),
        (
            cpb.Predicate(attribute=spb.FieldCondition(field="")),
            "steps[0].condition.predicate.attribute.field",
        ),
        (cpb.Predicate(consent=spb.ConsentCondition(channel=EMAIL)), "steps[0].condition.predicate.consent"),
    ],
)
def test_condition_needs_a_valid_predicate(predicate: cpb.Predicate, path: str) -> None:
    f = flow(condition("c1", yes=[end("e1")], no=[end("e2")], predicate=predicate))
    assert errors_of(f) == {("c1", path, "condition.predicate")}


def test_engagement_predicate_must_name_an_earlier_send() -> None:
    unknown = flow(send("s1"), condition("c1", yes=[end("e1")], no=[end("e2")], predicate=opened("nope")))
    assert errors_of(unknown) == {
        ("c1", "steps[1].condition.predicate.engagement.node_id", "condition.node_ref")
    }
    not_a_send = flow(
        tag("t1"), send("s1"), condition("c1", yes=[end("e1")], no=[end("e2")], predicate=opened("t1"))
    )
    assert ("c1", "steps[2].condition.predicate.engagement.node_id", "condition.node_ref") in errors_of(
        not_a_send
    )
    # A SEND in a sibling branch is never on this contact's path.
    sibling = flow(
        ab(
            "ab1",
            ("a", 50, [send("s1"), end("e1")]),
            ("b", 50, [condition("c1", yes=[end("e2")], no=[end("e3")], predicate=opened("s1"))]),
        )
    )
    assert errors_of(sibling) == {
        (
            "c1",
            "steps[0].ab_test.variants[1].branch.steps[0].condition.predicate.engagement.node_id",
            "condition.node_ref",
        )
    }
    channel_used = cpb.Predicate(channel_used=cpb.ChannelUsedPredicate(node_id="zz", channel=SMS))
    f = flow(send("s1"), condition("c1", yes=[end("e1")], no=[end("e2")], predicate=channel_used))
    assert errors_of(f) == {("c1", "steps[1].condition.predicate.channel_used.node_id", "condition.node_ref")}


def test_engagement_event_is_checked() -> None:
    f = flow(send("s1"), condition("c1", yes=[end("e1")], no=[end("e2")], predicate=opened("s1", "read")))
    assert errors_of(f) == {("c1", "steps[1].condition.predicate.engagement.event", "condition.predicate")}


# -- validation: WAIT, TAG, SEND -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "rule"),
    [(0, "wait.positive"), (-60, "wait.positive"), (flows.MAX_WAIT_SECONDS + 1, "wait.bounded")],
)
def test_wait_positive_and_bounded(seconds: int, rule: str) -> None:
    assert errors_of(flow(wait("w1", seconds), end("e1"))) == {("w1", "steps[0].wait.duration", rule)}


def test_wait_at_the_bound_is_valid() -> None:
    assert flows.validate(flow(wait("w1", flows.MAX_WAIT_SECONDS), end("e1"))) == []


def test_tag_needs_tag_and_action() -> None:
    assert errors_of(flow(tag("t1", name=""), end("e1"))) == {("t1", "steps[0].tag.tag", "tag.required")}
    assert errors_of(flow(tag("t1", name="bad tag"), end("e1"))) == {
        ("t1", "steps[0].tag.tag", "tag.required")
    }
    assert errors_of(flow(tag("t1", action=cpb.TAG_ACTION_UNSPECIFIED), end("e1"))) == {
        ("t1", "steps[0].tag.action", "tag.action")
    }


def test_send_needs_channel_type_and_template() -> None:
    bare = cpb.Step(id="s1", send=cpb.SendStep())
    assert errors_of(flow(bare, end("e1"))) == {
        ("s1", "steps[0].send.channel", "send.channel"),
        ("s1", "steps[0].send.message_type", "send.message_type"),
        ("s1", "steps[0].send.template.template_id", "send.template"),
    }
    unknown_channel = send("s1", 42)
    assert errors_of(flow(unknown_channel, end("e1"))) == {("s1", "steps[0].send.channel", "send.channel")}
    negative = send("s1")
    negative.send.template.version = -1
    assert errors_of(flow(negative, end("e1"))) == {("s1", "steps[0].send.template.version", "send.template")}


def test_rcs_fallback_rules() -> None:
    assert errors_of(flow(send("r1", RCS), end("e1"))) == {
        ("r1", "steps[0].send.fallback", "send.rcs_fallback")
    }
    custom = send("r1", RCS, fallback=cpb.RCS_FALLBACK_SMS_CUSTOM)
    assert errors_of(flow(custom, end("e1"))) == {("r1", "steps[0].send.sms_template", "send.rcs_fallback")}
    custom.send.sms_template.template_id = "tpl_sms"
    assert flows.validate(flow(custom, end("e1"))) == []
    email_with_fallback = send("s1", EMAIL, fallback=cpb.RCS_FALLBACK_SMS)
    assert errors_of(flow(email_with_fallback, end("e1"))) == {
        ("s1", "steps[0].send.fallback", "send.rcs_fallback")
    }


def test_every_error_is_reported_not_just_the_first() -> None:
    f = flow(cpb.Step(id="s1", send=cpb.SendStep()), wait("w1", 0), tag("t1", name=""))
    rules = {e.rule for e in flows.validate(f)}
    assert {"send.channel", "send.template", "wait.positive", "tag.required", "path.ends_in_end"} <= rules


# -- compile -------------------------------------------------------------------------------------


def test_compile_flow_links_next_and_branches() -> None:
    compiled = flows.compile_flow(rich_flow())
    assert compiled.entry == "s1"
    n = compiled.nodes
    assert set(n) == {"s1", "c1", "t1", "ab1", "s2", "e2", "w1", "e3", "e1"}
    assert (n["s1"].kind, n["s1"].next) == (flows.SEND, "c1")
    assert n["c1"].branches == {"yes": "t1", "no": "e1"}
    assert n["c1"].next == ""
    assert n["t1"].next == "ab1"
    assert n["ab1"].branches == {"a": "s2", "b": "w1"}
    assert n["ab1"].weights == [("a", 30), ("b", 70)]
    assert (n["s2"].next, n["w1"].next) == ("e2", "e3")
    assert n["e2"].next == n["e3"].next == n["e1"].next == ""
    assert compiled.node("w1").step.wait.duration.seconds == 3600


# -- A/B variants --------------------------------------------------------------------------------


def test_ab_variant_is_deterministic() -> None:
    weights = [("a", 30), ("b", 70)]
    first = [flows.ab_variant("run1", f"c_{i}", "ab1", weights) for i in range(200)]
    again = [flows.ab_variant("run1", f"c_{i}", "ab1", weights) for i in range(200)]
    assert first == again
    # Another run (or node) draws again: not every contact lands in the same variant.
    other = [flows.ab_variant("run2", f"c_{i}", "ab1", weights) for i in range(200)]
    assert first != other


@pytest.mark.parametrize(
    "weights", [[("a", 50), ("b", 50)], [("a", 10), ("b", 30), ("c", 60)], [("a", 1), ("b", 99)]]
)
def test_ab_variant_follows_the_weights(weights: list[tuple[str, int]]) -> None:
    n = 10_000
    counts = Counter(flows.ab_variant("run-x", f"c_{i:05d}", "ab1", weights) for i in range(n))
    for name, weight in weights:
        assert abs(counts[name] / n * 100 - weight) <= 2, (name, weight, counts)


# -- send profile --------------------------------------------------------------------------------


def profile(f: cpb.Flow, **kw: object) -> dict[str, tuple[int, bool]]:
    return {s.step.id: (s.expected_share_bp, s.on_upper_path) for s in flows.send_profile(f, **kw)}  # type: ignore[arg-type]


def test_send_profile_shares_follow_weights_and_halve_conditions() -> None:
    f = flow(
        send("s0"),
        ab(
            "ab1",
            ("a", 20, [send("sa"), end("ea")]),
            ("b", 80, [condition("c1", yes=[send("sy"), end("ey")], no=[end("en")])]),
        ),
    )
    shares = profile(f)
    assert {k: v[0] for k, v in shares.items()} == {"s0": 10_000, "sa": 2_000, "sy": 4_000}


def test_send_profile_upper_path_counts_sends_by_default() -> None:
    f = flow(
        ab(
            "ab1",
            ("one", 90, [send("a1", SMS), end("e1")]),
            ("two", 10, [send("b1"), send("b2"), end("e2")]),
        )
    )
    assert profile(f) == {"a1": (9_000, False), "b1": (1_000, True), "b2": (1_000, True)}


def test_send_profile_upper_path_follows_cost() -> None:
    f = flow(
        ab(
            "ab1",
            ("one", 90, [send("a1", SMS), end("e1")]),
            ("two", 10, [send("b1"), send("b2"), end("e2")]),
        )
    )
    price = {SMS: 7, EMAIL: 1}
    assert profile(f, cost=lambda step: price[step.send.channel]) == {
        "a1": (9_000, True),
        "b1": (1_000, False),
        "b2": (1_000, False),
    }


def test_send_profile_without_sends_is_empty() -> None:
    assert flows.send_profile(flow(wait("w1", 60), end("e1"))) == []


def test_providers_of() -> None:
    f = flow(send("s1"), send("s2", provider="smtp"), end("e1"))
    assert flows.providers_of(f) == ["default:EMAIL", "smtp"]
    # A campaign relying on the EMAIL default uses whatever the execution service defaults EMAIL to.
    assert flows.uses_provider(flows.providers_of(f), "acme", ["EMAIL"])
    assert flows.uses_provider(flows.providers_of(f), "smtp", [])
    assert not flows.uses_provider(flows.providers_of(f), "acme", ["SMS", "RCS"])
    # Rows stored before defaults were named by channel still match by name.
    assert flows.uses_provider(["sandbox"], "sandbox", [])
