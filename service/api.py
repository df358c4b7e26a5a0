"""HTTP routes. Thin: validate, read the bundle once, fetch the session, hand the work to the
batcher, shape the response. Errors are raised as domain errors.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Path, Request, Response

from service.batcher import Batcher
from service.bundle import Bundle, MarketModel, Registry
from service.errors import (
    AdminDisabledError,
    ForbiddenError,
    InvalidRequestError,
    NotReadyError,
    ServiceError,
)
from service.metrics import Metrics
from service.recommender import Query, Recommendation, recommend_many
from service.schemas import (
    MARKET_PATTERN,
    SESSION_ID_PATTERN,
    ErrorResponse,
    EventsRequest,
    MarketInfo,
    MarketsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    SessionResponse,
    StatusResponse,
)
from service.sessions import SessionStore
from service.settings import Settings

router = APIRouter()


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def get_bundle(request: Request) -> Bundle:
    """The bundle of this request: read once, so the request never mixes versions."""
    return request.app.state.registry.current  # type: ignore[no-any-return]


async def get_store(request: Request) -> SessionStore:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


# The dependencies are `async def` so FastAPI runs them on the event loop: a plain `def` would
# cost a thread-pool round trip each (measured: ~27% of a busy server's samples).
SettingsDep = Annotated[Settings, Depends(get_settings)]
BundleDep = Annotated[Bundle, Depends(get_bundle)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
StoreDep = Annotated[SessionStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
MarketPath = Annotated[str, Path(pattern=MARKET_PATTERN, description="Market code, e.g. de.")]
SessionPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN)]

ERROR_DESCRIPTIONS = {
    400: "Body that is not UTF-8 JSON, or a malformed Content-Length.",
    403: "Missing or wrong admin token.",
    404: "Unknown market (the known ones are listed), unknown session, or admin disabled.",
    413: "Body over XMR_MAX_BODY_BYTES.",
    422: "Invalid body or path, or a limit (XMR_MAX_K, XMR_MAX_REQUEST_ITEMS) exceeded.",
    500: "Reload failed; the previous models and indexes keep serving.",
    503: "Session store (Redis) unavailable, or not ready.",
}


def errors_of(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI declarations of the error statuses a route can answer (all as ErrorResponse)."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
            for code in codes}


BODY_ERRORS = (400, 404, 413, 422)  # a POST with a JSON body and a market in the path
ERRORS = errors_of(*BODY_ERRORS, 503)
SESSION_ERRORS = errors_of(404, 422, 503)


def check_limits(body: RecommendRequest, settings: Settings) -> None:
    if body.k > settings.max_k:
        raise InvalidRequestError(f"k={body.k} is above the maximum of {settings.max_k}",
                                  max_k=settings.max_k)
    for name, items in (("items", body.items), ("candidates", body.candidates or [])):
        if len(items) > settings.max_request_items:
            raise InvalidRequestError(
                f"{name} holds {len(items)} ids, more than the maximum of "
                f"{settings.max_request_items}", max_request_items=settings.max_request_items,
            )


def market_info(model: MarketModel) -> MarketInfo:
    index = model.index
    return MarketInfo(market=model.market, model_version=model.model_version,
                      index_version=model.index_version, n_items=model.n_items,
                      search=index.search.kind, index=index.manifest.kind,
                      index_params=index.manifest.params, exact=index.exact,
                      recall_at_10=None if index.exact else index.manifest.recall_at_10,
                      encoder=model.encoder.kind, device=str(model.device),
                      ranking=model.ranking)


def to_response(market: str, rec: Recommendation) -> RecommendResponse:
    return RecommendResponse(
        market=market, items=[ScoredItem(item_id=i, score=s) for i, s in rec.items],
        unknown_items=rec.unknown_items, fallback=rec.fallback,  # type: ignore[arg-type]
        model_version=rec.model_version, index_version=rec.index_version,
    )


@dataclass(frozen=True)
class RecommendContext:
    """Everything the recommend route reads from the app, as one dependency: FastAPI's work per
    dependency, on the event loop, was a fifth of a busy server's samples with six of them."""

    settings: Settings
    bundle: Bundle  # read once, so the request never mixes versions
    store: SessionStore
    batcher: Batcher
    metrics: Metrics


async def get_recommend_context(request: Request) -> RecommendContext:
    state = request.app.state
    return RecommendContext(state.settings, state.registry.current, state.store, state.batcher,
                            state.metrics)


@router.post("/markets/{market}/recommend", response_model=RecommendResponse, responses=ERRORS,
             tags=["recommend"])
async def recommend(
    market: MarketPath, body: RecommendRequest,
    context: Annotated[RecommendContext, Depends(get_recommend_context)],
) -> RecommendResponse:
    """Top-k items of the market for a session by inner product over the market's items: exact,
    or from an approximate index where one was built (`GET /markets` says which)."""
    check_limits(body, context.settings)
    model = context.bundle.market(market)
    items = body.items
    if body.session_id is not None:
        with context.batcher.pending():  # submitted below with no await in between
            items = await context.store.append(market, body.session_id, body.items)
    query = Query(items, body.k, body.exclude_seen, body.candidates)
    rec = await context.batcher.submit(model, query)
    if rec.rerank_seconds is not None:
        context.metrics.rerank.labels(market).observe(rec.rerank_seconds)
    if rec.fallback is not None:
        context.metrics.fallbacks.labels(market, rec.fallback).inc()
    if rec.unknown_items:
        context.metrics.unknown_items.labels(market).inc(len(rec.unknown_items))
    return to_response(market, rec)


@router.post("/markets/{market}/noop", response_model=StatusResponse,
             responses=errors_of(*BODY_ERRORS), tags=["benchmark"])
async def market_noop(market: MarketPath, body: RecommendRequest, bundle: BundleDep,
                      settings: SettingsDep) -> StatusResponse:
    """Benchmark baseline: the recommend route's middleware, body parsing and market lookup,
    without the session store, the model or the index."""
    check_limits(body, settings)
    bundle.market(market)
    return StatusResponse(status="ok")


@router.get("/noop", response_model=StatusResponse, tags=["benchmark"])
async def noop() -> StatusResponse:
    """Benchmark baseline: the cheapest route through the same middleware."""
    return StatusResponse(status="ok")


@router.post("/markets/{market}/sessions/{session_id}/events", response_model=SessionResponse,
             responses=ERRORS, tags=["sessions"])
async def append_events(market: MarketPath, session_id: SessionPath, body: EventsRequest,
                        bundle: BundleDep, settings: SettingsDep,
                        store: StoreDep) -> SessionResponse:
    """Append item ids to the session (capped, TTL refreshed); returns the whole session."""
    bundle.market(market)
    if len(body.items) > settings.max_request_items:
        raise InvalidRequestError(f"items holds {len(body.items)} ids, more than the maximum "
                                  f"of {settings.max_request_items}")
    items = await store.append(market, session_id, body.items)
    return SessionResponse(market=market, session_id=session_id, items=items)


@router.get("/markets/{market}/sessions/{session_id}", response_model=SessionResponse,
            responses=SESSION_ERRORS, tags=["sessions"])
async def get_session(market: MarketPath, session_id: SessionPath, bundle: BundleDep,
                      store: StoreDep) -> SessionResponse:
    bundle.market(market)
    items = await store.get(market, session_id)
    return SessionResponse(market=market, session_id=session_id, items=items)


@router.delete("/markets/{market}/sessions/{session_id}", status_code=204,
               responses=SESSION_ERRORS,
               tags=["sessions"])
async def delete_session(market: MarketPath, session_id: SessionPath, bundle: BundleDep,
                         store: StoreDep) -> Response:
    """Idempotent: 204 whether or not the session existed."""
    bundle.market(market)
    await store.delete(market, session_id)
    return Response(status_code=204)


@router.get("/markets", response_model=MarketsResponse, tags=["operations"])
async def list_markets(bundle: BundleDep) -> MarketsResponse:
    return MarketsResponse(markets=[market_info(m) for _, m in sorted(bundle.markets.items())],
                           loaded_at=bundle.loaded_at, worker=os.getpid())


@router.get("/healthz", response_model=StatusResponse, tags=["operations"])
async def healthz() -> StatusResponse:
    """Alive: the process answers."""
    return StatusResponse(status="ok")


def _probe(bundle: Bundle) -> None:
    """One real recommendation per market: model, index and vocabulary all usable."""
    for model in bundle.markets.values():
        item_id = model.popular[0][0]
        recommend_many(model, [Query([item_id], 1)])


@router.get("/readyz", response_model=StatusResponse, responses=errors_of(503),
            tags=["operations"])
async def readyz(bundle: BundleDep, store: StoreDep) -> StatusResponse:
    """Ready: every market's model and index answer, and the session store answers."""
    try:
        await anyio.to_thread.run_sync(_probe, bundle)
    except Exception as e:
        raise NotReadyError(f"models or indexes not usable: {e!r}") from e
    try:
        await store.ping()
    except ServiceError as e:
        raise NotReadyError(e.message, session_store=store.kind) from e
    return StatusResponse(status="ready")


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", response_model=MarketsResponse,
             responses=errors_of(400, 403, 404, 413, 500), tags=["operations"])
async def admin_reload(
    request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> MarketsResponse:
    """Reload checkpoints and indexes (Bearer XMR_ADMIN_TOKEN); on failure the old ones stay.
    With `xmr serve --workers N` this process answers once it has reloaded, and the other
    workers reload next (`GET /markets` on each, or `xmr_model_info` per pid, shows it)."""
    if settings.admin_token is None:
        raise AdminDisabledError("admin endpoints are disabled (no XMR_ADMIN_TOKEN set)")
    expected = f"Bearer {settings.admin_token}"
    given = (authorization or "").encode("utf-8", "replace")
    if not secrets.compare_digest(given, expected.encode()):
        raise ForbiddenError("missing or wrong admin token")
    bundle = await reload_bundle(registry, metrics)
    if request.app.state.reload_peers is not None:
        request.app.state.reload_peers()
    return await list_markets(bundle)


async def reload_bundle(registry: Registry, metrics: Metrics) -> Bundle:
    try:
        bundle = await registry.reload()
    except ServiceError:
        metrics.reloads.labels("failure").inc()
        raise
    metrics.reloads.labels("success").inc()
    metrics.set_models((m.market, m.model_version, m.index_version)
                       for m in bundle.markets.values())
    return bundle
