"""Test helpers: bounded polling and span trees."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that value.

    Raises AssertionError naming the predicate (and `message`, evaluated at the end if callable)
    when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            detail = message() if callable(message) else message
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout}s (last value {last!r}) {detail}")
        await asyncio.sleep(interval)


def span_tree(spans: Iterable[ReadableSpan], *, trace_id: int | None = None) -> str:
    """An indented tree of `name [KIND]` lines (children in start order), for asserting shapes."""
    selected = [s for s in spans if trace_id is None or (s.context and s.context.trace_id == trace_id)]
    ids = {s.context.span_id for s in selected if s.context}
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in selected:
        parent = s.parent.span_id if s.parent and s.parent.span_id in ids else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_time or 0):
            lines.append(f"{'    ' * depth}{s.name} [{s.kind.name}]")
            walk(s.context.span_id if s.context else None, depth + 1)

    walk(None, 0)
    return "\n".join(lines)
