"""`python -m services.billing`: the billing service process."""

import gc
from typing import Any

from services.billing.config import BillingSettings
from services.billing.server import build
from shoal.config import ConfigError
from shoal.grpc import GrpcServer, run_service

# A hold batch is hundreds of items alive at once (request messages, tuples, answers, row
# parameters); with the default threshold (700) the collector ran several times per call and
# its full collections walked every start-up object (SQLAlchemy, protobuf descriptors, pydantic)
# again: a quarter of the GIL time of HoldBatch under bench/engine.py. A larger young generation
# and the start-up objects frozen out of the collector's view keep cycles collected, far less
# often (the segment and execution services do the same).
GC_THRESHOLDS = (50_000, 20, 100)


async def build_frozen(settings: Any) -> GrpcServer:
    server = await build(settings)
    gc.collect()
    gc.freeze()
    return server


if __name__ == "__main__":
    try:
        settings = BillingSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    gc.set_threshold(*GC_THRESHOLDS)
    run_service("billing", build_frozen, settings)
