"""`python -m services.sandbox`: run the carrier simulator until SIGTERM or SIGINT.

The socket is bound here rather than by uvicorn so that with port 0 the chosen port is known
before serving starts and can be handed to whoever started the process (log line and
SHOAL_SANDBOX_PORT_FILE). The port file means "bound"; `/healthz` answering means "ready".
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvicorn
import uvloop

from services.sandbox.app import create_app
from services.sandbox.config import SandboxSettings
from shoal import telemetry
from shoal.config import ConfigError
from shoal.http import QuietServer, bind

log = logging.getLogger("services.sandbox")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a reader polling for the file never sees it half written.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


async def serve(settings: SandboxSettings) -> int:
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return EXIT_STARTUP
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        lifespan="on",
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
    if settings.port_file is not None:
        write_port_file(settings.port_file, port)
    log.info("sandbox listening on http://%s:%d", settings.host, port, extra={"shoal_port": port})
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        if settings.port_file is not None:
            settings.port_file.unlink(missing_ok=True)
    if not server.started:
        log.error("sandbox failed to start")
        return EXIT_STARTUP
    log.info("sandbox stopped")
    return 0


def main() -> int:
    try:
        settings = SandboxSettings.load()
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_CONFIG
    telemetry.init(
        "sandbox",
        sample_ratio=settings.trace_sample_ratio,
        log_level=settings.log_level,
        log_json=settings.log_json,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
