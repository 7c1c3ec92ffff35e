"""`python -m services.campaign`: the campaign service process."""

from services.campaign.config import CampaignSettings
from services.campaign.server import build
from shoal.config import ConfigError
from shoal.grpc import run_service

if __name__ == "__main__":
    try:
        settings = CampaignSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    run_service("campaign", build, settings)
