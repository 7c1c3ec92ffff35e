"""Generate the protobuf/gRPC code under libs/shoal/v1 from protos/ (`make protos`).

The generated modules are not committed: `make install` produces them, so they always match the
pinned grpcio-tools and the .proto files of the checkout.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "libs"


def main() -> int:
    from grpc_tools import protoc  # dev dependency: only needed to generate

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "shoal" / "v1").glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)  # noqa: T201
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
