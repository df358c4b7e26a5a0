"""Redis killed (-9) while clients write, then restarted on the same port: session endpoints
answer 503 while it is down, item-only recommendations keep answering 200, the app recovers
without a restart, and no event acknowledged with a 2xx is lost. The guarantee needs Redis
persistence: `--appendonly yes --appendfsync always` (with `--save ""` and no AOF a restart
loses every session). The long run under real load is `benchmarks/chaos.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisProcess, free_port, running_redis
from tests.test_api_recommend import popular


class PersistentRedis(RedisProcess):
    """The fixture's redis-server, with an append-only file fsynced before every reply."""

    persistence = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    yield from running_redis(PersistentRedis(free_port(), tmp_path))


def test_redis_kill_and_restart_loses_no_acknowledged_event(
    make_service_client, persistent_redis: PersistentRedis, service_artifacts: Path
) -> None:
    items = popular(service_artifacts, "aa")[:3]
    acked: dict[str, list[str]] = {}  # session -> events acknowledged with 2xx, in order
    statuses: dict[str, list[int]] = {"events": [], "recommend": []}
    stop = threading.Event()
    max_events = 20  # below XMR_SESSION_MAX_ITEMS, so the cap never trims an event
    with make_service_client(redis_url=persistent_redis.url, session_max_items=50) as client:

        def writer(w: int) -> None:
            n, session_no, position = 0, 0, 0  # n: events acknowledged by this writer
            while not stop.is_set() and n < 400:
                session = f"w{w}-s{session_no}"
                event = f"ev-{w}-{session_no}-{position}"
                r = client.post(f"/markets/aa/sessions/{session}/events", json={"items": [event]})
                statuses["events"].append(r.status_code)
                if r.status_code == 200:
                    acked.setdefault(session, []).append(event)
                    n, position = n + 1, position + 1
                    if position == max_events:
                        session_no, position = session_no + 1, 0
                else:
                    assert r.status_code == 503 and r.json()["error"] == \
                        "session_store_unavailable", r.text
                    session_no, position = session_no + 1, 0  # move on to a fresh session
                    time.sleep(0.01)

        def reader() -> None:
            while not stop.is_set():
                r = client.post("/markets/aa/recommend", json={"items": items, "k": 5})
                statuses["recommend"].append(r.status_code)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        threads.append(threading.Thread(target=reader))
        def acked_count() -> int:
            return sum(len(e) for e in list(acked.values()))

        def wait_for_acks(n: int) -> None:
            # Counted, not timed: a loaded machine acknowledges fewer events per second.
            deadline = time.monotonic() + 60
            while acked_count() < n and time.monotonic() < deadline:
                time.sleep(0.02)

        for t in threads:
            t.start()
        wait_for_acks(60)
        persistent_redis.process.kill()  # type: ignore[union-attr]  # SIGKILL, no shutdown save
        persistent_redis.process.wait()  # type: ignore[union-attr]
        time.sleep(0.5)
        down = [client.get("/markets/aa/sessions/w0-s0").status_code,
                client.get("/readyz").status_code]
        persistent_redis.start()  # same port and directory: the AOF is replayed
        wait_for_acks(acked_count() + 30)  # writes go on after the restart
        stop.set()
        for t in threads:
            t.join(timeout=30)
        missing = []
        for session, events in acked.items():
            r = client.get(f"/markets/aa/sessions/{session}")
            stored = r.json()["items"] if r.status_code == 200 else []
            missing += [e for e in events if e not in stored]
        ready = client.get("/readyz").status_code
    n_acked = sum(len(e) for e in acked.values())
    print(f"redis kill: {n_acked} events acknowledged, {len(missing)} lost, "
          f"{statuses['events'].count(503)} answered 503, recommend statuses "
          f"{sorted(set(statuses['recommend']))}")
    assert down == [503, 503]
    assert set(statuses["recommend"]) == {200}
    assert 503 in statuses["events"] and n_acked >= 90
    assert missing == []
    assert ready == 200
