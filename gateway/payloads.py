"""Free-form JSON the API accepts (trigger data, custom fields, event properties, preview data).

`JsonObject` bounds how deep such a value nests: a protobuf Struct refuses more than ~100 levels
when it is decoded, and a client sending that deserves a 400 naming the field, not a 5xx from a
service. `MAX_JSON_DEPTH` is far beyond what any template or rule reads.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

MAX_JSON_DEPTH = 32


def json_depth(value: Any) -> int:
    """How many objects/arrays deep `value` nests (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
