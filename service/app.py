"""The FastAPI application: `create_app` builds settings, models, indexes, session store and
batcher in its lifespan, and maps domain errors to HTTP in one place.

Run it with `uvicorn --factory service.app:create_app` or `xmr serve`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.api import reload_bundle, router
from service.batcher import Batcher
from service.bundle import Registry, load_bundle, settle_heap, uses_torch
from service.index import set_search_threads
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.sessions import create_session_store
from service.settings import LOG_FORMAT, Settings

logger = logging.getLogger(__name__)

# The one place where domain errors become HTTP statuses (most specific class first).
STATUS: list[tuple[type[errors.ServiceError], int]] = [
    (errors.UnknownMarketError, 404),
    (errors.SessionNotFoundError, 404),
    (errors.AdminDisabledError, 404),
    (errors.ForbiddenError, 403),
    (errors.InvalidRequestError, 422),
    (errors.SessionStoreUnavailableError, 503),
    (errors.NotReadyError, 503),
    (errors.ReloadError, 500),
]


MAX_REPORTED_ERRORS = 20  # validation problems named in one 422


def status_of(error: errors.ServiceError) -> int:
    return next((status for cls, status in STATUS if isinstance(error, cls)), 500)


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    body = {"error": exc.code, "message": exc.message, **exc.details}
    return JSONResponse(jsonable_encoder(body), status_code=status_of(exc))


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors_ = exc.errors()
    # Only where and what, for the first few: echoing `input` back would repeat a hostile body
    # (raw bytes that are not UTF-8 cannot even be encoded), and a body of thousands of wrong
    # values must not be answered with thousands of messages.
    detail = [{"type": str(e.get("type", "")), "loc": [str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg", "invalid"))} for e in errors_[:MAX_REPORTED_ERRORS]]
    problems = [f"{'.'.join(d['loc'])}: {d['msg']}" for d in detail]
    if len(errors_) > MAX_REPORTED_ERRORS:
        problems.append(f"and {len(errors_) - MAX_REPORTED_ERRORS} more")
    body = {"error": "invalid_request", "message": "; ".join(problems) or "invalid request",
            "detail": detail}
    return JSONResponse(body, status_code=422)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        message = f"request body is not UTF-8 JSON ({exc.__cause__.reason})"
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        message = "request body is JSON nested too deeply"
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    return JSONResponse({"error": code, "message": message},
                        status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Methods of every route whose path matches the request's."""
    methods = {method for route in router.routes
               if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
               for method in route.methods or ()}
    return sorted(methods)


def document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the configured limits (k, ids per request) into the OpenAPI schema, so a client
    (or a schema fuzzer) knows a body over them is invalid rather than finding out by a 422."""
    bodies = schema["components"]["schemas"]
    recommend = bodies["RecommendRequest"]["properties"]
    recommend["k"]["maximum"] = settings.max_k
    for spec in (recommend["items"], *recommend["candidates"].get("anyOf", []),
                 bodies["EventsRequest"]["properties"]["items"]):
        if spec.get("type") == "array":
            spec["maxItems"] = settings.max_request_items
    return schema


def _install_sighup(app: FastAPI, tasks: set[asyncio.Task[object]]) -> bool:
    """SIGHUP reloads; only possible when the loop runs in the main thread (uvicorn, xmr serve)."""

    def on_sighup() -> None:
        async def run() -> None:
            try:
                await reload_bundle(app.state.registry, app.state.metrics)
            except errors.ServiceError as e:
                logger.error("SIGHUP reload failed: %s", e.message)

        task = asyncio.ensure_future(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        logger.info("SIGHUP reload not installed (loop not in the main thread)")
        return False
    return True


def configure_logging(level: str) -> None:
    """Log as `xmr` does where the host set up no handler: under `uvicorn --factory` only
    uvicorn's own loggers are configured, and the service's INFO lines would be dropped."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def create_app(settings: Settings | None = None, on_ready: Callable[[], None] | None = None,
               reload_peers: Callable[[], None] | None = None) -> FastAPI:
    """The app. `on_ready` runs once the models are loaded and SIGHUP is handled;
    `reload_peers` after each successful admin reload (`service.workers` passes both)."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if uses_torch(settings.device, settings.search, settings.encoder):
            import torch

            torch.set_num_threads(settings.threads)
        set_search_threads(settings.threads)
        load = partial(load_bundle, settings.artifacts, settings.markets, settings.search,
                       settings.device, settings.encoder, settings.threads)
        bundle = await anyio.to_thread.run_sync(load)
        settle_heap()
        app.state.registry = Registry(load, bundle)
        metrics.set_models((m.market, m.model_version, m.index_version)
                           for m in bundle.markets.values())
        app.state.store = create_session_store(
            settings.redis_url, settings.redis_pool_size, settings.redis_timeout_s,
            settings.session_ttl_s, settings.session_max_items,
        )
        on_gpu = any(m.device != "cpu" for m in bundle.markets.values())
        in_thread = settings.batch_in == "thread" or (settings.batch_in == "auto" and on_gpu)
        app.state.batcher = Batcher(settings.batch_max, settings.batch_wait_ms / 1000,
                                    metrics.batch_size.observe,
                                    partial(set_search_threads, settings.threads), in_thread,
                                    settings.batch_join_ms / 1000)
        tasks: set[asyncio.Task[object]] = set()
        sighup = settings.reload_on_sighup and _install_sighup(app, tasks)
        logger.info("serving markets=%s store=%s search=%s device=%s",
                    ",".join(sorted(bundle.markets)), app.state.store.kind, settings.search,
                    settings.device)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await app.state.batcher.close()
            await app.state.store.close()

    app = FastAPI(
        title="xmr: cross-market recommendations",
        description="Bert4XMR session recommendations per market. `GET /noop` and "
                    "`POST /markets/{market}/noop` are the load benchmark's baselines.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.reload_peers = reload_peers

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.metrics = metrics
    app.include_router(router)
    app.add_exception_handler(errors.ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees 413s too
    return app
