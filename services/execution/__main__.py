"""`python -m services.execution`: the execution service process (API, workers, timers)."""

import uvloop

from services.execution.config import ExecutionSettings
from services.execution.server import build
from shoal.config import ConfigError
from shoal.grpc import run_service

if __name__ == "__main__":
    try:
        settings = ExecutionSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    # uvloop speeds up the NATS side of the workers (LIMITS.md: +15-50%).
    uvloop.install()
    run_service("execution", build, settings)
