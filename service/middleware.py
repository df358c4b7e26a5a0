"""ASGI middleware of the app: the request-size limit (413) and per-route request metrics."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

BODY_METHODS = {"POST", "PUT", "PATCH"}


async def _send_json(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for bodies over `max_bytes`: by Content-Length, else by counting streamed bytes.

    Bodies are small JSON, so the counted body is buffered and replayed to the app; the app then
    never sees a half-read body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await _send_json(send, 400, {"error": "invalid_request",
                                         "message": "invalid Content-Length header"})
            return
        if length is not None and int(length) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        await _send_json(send, 413, {
            "error": "body_too_large",
            "message": f"request body over the limit of {self.max_bytes} bytes",
        })


class RequestMetrics:
    """Latency, count and errors per route template and market (unknown markets pooled)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            market = scope.get("path_params", {}).get("market", "")
            registry = getattr(scope["app"].state, "registry", None) if "app" in scope else None
            if market and (registry is None or market not in registry.current.markets):
                market = "unknown"
            self.metrics.observe_request(template, scope["method"], market, status,
                                         time.perf_counter() - started)
