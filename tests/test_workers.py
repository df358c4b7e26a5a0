"""`xmr serve --workers 2` against a real redis-server: both workers serve, share sessions,
both reload (admin reload and SIGHUP), metrics add up across them, and SIGTERM stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from service.cli import app
from service.index import build_index
from service.index_manifest import IndexOptions
from tests.conftest import RedisProcess, free_port

TOKEN = "workers-test-token"
EVENTS_ROUTE = "/markets/{market}/sessions/{session_id}/events"


def test_several_workers_without_redis_are_refused_in_one_line(service_artifacts: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--artifacts", str(service_artifacts),
                                      "--workers", "2"], env={"XMR_REDIS_URL": ""})
    assert result.exit_code == 1
    assert result.output.startswith("error: --workers 2 needs Redis for sessions")
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture
def two_workers(artifacts_copy: Path, redis_server: RedisProcess,
                tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "XMR_ADMIN_TOKEN": TOKEN, "XMR_LOG_LEVEL": "INFO"}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--artifacts", str(artifacts_copy),
         "--port", str(port), "--redis-url", redis_server.url, "--workers", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: len(workers_state(url)) == 2, process, tmp_path / "serve.log")
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def wait_for(check, process: subprocess.Popen[bytes], log: Path,  # type: ignore[no-untyped-def]
             timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"xmr serve exited {process.returncode}:\n{log.read_text()}")
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; the server's log:\n{log.read_text()}")
        time.sleep(0.3)


def workers_state(url: str, connections: int = 16) -> dict[int, dict[str, str]]:
    """Per worker pid, the index version of each market, over new connections (SO_REUSEPORT
    spreads them by their source port)."""
    state: dict[int, dict[str, str]] = {}
    for _ in range(connections):
        with httpx.Client(base_url=url, timeout=10) as client:
            body = client.get("/markets").raise_for_status().json()
        state[body["worker"]] = {m["market"]: m["index_version"] for m in body["markets"]}
    return state


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def test_two_workers_share_sessions_reload_together_and_sum_metrics(
        two_workers: tuple[str, subprocess.Popen[bytes]], artifacts_copy: Path,
        tmp_path: Path) -> None:
    url, process = two_workers
    log = tmp_path / "serve.log"
    # sessions: each event through a new connection; both workers take some of them
    items = [f"I{n:05d}" for n in range(12)]
    served_by = set()
    for item in items:
        with httpx.Client(base_url=url, timeout=10) as client:
            served_by.add(client.get("/markets").json()["worker"])  # same connection, same worker
            client.post("/markets/aa/sessions/s-1/events",
                        json={"items": [item]}).raise_for_status()
    assert len(served_by) == 2
    session = httpx.get(f"{url}/markets/aa/sessions/s-1", timeout=10).json()
    assert session["items"] == items
    # metrics add up over the workers: every event counted once, whoever served it
    assert metric(url, "xmr_requests_total", route=EVENTS_ROUTE, method="POST",
                  status="200") == len(items)
    assert len({s for s in workers_state(url)}) == 2

    # an admin reload in one worker reaches the other
    market_dir = artifacts_copy / "markets" / "aa"
    hnsw = build_index(market_dir, IndexOptions(kind="hnsw", recall_queries=100)).version
    answer = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=60).raise_for_status().json()
    assert {m["market"]: m["index_version"] for m in answer["markets"]}["aa"] == hnsw
    wait_for(lambda: {v["aa"] for v in workers_state(url).values()} == {hnsw}, process, log)
    assert len(workers_state(url)) == 2
    assert metric(url, "xmr_reloads_total", outcome="success") == 2
    # xmr_model_info: one series per worker pid, both on the new index
    text = httpx.get(f"{url}/metrics", timeout=10).text
    served = [line for line in text.splitlines()
              if line.startswith("xmr_model_info{") and 'market="aa"' in line
              and line.endswith(" 1.0")]
    assert len(served) == 2 and all(f'index_version="{hnsw}"' in line for line in served)

    # SIGHUP to the supervisor reloads every worker
    flat = build_index(market_dir).version
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: {v["aa"] for v in workers_state(url).values()} == {flat}, process, log)
    wait_for(lambda: metric(url, "xmr_reloads_total", outcome="success") == 4, process, log)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert "metrics_dir=" in log.read_text()
    metrics_dir = log.read_text().split("metrics_dir=")[1].split()[0]
    assert not Path(metrics_dir).exists()
