"""Text-mode pictures of API objects: tables, a flow tree, the live status board."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

EXECUTION_STATES = ("pending", "processing", "completed", "failed", "skipped")
STATE_STYLES = {
    "pending": "yellow",
    "processing": "cyan",
    "completed": "green",
    "failed": "red",
    "skipped": "magenta",
}
STEP_KINDS = ("send", "wait", "condition", "ab_test", "tag", "end")


def money(cents: Any) -> str:
    """Integer cents of EUR as `EUR 15.36` (cents stay integers: no float on the way)."""
    try:
        value = int(cents)
    except (TypeError, ValueError):
        return "-"
    sign = "-" if value < 0 else ""
    whole, rest = divmod(abs(value), 100)
    return f"{sign}EUR {whole:,}.{rest:02d}"


def text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(text(v) for v in value) or "-"
    return str(value)


def trigger_kind(trigger: Any) -> str:
    """`manual`, `api`, `scheduled 2026-05-01T09:00 Europe/Paris`, `event contact.created` ..."""
    if not isinstance(trigger, dict) or not trigger:
        return text(trigger)
    kind = trigger.get("type") or trigger.get("kind")
    if kind is None:
        kind = next((k for k, v in trigger.items() if isinstance(v, dict)), None)
        body = trigger.get(str(kind), {}) if kind else {}
    else:
        body = trigger
    words = [str(kind or "?").lower()]
    if isinstance(body, dict):
        for key in ("at", "time_zone", "event_type", "required_tag"):
            if body.get(key):
                words.append(str(body[key]))
    return " ".join(words)


def campaigns_table(items: Iterable[dict[str, Any]]) -> Table:
    table = Table(title="Campaigns", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("name")
    table.add_column("state", no_wrap=True)
    table.add_column("trigger")
    table.add_column("updated", no_wrap=True)
    for c in items:
        table.add_row(
            text(c.get("id")),
            text(c.get("name")),
            text(c.get("state")),
            trigger_kind(c.get("trigger")),
            text(c.get("updated_at") or c.get("update_time")),
        )
    return table


def key_values(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else text(value))
    return table


def _step_kind(step: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for kind in STEP_KINDS:
        if isinstance(step.get(kind), dict):
            return kind, step[kind]
    kind = str(step.get("type") or step.get("kind") or "?").lower()
    return kind, step


def _step_label(step: dict[str, Any]) -> str:
    kind, body = _step_kind(step)
    label = f"{step.get('id', '?')}: {kind.upper()}"
    if kind == "send":
        template = body.get("template")
        ref = template.get("template_id") if isinstance(template, dict) else template
        version = template.get("version") if isinstance(template, dict) else None
        pinned = f" v{version}" if version else ""
        label += f" {text(body.get('channel'))}/{text(body.get('message_type'))} template {text(ref)}{pinned}"
    elif kind == "wait":
        label += f" {text(body.get('duration'))}"
    elif kind == "tag":
        label += f" {text(body.get('action'))} {text(body.get('tag'))}"
    elif kind == "condition":
        label += f" {predicate_text(body.get('predicate'))}"
    return label


def predicate_text(predicate: Any) -> str:
    """`fields.plan eq pro`, `tag vip`, `engagement s1 opened` ..."""
    if not isinstance(predicate, dict) or not predicate:
        return "-"
    if "field" in predicate:
        value = predicate.get("value")
        return " ".join(str(p) for p in (predicate["field"], predicate.get("op", "?")) if p) + (
            f" {text(value)}" if value is not None else ""
        )
    kind, body = next(iter(predicate.items()))
    if isinstance(body, dict):
        return f"{kind} " + " ".join(text(v) for v in body.values())
    return f"{kind} {text(body)}"


def _branch_steps(branch: Any) -> list[dict[str, Any]]:
    """A branch's steps: the API answers a list (`yes`, `no`, a variant's `steps`)."""
    if isinstance(branch, list):
        return [s for s in branch if isinstance(s, dict)]
    if isinstance(branch, dict):
        return _branch_steps(branch.get("steps"))
    return []


def _add_steps(node: Tree, steps: Iterable[dict[str, Any]]) -> None:
    for step in steps:
        child = node.add(_step_label(step))
        kind, body = _step_kind(step)
        if kind == "condition":
            _add_steps(child.add("yes"), _branch_steps(body.get("yes")))
            _add_steps(child.add("no"), _branch_steps(body.get("no")))
        elif kind == "ab_test":
            for variant in body.get("variants") or []:
                label = f"variant {variant.get('name', '?')} ({variant.get('weight', '?')}%)"
                _add_steps(child.add(label), _branch_steps(variant.get("steps")))


def flow_tree(flow: Any) -> Tree:
    tree = Tree("flow")
    if isinstance(flow, dict):
        _add_steps(tree, flow.get("steps") or [])
    return tree


def campaign_detail(c: dict[str, Any]) -> RenderableType:
    rows = [
        ("id", c.get("id")),
        ("name", c.get("name")),
        ("state", c.get("state")),
        ("trigger", trigger_kind(c.get("trigger"))),
        ("segment", c.get("segment_id")),
        ("flow version", c.get("flow_version")),
        ("current run", c.get("current_run_id") or c.get("run_id")),
        ("created", c.get("created_at")),
        ("updated", c.get("updated_at")),
    ]
    if c.get("due_at"):
        rows.append(("due", c.get("due_at")))
    return Group(key_values(f"Campaign {text(c.get('name'))}", rows), flow_tree(c.get("flow")))


def sends_table(sends: Iterable[dict[str, Any]]) -> Table:
    table = Table(title="Sends", title_justify="left")
    for column in ("node", "channel", "provider", "message id", "status", "cost", "at"):
        table.add_column(column, no_wrap=column in ("node", "message id", "at"))
    for send in sends:
        table.add_row(
            text(send.get("node_id")),
            text(send.get("channel")),
            text(send.get("provider")),
            text(send.get("provider_message_id")),
            text(send.get("status")),
            money(send.get("cost_cents")),
            text(send.get("created_at")),
        )
    return table


def _counts(status: dict[str, Any]) -> dict[str, int]:
    counts = status.get("counts") or {}
    return {s: int(counts.get(s, 0) or 0) for s in EXECUTION_STATES}


def counts_line(status: dict[str, Any]) -> str:
    counts = _counts(status)
    total = sum(counts.values())
    parts = ", ".join(f"{s} {counts[s]:,}" for s in EXECUTION_STATES)
    return f"{text(status.get('state'))}: {parts} (of {total:,})"


def status_board(status: dict[str, Any]) -> Table:
    """One bar per execution state against the run's total."""
    counts = _counts(status)
    total = sum(counts.values())
    title = (
        f"Campaign {text(status.get('id'))}  {text(status.get('state'))}  run {text(status.get('run_id'))}"
        f"  sent {int(status.get('sent', 0) or 0):,}"
        f"  est. remaining {money(status.get('estimated_remaining_cost'))}"
    )
    table = Table(title=title, title_justify="left", show_header=True)
    table.add_column("executions", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("%", justify="right", no_wrap=True)
    for state in EXECUTION_STATES:
        n = counts[state]
        style = STATE_STYLES[state]
        bar = ProgressBar(
            total=max(total, 1), completed=n, width=40, complete_style=style, finished_style=style
        )
        share = f"{100 * n / total:.0f}" if total else "0"
        table.add_row(Text(state, style=style), bar, f"{n:,}", share)
    table.add_row(Text("total", style="bold"), "", f"{total:,}", "")
    return table
