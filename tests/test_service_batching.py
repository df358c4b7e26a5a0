"""Micro-batching: concurrent queries merged into one encoder call give the unbatched answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import service.batcher
from service.batcher import Batcher
from service.bundle import MarketModel, load_bundle
from service.recommender import Query, Recommendation, recommend_many


def queries_for(popular: list[str]) -> list[Query]:
    return [
        Query(popular[i : i + 1 + i % 6], k=5 + i % 3, exclude_seen=i % 2 == 0,
              candidates=popular[20:40] if i % 5 == 0 else None)
        for i in range(24)
    ] + [Query([], k=3), Query(["unknown"], k=2)]


async def submit_all(
    batcher: Batcher, jobs: list[tuple[MarketModel, Query]]
) -> list[Recommendation]:
    results = await asyncio.gather(*(batcher.submit(m, q) for m, q in jobs))
    await batcher.close()
    return list(results)


@pytest.mark.parametrize("in_thread", [False, True])
def test_batched_results_equal_unbatched(service_artifacts: Path, in_thread: bool) -> None:
    bundle = load_bundle(service_artifacts, None, "faiss", "cpu")
    jobs = [(model, q) for model in bundle.markets.values()
            for q in queries_for([i for i, _ in model.popular])]
    sizes: list[int] = []
    batched = asyncio.run(submit_all(Batcher(16, 0.005, sizes.append, in_thread=in_thread), jobs))
    assert max(sizes) > 1 and sum(sizes) == len(jobs)
    for (model, query), got in zip(jobs, batched, strict=True):
        alone = recommend_many(model, [query])[0]
        assert got.fallback == alone.fallback
        assert got.unknown_items == alone.unknown_items
        assert got.model_version == model.model_version
        assert [i for i, _ in got.items] == [i for i, _ in alone.items]
        np.testing.assert_allclose([s for _, s in got.items],
                                   [s for _, s in alone.items], rtol=1e-5)


@pytest.mark.parametrize("in_thread", [False, True])
def test_batch_failure_reaches_every_waiter_and_batcher_recovers(
    service_artifacts: Path, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    model = load_bundle(service_artifacts, ["aa"], "faiss", "cpu").market("aa")

    def broken(model: object, queries: list[Query]) -> list[object]:
        raise RuntimeError("encoder exploded")

    async def run() -> None:
        batcher = Batcher(8, 0.005, in_thread=in_thread)
        with monkeypatch.context() as patch:
            patch.setattr(service.batcher, "recommend_many", broken)
            outcomes = await asyncio.gather(
                *(batcher.submit(model, Query([], k=1)) for _ in range(5)),
                return_exceptions=True,
            )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        ok = await batcher.submit(model, Query([], k=2))
        assert len(ok.items) == 2
        await batcher.close()

    asyncio.run(run())


def test_app_with_batching_serves_the_same_ranking(make_service_client,
                                                   service_artifacts: Path) -> None:
    from tests.test_api_recommend import popular

    session = popular(service_artifacts, "cc")[:4]
    with make_service_client(batch_max=8, batch_wait_ms=1) as client:
        batched = client.post("/markets/cc/recommend", json={"items": session}).json()
        metrics = client.get("/metrics").text
    with make_service_client(batch_max=1) as client:
        plain = client.post("/markets/cc/recommend", json={"items": session}).json()
    assert [i["item_id"] for i in batched["items"]] == [i["item_id"] for i in plain["items"]]
    assert "xmr_encoder_batch_size_count 1.0" in metrics


def test_a_request_reading_its_session_joins_the_batch_formed_meanwhile(
    service_artifacts: Path
) -> None:
    """A request inside `pending()` (its store call) when a batch forms is waited for, up to
    `join_s`, and answered in that batch; without pending requests a batch does not wait."""
    model = load_bundle(service_artifacts, ["aa"], "faiss", "cpu").market("aa")
    popular = [i for i, _ in model.popular]

    async def run(join_s: float) -> list[int]:
        sizes: list[int] = []
        batcher = Batcher(8, 0.0, sizes.append, in_thread=False, join_s=join_s)
        store_reply = asyncio.Event()

        async def with_session() -> Recommendation:
            with batcher.pending():
                await store_reply.wait()  # the store's round trip
            return await batcher.submit(model, Query(popular[:2], k=3))

        async def reply_soon() -> None:
            await asyncio.sleep(0.01)
            store_reply.set()

        session = asyncio.create_task(with_session())
        await asyncio.sleep(0)  # it is pending now
        replier = asyncio.create_task(reply_soon())
        plain = await batcher.submit(model, Query(popular[:1], k=3))
        await asyncio.gather(session, replier)
        assert plain.items and session.result().items
        await batcher.close()
        return sizes

    assert asyncio.run(run(join_s=1.0)) == [2]  # waited 10 ms for the pending one: one batch
    assert asyncio.run(run(join_s=0.0)) == [1, 1]  # without the join wait: two batches
