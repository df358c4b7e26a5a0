"""Session endpoints against the in-process store and a real redis-server (started per test)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from service.errors import SessionNotFoundError
from service.sessions import MemorySessionStore, RedisSessionStore, session_key


def test_session_key_format() -> None:
    assert session_key("de", "abc-1") == "xmr:session:de:abc-1"


def test_memory_store_caps_and_expires() -> None:
    asyncio.run(check_memory_store())


async def check_memory_store() -> None:
    now = [0.0]
    store = MemorySessionStore(ttl_s=10, max_items=3, clock=lambda: now[0])
    assert await store.append("aa", "s", ["1", "2"]) == ["1", "2"]
    assert await store.append("aa", "s", ["3", "4"]) == ["2", "3", "4"]
    now[0] = 9.0
    assert await store.get("aa", "s") == ["2", "3", "4"]
    await store.append("aa", "s", ["5"])  # refreshes the TTL
    now[0] = 18.0
    assert await store.get("aa", "s") == ["3", "4", "5"]
    now[0] = 30.0
    with pytest.raises(SessionNotFoundError, match="no session"):
        await store.get("aa", "s")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_session_append_get_delete(make_service_client, request, backend: str) -> None:
    overrides: dict[str, object] = {"session_max_items": 3}
    if backend == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_server").url
    with make_service_client(**overrides) as client:
        r = client.post("/markets/aa/sessions/u-1/events", json={"items": ["a", "b"]})
        assert r.status_code == 200 and r.json()["items"] == ["a", "b"]
        r = client.post("/markets/aa/sessions/u-1/events", json={"items": ["c", "d"]})
        assert r.json()["items"] == ["b", "c", "d"]  # capped, oldest dropped
        assert client.get("/markets/aa/sessions/u-1").json() == {
            "market": "aa", "session_id": "u-1", "items": ["b", "c", "d"]}
        assert client.get("/markets/bb/sessions/u-1").status_code == 404  # per market
        assert client.delete("/markets/aa/sessions/u-1").status_code == 204
        r = client.get("/markets/aa/sessions/u-1")
        assert r.status_code == 404 and r.json()["error"] == "session_not_found"
        assert client.delete("/markets/aa/sessions/u-1").status_code == 204  # idempotent


def test_session_path_and_body_validation(make_service_client) -> None:
    with make_service_client() as client:
        assert client.post("/markets/aa/sessions/bad%20id/events",
                           json={"items": ["a"]}).status_code == 422
        assert client.get("/markets/aa/sessions/" + "x" * 129).status_code == 422
        assert client.post("/markets/aa/sessions/s/events", json={"items": []}).status_code == 422
        r = client.post("/markets/zz/sessions/s/events", json={"items": ["a"]})
        assert r.status_code == 404 and r.json()["known_markets"] == ["aa", "bb", "cc"]


def test_recommend_with_session_appends_then_ranks(make_service_client, service_artifacts) -> None:
    from tests.test_api_recommend import popular

    items = popular(service_artifacts, "bb")
    with make_service_client() as client:
        client.post("/markets/bb/sessions/s9/events", json={"items": items[:2]})
        with_session = client.post("/markets/bb/recommend",
                                   json={"session_id": "s9", "items": [items[2]], "k": 5}).json()
        stateless = client.post("/markets/bb/recommend",
                                json={"items": items[:3], "k": 5}).json()
        stored = client.get("/markets/bb/sessions/s9").json()["items"]
    assert stored == items[:3]
    assert with_session["items"] == stateless["items"]
    assert not {i["item_id"] for i in with_session["items"]} & set(items[:3])


def test_redis_session_ttl_and_single_transaction(make_service_client, redis_server) -> None:
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with make_service_client(redis_url=redis_server.url, session_ttl_s=1) as client:
        client.post("/markets/aa/sessions/t/events", json={"items": ["a", "b"]})
        assert raw.lrange("xmr:session:aa:t", 0, -1) == ["a", "b"]
        assert 0 < raw.pttl("xmr:session:aa:t") <= 1000
        before = raw.info("commandstats")
        client.post("/markets/aa/sessions/t/events", json={"items": ["c"]})
        after = raw.info("commandstats")
        delta = {k: v["calls"] - before.get(k, {"calls": 0})["calls"] for k, v in after.items()}
        # one atomic script call per request (Redis also counts the commands it runs)
        assert delta["cmdstat_evalsha"] == 1 and delta["cmdstat_rpush"] == 1
        assert delta.get("cmdstat_eval", 0) == delta.get("cmdstat_script|load", 0) == 0
        time.sleep(1.2)
        assert client.get("/markets/aa/sessions/t").status_code == 404
        assert raw.exists("xmr:session:aa:t") == 0
    raw.close()


def test_redis_down_gives_503_and_recovers(make_service_client, redis_server,
                                           service_artifacts) -> None:
    from tests.test_api_recommend import popular

    items = popular(service_artifacts, "aa")
    with make_service_client(redis_url=redis_server.url) as client:
        r = client.post("/markets/aa/sessions/r/events", json={"items": items[:1]})
        assert r.status_code == 200
        assert client.get("/readyz").status_code == 200
        redis_server.stop()
        for call in (
            lambda: client.post("/markets/aa/sessions/r/events", json={"items": ["x"]}),
            lambda: client.get("/markets/aa/sessions/r"),
            lambda: client.delete("/markets/aa/sessions/r"),
            lambda: client.post("/markets/aa/recommend", json={"session_id": "r", "items": []}),
        ):
            r = call()
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "session_store_unavailable"
        stateless = client.post("/markets/aa/recommend", json={"items": items[:2]})
        assert stateless.status_code == 200 and stateless.json()["items"]
        assert client.get("/readyz").status_code == 503
        redis_server.start()  # same port, no app restart
        r = client.post("/markets/aa/sessions/r/events", json={"items": items[1:2]})
        assert r.status_code == 200 and r.json()["items"] == items[1:2]  # the old data was lost
        assert client.get("/readyz").status_code == 200
        assert client.post("/markets/aa/recommend",
                           json={"session_id": "r", "items": []}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'status="503"' in metrics


def test_redis_append_script_slices_caps_and_survives_a_script_flush(redis_server) -> None:
    async def run() -> None:
        store = RedisSessionStore.from_url(redis_server.url, 2, 1.0, ttl_s=60, max_items=1500)
        items = [f"i{n}" for n in range(2500)]  # over the script's 1000-value slices
        assert await store.append("aa", "big", items) == items[-1500:]
        await store.client.script_flush()  # as after a Redis restart: the script is gone
        assert await store.append("aa", "big", ["last"]) == [*items[-1499:], "last"]
        assert await store.append("aa", "empty", []) == []
        assert 0 < await store.client.ttl(session_key("aa", "big")) <= 60
        await store.close()

    asyncio.run(run())
