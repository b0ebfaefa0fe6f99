"""The ASGI layer in front of the routes: API key, body-size limit, request counting.

Pure ASGI rather than Starlette middleware so that a refused request is answered before its body
is read (an unauthenticated or oversized upload costs nothing) and streaming responses pass
through untouched.
"""
from __future__ import annotations

import hmac
import json
from typing import Callable

from .errors import error_body

PUBLIC = {"/health"}  # answers without the API key: liveness probes carry no secrets
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    def __init__(self, app, api_key: str | None, max_body: int,
                 count: Callable[[str, int], None] | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.count = count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES or path.startswith("/v1/models/") else "other"
        status = [0]

        async def counted_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self._handle(scope, receive, counted_send, path)
        finally:
            if self.count and status[0]:
                self.count(route, status[0])

    async def _handle(self, scope, receive, send, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and path not in PUBLIC:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await _send_json(send, 401, error_body(401, "a valid API key is required: "
                                                              "Authorization: Bearer <key>", "invalid_api_key"),
                                        [(b"www-authenticate", b"Bearer")])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return await _send_json(send, 400, error_body(400, "invalid Content-Length", "invalid_request"))
            if n > self.max_body:
                return await _send_json(send, 413, self._too_large())
        # read the body here (chunked uploads have no Content-Length), then replay it to the app
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await _send_json(send, 413, self._too_large())
            chunks.append(body)
            more = msg.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> dict:
        return error_body(413, f"the request body is larger than {self.max_body} bytes", "request_too_large")
