"""The per-node funnel (gateway.routers.funnel): paths through flows with nested splits, and the
counts derived from execution rows grouped by (node, state, reason, A/B variants)."""

from __future__ import annotations

from typing import Any

from gateway import flows as json_flows
from gateway.routers.funnel import FunnelNode, compute, parse_variants, placements
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import execution_pb2 as epb

PENDING, COMPLETED, FAILED, SKIPPED = (
    epb.EXECUTION_STATE_PENDING,
    epb.EXECUTION_STATE_COMPLETED,
    epb.EXECUTION_STATE_FAILED,
    epb.EXECUTION_STATE_SKIPPED,
)
SEND = {"channel": "EMAIL", "message_type": "MESSAGE", "template": {"template_id": "tpl_x"}}
END: dict[str, Any] = {"end": {}}


def flow(steps: list[dict[str, Any]]) -> cpb.Flow:
    return json_flows.flow_to_pb(json_flows.Flow.model_validate({"steps": steps}))


# s1 -> w1 -> c1 { yes: t1 -> ab { A: s2 -> e1 | B: c2 { yes: e2 | no: s3 -> e3 } } | no: e4 }
NESTED = flow(
    [
        {"id": "s1", "send": SEND},
        {"id": "w1", "wait": {"duration": "PT1H"}},
        {
            "id": "c1",
            "condition": {
                "predicate": {"tag": "vip"},
                "yes": [
                    {"id": "t1", "tag": {"tag": "seen", "action": "ADD"}},
                    {
                        "id": "ab",
                        "ab_test": {
                            "variants": [
                                {
                                    "name": "A",
                                    "weight": 30,
                                    "steps": [{"id": "s2", "send": SEND}, {"id": "e1", **END}],
                                },
                                {
                                    "name": "B",
                                    "weight": 70,
                                    "steps": [
                                        {
                                            "id": "c2",
                                            "condition": {
                                                "predicate": {"tag": "x"},
                                                "yes": [{"id": "e2", **END}],
                                                "no": [{"id": "s3", "send": SEND}, {"id": "e3", **END}],
                                            },
                                        }
                                    ],
                                },
                            ]
                        },
                    },
                ],
                "no": [{"id": "e4", **END}],
            },
        },
    ]
)


def row(node: str, state: int, count: int, *, reason: str = "", ab: str = "") -> epb.FunnelRow:
    return epb.FunnelRow(node_id=node, state=state, reason=reason, ab_variant=ab, count=count)


def by_id(nodes: list[FunnelNode]) -> dict[str, FunnelNode]:
    return {n.node_id: n for n in nodes}


def test_every_node_has_its_path_from_the_entry_through_nested_splits() -> None:
    placed = placements(NESTED)
    assert list(placed) == ["s1", "w1", "c1", "t1", "ab", "s2", "e1", "c2", "e2", "s3", "e3", "e4"]
    paths = {n: p.path for n, p in placed.items()}
    assert paths["s1"] == ("s1",)
    assert paths["c1"] == ("s1", "w1", "c1")
    # A branch's steps come after the split that opens it and the steps before that split.
    assert paths["t1"] == ("s1", "w1", "c1", "t1")
    assert paths["e4"] == ("s1", "w1", "c1", "e4")
    assert paths["e1"] == ("s1", "w1", "c1", "t1", "ab", "s2", "e1")
    # Two splits deep: the inner condition's path includes the outer split and the A/B test.
    assert paths["e3"] == ("s1", "w1", "c1", "t1", "ab", "c2", "s3", "e3")
    assert paths["e2"] == ("s1", "w1", "c1", "t1", "ab", "c2", "e2")
    # Sibling branches never appear on each other's paths.
    assert "s2" not in paths["e3"] and "c2" not in paths["e1"] and "t1" not in paths["e4"]
    assert placed["s3"].branches == (("c1", "yes"), ("ab", "B"), ("c2", "no"))
    assert placed["e4"].branches == (("c1", "no"),)
    assert placed["s1"].branches == ()


def test_counts_follow_the_paths() -> None:
    rows = [
        row("s1", SKIPPED, 2, reason="no_consent"),
        row("w1", PENDING, 1),  # never happens in practice (a WAIT parks at its next step), still counted
        row("c1", PENDING, 3),  # parked after the WAIT, before the condition
        row("e4", COMPLETED, 5),
        row("e1", COMPLETED, 4, ab="ab=A"),
        row("s2", FAILED, 1, reason="render: missing variable", ab="ab=A"),
        row("e2", COMPLETED, 6, ab="ab=B"),
        row("s3", SKIPPED, 1, reason="no_consent", ab="ab=B"),
        row("e3", COMPLETED, 2, ab="ab=B"),
        row("e3", FAILED, 0, ab="ab=B"),
    ]
    sends = [
        epb.SendCount(node_id="s1", status=epb.SEND_STATUS_DELIVERED, count=20),
        epb.SendCount(node_id="s1", status=epb.SEND_STATUS_FAILED, count=1),
        epb.SendCount(node_id="s2", status=epb.SEND_STATUS_ACCEPTED, count=4),
        epb.SendCount(node_id="s3", status=epb.SEND_STATUS_DELIVERED, count=2),
    ]
    nodes, total, unplaced = compute(NESTED, rows, sends)
    n = by_id(nodes)
    assert (total, unplaced) == (25, 0)
    # Everyone entered the first step; the skipped two stopped there.
    assert n["s1"].entered == 25
    assert n["w1"].entered == 23
    assert n["c1"].entered == 22
    assert n["c1"].condition is not None
    assert (n["c1"].condition.yes, n["c1"].condition.no) == (14, 5)
    assert n["t1"].entered == n["ab"].entered == 14
    assert n["ab"].variants is not None
    assert [(v.name, v.weight, v.count) for v in n["ab"].variants] == [("A", 30, 5), ("B", 70, 9)]
    assert n["s2"].entered == 5 and n["e1"].entered == 4
    assert n["c2"].entered == 9
    assert n["c2"].condition is not None
    assert (n["c2"].condition.yes, n["c2"].condition.no) == (6, 3)
    assert n["s3"].entered == 3 and n["e3"].entered == 2
    # At-node counts, reasons and sends.
    assert n["c1"].at.pending == 3 and n["e4"].at.completed == 5
    assert [(r.reason, r.count) for r in n["s1"].skipped] == [("no_consent", 2)]
    assert [(r.reason, r.count) for r in n["s2"].failed] == [("render: missing variable", 1)]
    assert n["s1"].sent == 21 and n["s1"].sends is not None and n["s1"].sends.failed == 1
    assert n["s2"].sent == 4 and n["s3"].sent == 2
    assert n["w1"].sent is None and n["w1"].sends is None and n["w1"].condition is None
    assert n["e3"].variants is None
    # Placement fields for drawing the tree.
    assert (n["s3"].parent_id, n["s3"].branch, n["s3"].depth) == ("c2", "no", 3)
    assert (n["s2"].parent_id, n["s2"].branch, n["s2"].depth) == ("ab", "A", 2)
    assert n["s1"].type == "SEND" and n["ab"].type == "AB_TEST" and n["e4"].type == "END"


def test_an_unknown_node_is_counted_apart_and_variants_parse() -> None:
    nodes, total, unplaced = compute(NESTED, [row("gone", FAILED, 2), row("s1", PENDING, 1)], [])
    assert (total, unplaced) == (3, 2)
    assert by_id(nodes)["s1"].entered == 1
    assert parse_variants("ab1=A;ab2=B") == {"ab1": "A", "ab2": "B"}
    assert parse_variants("") == {} and parse_variants("junk;x=") == {"x": ""}


def test_two_ab_tests_on_one_path_each_count_their_own_variant() -> None:
    two = flow(
        [
            {
                "id": "ab1",
                "ab_test": {
                    "variants": [
                        {
                            "name": "A",
                            "weight": 50,
                            "steps": [
                                {
                                    "id": "ab2",
                                    "ab_test": {
                                        "variants": [
                                            {"name": "X", "weight": 50, "steps": [{"id": "e1", **END}]},
                                            {"name": "Y", "weight": 50, "steps": [{"id": "e2", **END}]},
                                        ]
                                    },
                                }
                            ],
                        },
                        {"name": "B", "weight": 50, "steps": [{"id": "e3", **END}]},
                    ]
                },
            }
        ]
    )
    rows = [
        row("e1", COMPLETED, 3, ab="ab1=A;ab2=X"),
        row("e2", COMPLETED, 1, ab="ab1=A;ab2=Y"),
        row("e3", COMPLETED, 4, ab="ab1=B"),
    ]
    n = by_id(compute(two, rows, [])[0])
    assert n["ab1"].variants is not None and n["ab2"].variants is not None
    assert [(v.name, v.count) for v in n["ab1"].variants] == [("A", 4), ("B", 4)]
    assert [(v.name, v.count) for v in n["ab2"].variants] == [("X", 3), ("Y", 1)]
    assert n["ab1"].entered == 8 and n["ab2"].entered == 4


def test_an_empty_or_unfinished_flow_has_zero_counts() -> None:
    nodes, total, _ = compute(cpb.Flow(), [], [])
    assert (nodes, total) == ([], 0)
    draft = cpb.Flow(steps=[cpb.Step(id="x"), cpb.Step(id="e1", end=cpb.EndStep())])
    n = by_id(compute(draft, [], [])[0])
    assert n["x"].type is None and n["x"].entered == 0 and n["e1"].path == ["x", "e1"]
