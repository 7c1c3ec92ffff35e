"""A cap on request bodies, before any route reads them: 413 in the error shape.

A declared `Content-Length` over the cap is refused before a byte is read; a chunked body is
counted as it arrives and refused (an HTTPException from `receive`, which FastAPI's body
parsing lets through to the error handlers) once it passes the cap. Provider callbacks have
their own, larger cap (`callback_max_bytes`), and so does the bulk contact import
(`import_max_bytes`: 10,000 contacts with consents are ~5 MB); every other route gets
`max_body_bytes`.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ErrorBody

CALLBACK_PREFIX = "/v1/providers/"
IMPORT_PATH = "/v1/contacts/import"


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the body is larger than {limit} bytes")


class BodyLimit:
    def __init__(
        self, app: ASGIApp, *, max_bytes: int, callback_max_bytes: int, import_max_bytes: int
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.callback_max_bytes = callback_max_bytes
        self.import_max_bytes = import_max_bytes

    def limit_of(self, path: str) -> int:
        if path.startswith(CALLBACK_PREFIX):
            return self.callback_max_bytes
        if path == IMPORT_PATH:
            return self.import_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        limit = self.limit_of(path)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            body = ErrorBody(error="payload_too_large", message=str(too_large(limit).detail))
            payload = body.model_dump_json().encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counted, send)
