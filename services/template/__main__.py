"""`python -m services.template`: the template service process."""

from services.template.config import TemplateSettings
from services.template.server import build
from shoal.config import ConfigError
from shoal.grpc import run_service

if __name__ == "__main__":
    try:
        settings = TemplateSettings.load()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    run_service("template", build, settings)
