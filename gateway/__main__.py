"""`python -m gateway`: the REST gateway process.

The socket is bound here, not by uvicorn, so that with port 0 the chosen port is known and
logged before serving starts. SIGTERM/SIGINT stop accepting, let in-flight requests finish
(bounded by SHOAL_SHUTDOWN_GRACE_SECONDS), run the lifespan shutdown (channels closed), exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvicorn

from gateway.app import create_app
from gateway.config import GatewaySettings
from shoal import telemetry
from shoal.config import ConfigError
from shoal.http import QuietServer, bind

log = logging.getLogger("gateway")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


async def serve(settings: GatewaySettings) -> int:
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return EXIT_STARTUP
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        lifespan="on",
        # The default asyncio loop, not uvloop: the gateway's work is grpc.aio calls, and grpc.aio
        # is tested and supported on the standard loop.
        loop="asyncio",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
    )
    server = QuietServer(config)

    def on_signal(signum: signal.Signals) -> None:
        if server.should_exit:
            log.warning("second %s, exiting without waiting", signum.name)
            server.force_exit = True
        else:
            log.info("%s received, shutting down", signum.name)
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("gateway listening on http://%s:%d", settings.host, port, extra={"shoal_port": port})
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        log.error("gateway failed to start")
        return EXIT_STARTUP
    log.info("gateway stopped")
    return 0


def main() -> int:
    try:
        settings = GatewaySettings.load()
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_CONFIG
    telemetry.init(
        "gateway",
        sample_ratio=settings.trace_sample_ratio,
        log_level=settings.log_level,
        log_json=settings.log_json,
    )
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
