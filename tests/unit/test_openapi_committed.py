"""docs/openapi.json is the served contract, byte for byte (regenerate with `make openapi`)."""

from __future__ import annotations

import json

from gateway.openapi import COMMITTED, render


def test_committed_openapi_matches_the_served_document() -> None:
    served = render()
    assert COMMITTED.exists(), "docs/openapi.json is missing: run `make openapi`"
    committed = COMMITTED.read_text(encoding="utf-8")
    if committed != served:
        old, new = json.loads(committed), json.loads(served)
        changed = sorted(set(old.get("paths", {})) ^ set(new.get("paths", {})))
        raise AssertionError(
            "docs/openapi.json differs from what the gateway serves; run `make openapi` and commit it"
            + (f" (paths added or removed: {changed})" if changed else "")
        )
    assert json.loads(served)["openapi"].startswith("3.")
