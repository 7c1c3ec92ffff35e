"""Random flows: valid trees compile and run to an END on every path; broken trees get
errors with a node, a path and a rule; nothing ever raises."""

from __future__ import annotations

from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import flow as flows
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb

_counter = iter(range(10**9))


def _id() -> str:
    return f"n{next(_counter)}"


def _leaf(kind: str) -> cpb.Step:
    step = cpb.Step(id=_id())
    if kind == "send":
        step.send.CopyFrom(
            cpb.SendStep(
                channel=common.CHANNEL_EMAIL,
                message_type=common.MESSAGE_TYPE_MESSAGE,
                template=tpb.TemplateRef(template_id="tpl_x"),
            )
        )
    elif kind == "wait":
        step.wait.CopyFrom(cpb.WaitStep(duration=duration_pb2.Duration(seconds=60)))
    elif kind == "tag":
        step.tag.CopyFrom(cpb.TagStep(tag="seen", action=cpb.TAG_ACTION_ADD))
    return step


@st.composite
def valid_sequence(draw: st.DrawFn, depth: int = 0) -> list[cpb.Step]:
    steps = [_leaf(k) for k in draw(st.lists(st.sampled_from(["send", "wait", "tag"]), max_size=3))]
    ending = draw(st.sampled_from(["end", "condition", "ab"] if depth < 3 else ["end"]))
    if ending == "end":
        steps.append(cpb.Step(id=_id(), end=cpb.EndStep()))
    elif ending == "condition":
        steps.append(
            cpb.Step(
                id=_id(),
                condition=cpb.ConditionStep(
                    predicate=cpb.Predicate(tag=spb.TagCondition(tag="vip")),
                    yes=cpb.Branch(steps=draw(valid_sequence(depth + 1))),
                    no=cpb.Branch(steps=draw(valid_sequence(depth + 1))),
                ),
            )
        )
    else:
        n = draw(st.integers(min_value=2, max_value=4))
        weights = [100 // n] * n
        weights[0] += 100 - sum(weights)
        steps.append(
            cpb.Step(
                id=_id(),
                ab_test=cpb.AbTestStep(
                    variants=[
                        cpb.AbVariant(
                            name=f"v{i}", weight=w, branch=cpb.Branch(steps=draw(valid_sequence(depth + 1)))
                        )
                        for i, w in enumerate(weights)
                    ]
                ),
            )
        )
    return steps


def paths_end(compiled: flows.CompiledFlow, node_id: str, seen: frozenset[str] = frozenset()) -> bool:
    """Every path from node_id reaches END, without revisiting a node."""
    assert node_id not in seen, "cycle"
    node = compiled.node(node_id)
    if node.kind == flows.END:
        return True
    nexts = list(node.branches.values()) if node.kind in flows.SPLITS else [node.next]
    return all(n and paths_end(compiled, n, seen | {node_id}) for n in nexts)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(valid_sequence())
def test_valid_random_flows_validate_and_compile(steps: list[cpb.Step]) -> None:
    flow = cpb.Flow(steps=steps)
    assert flows.validate(flow) == []
    compiled = flows.compile_flow(flow)
    assert paths_end(compiled, compiled.entry)
    assert len(compiled.nodes) == len({s.id for s, *_ in flows._walk(list(flow.steps), "steps", 0)})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_sequence(), st.data())
def test_broken_flows_get_errors_never_exceptions(steps: list[cpb.Step], data: st.DataObject) -> None:
    flow = cpb.Flow(steps=steps)
    every = [s for s, *_ in flows._walk(list(flow.steps), "steps", 0)]
    victim = data.draw(st.sampled_from(every))
    breakage = data.draw(
        st.sampled_from(["drop_kind", "dup_id", "bad_id", "zero_wait", "bad_weights", "end_first"])
    )
    if breakage == "drop_kind":
        victim.ClearField(victim.WhichOneof("kind"))  # type: ignore[arg-type]
    elif breakage == "dup_id":
        victim.id = every[0].id if victim is not every[0] else (every[-1].id if len(every) > 1 else "")
    elif breakage == "bad_id":
        victim.id = "bad id; DROP TABLE"
    elif breakage == "zero_wait":
        victim.wait.CopyFrom(cpb.WaitStep(duration=duration_pb2.Duration(seconds=0)))
    elif breakage == "bad_weights":
        victim.ab_test.CopyFrom(
            cpb.AbTestStep(
                variants=[
                    cpb.AbVariant(
                        name="a", weight=60, branch=cpb.Branch(steps=[cpb.Step(id=_id(), end=cpb.EndStep())])
                    )
                ]
            )
        )
    else:
        flow.steps.insert(0, cpb.Step(id=_id(), end=cpb.EndStep()))
    errors = flows.validate(flow)
    assert errors, f"{breakage} on {victim.id} was not reported"
    for e in errors:
        assert e.rule and e.message and e.path
