"""ASGI middleware (body size limit, request metrics) and the bearer-key check."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .metrics import Metrics

# Past the limit, the rest of the body is read and dropped (up to this much) before answering 413,
# so that the client sees the answer rather than a reset connection.
DRAIN_BYTES = 16 * 2**20


class BodyLimit:
    """Buffers the request body; answers 413 when it is larger than `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            drainable = declared.isdigit() and int(declared) <= self.limit + DRAIN_BYTES
            await self._reject(scope, receive, send, drain=drainable)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                await self._reject(scope, receive, send, drain=more)
                return
            chunks.append(chunk)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, *, drain: bool) -> None:
        dropped = 0
        while drain and dropped < DRAIN_BYTES:
            message = await receive()
            dropped += len(message.get("body", b""))
            drain = message["type"] == "http.request" and message.get("more_body", False)
        response = error_response(413, "payload_too_large",
                                  f"the request body is larger than the limit of {self.limit} bytes")
        await response(scope, receive, send)


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, answered = time.perf_counter(), 500, False

        async def send_status(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
            if not answered:  # the client left first (nginx's 499), not a server error
                status = 499
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(scope["method"], route, status, time.perf_counter() - started)


def key_checker(keys: list[str], on_key: Callable[[str], None] = lambda key: None,
                public: frozenset[str] = frozenset()) -> Callable[[Request], Awaitable[None]]:
    """A dependency that needs `Authorization: Bearer <key>` with one of `keys` (none: open) on every
    path but `public` ones. A valid key is kept as `request.state.api_key` and passed to `on_key`
    (the per-key rate limit)."""
    wanted = [k.encode() for k in keys]

    async def check(request: Request) -> None:
        if not wanted or request.url.path in public:
            return
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise ApiError(401, "unauthorized", "this route needs an API key: send 'Authorization: Bearer <key>'",
                           challenge)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "malformed Authorization header; use 'Bearer <key>'", challenge)
        given = token.strip().encode("utf-8", "replace")
        if not any(secrets.compare_digest(given, k) for k in wanted):
            raise ApiError(403, "forbidden", "the API key is not valid")
        request.state.api_key = token.strip()
        on_key(request.state.api_key)

    return check

