"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer the SSE stream): body size limit and
request metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import error_response
from services.metrics import ApiMetrics

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, judged by Content-Length and by the bytes actually received.

    The body is read here (it is small by construction) and replayed to the app, so a request that lies
    about its length, or streams without one, is cut off at `max_bytes + 1` bytes and never reaches a route.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[Scope], None] | None = None,
                 path_limits: dict[str, tuple[int, str]] | None = None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject
        # Exact paths with their own (limit, setting name), e.g. the Batch API's file uploads.
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.path_limits.get(scope.get("path", ""), (self.max_bytes, "max_body_bytes"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await self._reject(scope, receive, send, max_bytes, setting)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > max_bytes:
                await self._reject(scope, receive, send, max_bytes, setting)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, max_bytes: int, setting: str) -> None:
        if self.on_reject is not None:
            self.on_reject(scope)
        response = error_response(413, "body_too_large",
                                  f"request body is over this server's limit of {max_bytes} bytes ({setting})")
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the client's disconnect, as usual

    return replayed


class RequestMetricsMiddleware:
    """Counts requests by route template (never the raw path: job ids must not become labels) and status,
    and observes the time to the response start."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "seconds": None}

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["seconds"] = time.perf_counter() - started
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            seconds = state["seconds"] if state["seconds"] is not None else time.perf_counter() - started
            self.metrics.observe_request(template, scope["method"], state["status"], seconds)
