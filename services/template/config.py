"""Template settings (SHOAL_TEMPLATE_*)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from shoal.config import ServiceSettings

DEFAULT_UNSUBSCRIBE_URL = "http://127.0.0.1:8080/v1/unsubscribe/{{contact.id}}"


class TemplateSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_TEMPLATE_", extra="ignore", frozen=True)

    port: int = Field(default=50052, ge=0, le=65535)
    # How the RCS provider answers an approval request: the sandbox approves by default; `manual`
    # leaves versions PENDING_APPROVAL until an operator publishes or rejects them.
    rcs_approval: Literal["approve", "reject", "manual"] = "approve"
    # Put in the List-Unsubscribe header of NEWSLETTER emails; `{{contact.id}}` is replaced by the
    # recipient's contact id (URL-quoted).
    unsubscribe_url: str = Field(default=DEFAULT_UNSUBSCRIBE_URL, min_length=1)
    # Compiled published versions kept in memory (they are immutable, so never stale).
    render_cache_size: int = Field(default=1024, ge=1, le=1_000_000)
    # One RenderBatch call renders at most this many recipients.
    max_batch_size: int = Field(default=10_000, ge=1, le=100_000)

    @field_validator("unsubscribe_url")
    @classmethod
    def _check_unsubscribe_url(cls, value: str) -> str:
        # Imported here: render.py is pure and must not depend on settings.
        from services.template.render import TemplateSyntaxError, parse

        try:
            parts = parse(value)
        except TemplateSyntaxError as exc:
            raise ValueError(str(exc)) from None
        names = {p.name for p in parts if not isinstance(p, str)}
        if names - {"contact.id"}:
            raise ValueError("only {{contact.id}} may be referenced")
        if not value.startswith(("https://", "http://", "mailto:")):
            raise ValueError("must be an http(s) or mailto URL")
        return value
