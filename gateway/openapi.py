"""Write the gateway's OpenAPI document: `python -m gateway.openapi [PATH]` (`make openapi`).

The committed copy, docs/openapi.json, is what clients and reviewers read; a test fails when it
differs from what the code serves, the way generated code is checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.config import GatewaySettings

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The OpenAPI document the app serves at /openapi.json (no backend is contacted)."""
    schema: dict[str, Any] = create_app(GatewaySettings.load()).openapi()
    # The package version changes with every release; the contract does not.
    schema["info"]["version"] = "v1"
    return schema


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else COMMITTED
    target.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {target}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
