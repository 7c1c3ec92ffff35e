"""`python -m services.segment`: the segment service process."""

from services.segment.config import SegmentSettings
from services.segment.server import build
from shoal.config import ConfigError
from shoal.grpc import run_service

if __name__ == "__main__":
    try:
        settings = SegmentSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    run_service("segment", build, settings)
