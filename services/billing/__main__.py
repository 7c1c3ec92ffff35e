"""`python -m services.billing`: the billing service process."""

from services.billing.config import BillingSettings
from services.billing.server import build
from shoal.config import ConfigError
from shoal.grpc import run_service

if __name__ == "__main__":
    try:
        settings = BillingSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    run_service("billing", build, settings)
