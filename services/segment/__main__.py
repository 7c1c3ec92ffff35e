"""`python -m services.segment`: the segment service process."""

import gc
from typing import Any

from services.segment.config import SegmentSettings
from services.segment.server import build
from shoal.config import ConfigError
from shoal.grpc import GrpcServer, run_service

# An import call holds 10,000 contacts as messages, validated inputs and row tuples at once;
# with the default threshold (700) the collector ran ~200 times per call and its older
# generations walked all of them again and again: ~20 % of the import's CPU (bench/segments.py).
# A larger young generation, and the start-up objects frozen out of the collector's view, keep
# cycles collected, far less often (the execution service does the same).
GC_THRESHOLDS = (50_000, 20, 100)


async def build_frozen(settings: Any) -> GrpcServer:
    server = await build(settings)
    gc.collect()
    gc.freeze()
    return server


if __name__ == "__main__":
    try:
        settings = SegmentSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    gc.set_threshold(*GC_THRESHOLDS)
    run_service("segment", build_frozen, settings)
