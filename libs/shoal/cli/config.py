"""Where the API is and how to talk to it: flags first, then the environment, then defaults."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_JAEGER_URL = "http://localhost:16686"
ENV_API_URL = "SHOAL_API_URL"
ENV_API_KEY = "SHOAL_API_KEY"
ENV_OUTPUT = "SHOAL_OUTPUT"
ENV_JAEGER_URL = "SHOAL_JAEGER_URL"
DEFAULT_TIMEOUT = 30.0


class Output(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class Settings:
    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
    output: Output = Output.TEXT
    timeout: float = DEFAULT_TIMEOUT

    @property
    def json(self) -> bool:
        return self.output is Output.JSON


def jaeger_url() -> str | None:
    """The Jaeger UI base URL; SHOAL_JAEGER_URL set to an empty string turns links off."""
    value = os.environ.get(ENV_JAEGER_URL)
    if value is None:
        return DEFAULT_JAEGER_URL
    return value.strip().rstrip("/") or None
