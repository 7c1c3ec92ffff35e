"""Channel providers: who actually delivers a message, behind one batch interface.

Workers call `Provider.send_batch` and `Provider.rcs_capable`; a whole-call failure raises
`ProviderUnavailable`, which the circuit breaker counts. Per-item outcomes come back as
`SendResult`s in input order.
"""

from services.execution.providers.base import (
    Channel,
    OutboundMessage,
    Provider,
    ProviderError,
    ProviderRequestError,
    ProviderUnavailable,
    SendResult,
    SendStatus,
)
from services.execution.providers.registry import build_providers, close_providers, default_provider_for
from services.execution.providers.sandbox import SandboxProvider, verify_signature

__all__ = [
    "Channel",
    "OutboundMessage",
    "Provider",
    "ProviderError",
    "ProviderRequestError",
    "ProviderUnavailable",
    "SandboxProvider",
    "SendResult",
    "SendStatus",
    "build_providers",
    "close_providers",
    "default_provider_for",
    "verify_signature",
]
