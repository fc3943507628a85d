"""The service's front door: what is refused before a request body is read.

FastAPI parses a JSON body before any dependency (the token check included) runs, so an
unauthenticated client could make the server read and parse a body of any size. This ASGI
middleware runs first:

- every path except the open ones (health, the OpenAPI spec and docs) needs a valid bearer
  token, checked from the headers alone: a bad or missing token is answered 401 at once and
  no body byte is read;
- a body larger than its cap is refused: at once with 413 when Content-Length says so, else as
  soon as the bytes read pass the cap (JSON bodies: `max_json_bytes`; adapter uploads:
  `max_upload_bytes`, which the upload handler also enforces while streaming to disk);
- a body that stalls (no bytes for `body_timeout` seconds) ends the request with 408.

Connections are bounded by uvicorn (`limit_concurrency`: 503 past it) and idle keep-alive
connections are closed after a few seconds (see offsite.service.server).
"""

from __future__ import annotations

import asyncio
import json

OPEN_PATHS = ("/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
UPLOAD_PATH = "/v1/uploads"


class BodyRefused(Exception):
    """Raised from `receive` into the app: the body passed its cap or stalled."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Guard:
    def __init__(self, app, authenticate, max_json_bytes: int, max_upload_bytes: int, body_timeout: float):
        self.app, self.authenticate = app, authenticate
        self.max_json_bytes, self.max_upload_bytes, self.body_timeout = max_json_bytes, max_upload_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path not in OPEN_PATHS and not self._authorised(headers.get("authorization", "")):
            return await _answer(send, 401, "missing or invalid API token (send Authorization: Bearer TOKEN from offsite serve-token)",
                                 [(b"www-authenticate", b"Bearer")])
        cap = self.max_upload_bytes if (method == "POST" and path == UPLOAD_PATH) else self.max_json_bytes
        declared = headers.get("content-length", "")
        if declared:
            if not declared.isdigit() or len(declared) > 20:
                return await _answer(send, 400, "Content-Length is not a number")
            if int(declared) > cap:
                return await _answer(send, 413, f"request body of {declared} bytes is larger than the limit of {cap} bytes")
        if path != UPLOAD_PATH:
            # FastAPI turns any error while it reads a body into a 400, so JSON bodies are read here,
            # under the cap and the timeout, and handed on whole.
            chunks, seen = [], 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    return await _answer(send, 408, f"request body stalled (nothing received for {self.body_timeout:g} s)",
                                         [(b"connection", b"close")])
                if message["type"] != "http.request":
                    return  # the client went away
                seen += len(message.get("body", b""))
                if seen > cap:
                    return await _answer(send, 413, f"request body is larger than the limit of {cap} bytes", [(b"connection", b"close")])
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return whole
                return await receive()

            return await self.app(scope, replay, send)

        # Uploads stream to disk in the handler: the same cap and timeout, raised into it.
        seen = 0

        async def guarded_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"request body stalled (nothing received for {self.body_timeout:g} s)") from None
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BodyRefused(413, f"request body is larger than the limit of {cap} bytes")
            return message

        await self.app(scope, guarded_receive, send)

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > 4096:
            return False
        return self.authenticate(token.strip()) is not None


async def _answer(send, status: int, detail: str, extra_headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
