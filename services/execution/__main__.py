"""`python -m services.execution`: the execution service process (API, workers, timers).

`--worker` runs step workers only: the service starts `SHOAL_EXECUTION_PROCESSES - 1` of these
itself (server.WorkerProcesses); they are not meant to be started by hand.
"""

import asyncio
import gc
import sys
from typing import Any

import uvloop

from services.execution.config import ExecutionSettings
from services.execution.server import build, run_worker_process
from shoal import telemetry
from shoal.config import ConfigError
from shoal.grpc import GrpcServer, run_service

# The workers allocate a great many short-lived objects per batch (messages, rows, futures);
# with the default threshold (700) the collector ran thousands of times per run and its full
# collections walked every long-lived object (modules, protobuf descriptors, SQLAlchemy
# metadata): ~10 % of the process's CPU under bench/engine.py. A larger young generation and the
# start-up objects frozen out of the collector's view keep cycles collected, far less often.
GC_THRESHOLDS = (50_000, 20, 100)


def _freeze() -> None:
    gc.collect()
    gc.freeze()


async def build_frozen(settings: Any) -> GrpcServer:
    server = await build(settings)
    _freeze()
    return server


def run_worker(settings: ExecutionSettings) -> None:
    telemetry.init(
        "execution",
        sample_ratio=settings.trace_sample_ratio,
        log_level=settings.log_level,
        log_json=settings.log_json,
    )
    asyncio.run(run_worker_process(settings, ready=_freeze))


if __name__ == "__main__":
    try:
        settings = ExecutionSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    gc.set_threshold(*GC_THRESHOLDS)
    # uvloop speeds up the NATS side of the workers (LIMITS.md: +15-50%).
    uvloop.install()
    if "--worker" in sys.argv[1:]:
        run_worker(settings)
    else:
        run_service("execution", build_frozen, settings)
