"""The REST gateway over the real mesh: every service in-process, the gateway on a real socket.

`rest_mesh` yields the mesh and a `Rest` (the app and an httpx client on its port); `Rest.key` mints
an API key with the given scopes. The sandbox carrier posts its receipts to the gateway's signed
callback route, so receipts travel the real path.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.keys import create_key
from shoal.http import QuietServer, bind
from tests.helpers import wait_for
from tests.mesh import Mesh, mesh
from tests.secrets_scan import watch

SECRET = watch(secrets.token_urlsafe(32))


@dataclass
class Rest:
    app: Any
    client: httpx.AsyncClient

    async def key(self, workspace: str, *scopes: str) -> dict[str, str]:
        created = await self.app.state.auth.db.run(
            create_key, workspace_id=workspace, scopes=list(scopes or ("admin",))
        )
        return {"Authorization": f"Bearer {created.key}"}


@contextlib.asynccontextmanager
async def rest_mesh(nats_url: str, tmp_path: Path, **gateway: Any) -> AsyncIterator[tuple[Mesh, Rest]]:
    """The mesh and the gateway in front of it; `gateway` overrides GatewaySettings fields."""
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sandbox_env = {
        "SHOAL_SANDBOX_CALLBACK_URL": f"{base}/v1/providers/sandbox/events",
        "SHOAL_SANDBOX_CALLBACK_SECRET": SECRET,
        "SHOAL_SANDBOX_OPEN_RATE": "1",
        "SHOAL_SANDBOX_CLICK_RATE": "0",
        "SHOAL_SANDBOX_RECEIPT_FLUSH_MS": "20",
    }
    try:
        async with mesh(nats_url=nats_url, tmp_path=tmp_path, sandbox_env=sandbox_env) as m:
            settings = GatewaySettings.load(
                campaign_addr=m.address("campaign"),
                execution_addr=m.address("execution"),
                segment_addr=m.address("segment"),
                template_addr=m.address("template"),
                billing_addr=m.address("billing"),
                nats_url=nats_url,
                namespace=m.namespace,
                data_dir=tmp_path / "gateway",
                sandbox_callback_secret=SECRET,
                log_json=False,
                **gateway,
            )
            app = create_app(settings)
            server = QuietServer(uvicorn.Config(app, log_config=None, lifespan="on", loop="asyncio"))
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            try:
                await wait_for(lambda: server.started, timeout=10)
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                    yield m, Rest(app, client)
            finally:
                server.should_exit = True
                await asyncio.wait_for(serving, timeout=10)
    finally:
        sock.close()
