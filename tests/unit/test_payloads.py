from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.payloads import MAX_JSON_DEPTH, JsonObject, json_depth


class Body(BaseModel):
    data: JsonObject | None = None


def nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return dict(value)


def test_depth_counts_objects_and_arrays() -> None:
    assert json_depth(1) == 0
    assert json_depth({}) == 1
    assert json_depth({"a": [1, {"b": []}]}) == 4
    assert json_depth(nested(5000)) == 5000  # no recursion limit hit


def test_json_objects_are_bounded_with_the_field_named() -> None:
    assert Body(data=nested(MAX_JSON_DEPTH)).data is not None
    with pytest.raises(ValidationError) as caught:
        Body(data=nested(MAX_JSON_DEPTH + 1))
    error = caught.value.errors()[0]
    assert error["loc"] == ("data",)
    assert f"{MAX_JSON_DEPTH} levels" in error["msg"]
