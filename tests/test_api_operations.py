"""Operations endpoints: markets, health, readiness, metrics, docs, noop, admin reload."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.index import build_index
from tests.conftest import free_port
from training.checkpoint import load_checkpoint, save_checkpoint

TOKEN = "s3cret"


def retrain(artifacts: Path, market: str, scale: float, rebuild: bool = True) -> str:
    """Stand-in for `xmr train` + `xmr index build`: new weights (and index); new model version."""
    market_dir = artifacts / "markets" / market
    ckpt = load_checkpoint(market_dir)
    with torch.no_grad():
        ckpt.model.item_emb.weight.mul_(scale)
    manifest = save_checkpoint(market_dir, ckpt.model, ckpt.vocab, ckpt.manifest,
                               ckpt.market_items)
    if rebuild:
        build_index(market_dir)
    return manifest.version


def test_markets_lists_versions_and_counts(make_service_client, service_artifacts) -> None:
    with make_service_client() as client:
        body = client.get("/markets").json()
    assert [m["market"] for m in body["markets"]] == ["aa", "bb", "cc"]
    for info in body["markets"]:
        ckpt = load_checkpoint(service_artifacts / "markets" / info["market"])
        assert ckpt.market_items is not None
        assert info["model_version"] == ckpt.manifest.version
        assert info["n_items"] == len(ckpt.market_items)
        assert info["search"] == "faiss" and info["device"] == "cpu" and info["encoder"] == "onnx"


def test_markets_setting_serves_a_subset(make_service_client) -> None:
    with make_service_client(markets=["bb"]) as client:
        assert [m["market"] for m in client.get("/markets").json()["markets"]] == ["bb"]
        r = client.post("/markets/aa/recommend", json={})
    assert r.status_code == 404 and r.json()["known_markets"] == ["bb"]


def test_health_ready_noop_and_docs(make_service_client) -> None:
    with make_service_client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/noop").json() == {"status": "ok"}
        assert client.post("/markets/aa/noop", json={"items": ["x"]}).json() == {"status": "ok"}
        assert client.post("/markets/zz/noop", json={}).status_code == 404
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/markets/{market}/recommend", "/markets/{market}/sessions/{session_id}/events",
            "/markets/{market}/sessions/{session_id}", "/markets", "/admin/reload"} <= set(paths)


def test_metrics_count_latency_errors_per_route_and_market(make_service_client) -> None:
    with make_service_client() as client:
        client.post("/markets/aa/recommend", json={"items": []})
        client.post("/markets/aa/recommend", json={"k": 0})
        client.post("/markets/nope/recommend", json={})
        text = client.get("/metrics").text
    route = 'route="/markets/{market}/recommend"'
    assert f'xmr_request_duration_seconds_count{{market="aa",method="POST",{route}}} 2.0' in text
    assert f'xmr_errors_total{{market="aa",{route},status="422"}} 1.0' in text
    assert f'xmr_errors_total{{market="unknown",{route},status="404"}} 1.0' in text
    assert 'xmr_model_info{index_version=' in text


def test_start_fails_clearly_without_indexes(tmp_path: Path, service_artifacts: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.errors import IndexLoadError
    from service.settings import Settings

    shutil.copytree(service_artifacts, tmp_path / "a")
    (tmp_path / "a" / "markets" / "aa" / "index.json").unlink()
    app = create_app(Settings(artifacts=tmp_path / "a", reload_on_sighup=False))
    with pytest.raises(IndexLoadError, match="xmr index build"), TestClient(app):
        pass


def test_admin_reload_needs_a_token(make_service_client) -> None:
    with make_service_client() as client:
        assert client.post("/admin/reload").status_code == 404
    with make_service_client(admin_token=TOKEN) as client:
        assert client.post("/admin/reload").status_code == 403
        r = client.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert client.post("/admin/reload",
                           headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_failing_reload_keeps_serving_the_old_bundle(make_service_client,
                                                     artifacts_copy: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with make_service_client(artifacts=artifacts_copy, admin_token=TOKEN) as client:
        before = client.get("/markets").json()
        new_version = retrain(artifacts_copy, "aa", 1.3, rebuild=False)  # index now stale
        r = client.post("/admin/reload", headers=auth)
        assert r.status_code == 500 and r.json()["error"] == "reload_failed"
        assert "xmr index build" in r.json()["message"]
        assert client.get("/markets").json() == before
        assert client.post("/markets/aa/recommend", json={"items": []}).status_code == 200
        build_index(artifacts_copy / "markets" / "aa")
        after = client.post("/admin/reload", headers=auth).json()
        metrics = client.get("/metrics").text
    assert after["markets"][0]["model_version"] == new_version
    assert 'xmr_reloads_total{outcome="failure"} 1.0' in metrics
    assert 'xmr_reloads_total{outcome="success"} 1.0' in metrics


def test_reload_under_concurrent_requests_never_fails_or_mixes(make_service_client,
                                                               artifacts_copy: Path) -> None:
    from tests.test_api_recommend import popular

    session = popular(artifacts_copy, "aa")[:3]
    seen: list[tuple[int, str, str, str]] = []
    stop = threading.Event()
    with make_service_client(artifacts=artifacts_copy, admin_token=TOKEN) as client:
        old = client.get("/markets").json()["markets"][0]

        def hammer() -> None:
            while not stop.is_set():
                r = client.post("/markets/aa/recommend", json={"items": session, "k": 5})
                body = r.json()
                seen.append((r.status_code, body.get("model_version", ""),
                             body.get("index_version", ""), json.dumps(body.get("items"))))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        new_model = retrain(artifacts_copy, "aa", 0.7)
        r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        n_at_reload = len(seen)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        new = client.get("/markets").json()["markets"][0]
    assert r.status_code == 200
    assert {status for status, *_ in seen} == {200}
    pairs = {(model, index) for _, model, index, _ in seen}
    assert pairs <= {(old["model_version"], old["index_version"]),
                     (new["model_version"], new["index_version"])}
    assert new["model_version"] == new_model != old["model_version"]
    assert any(model == new_model for _, model, _, _ in seen[n_at_reload:])
    for pair in pairs:  # each version answers one way: no response mixes two models
        answers = [json.loads(items) for _, m, i, items in seen if (m, i) == pair]
        first = answers[0]
        for answer in answers[1:]:  # batch sizes vary, so scores may differ in the last bits
            assert [x["item_id"] for x in answer] == [x["item_id"] for x in first]
            np.testing.assert_allclose([x["score"] for x in answer],
                                       [x["score"] for x in first], rtol=1e-5)


@pytest.mark.slow
def test_xmr_serve_reloads_on_sighup(artifacts_copy: Path) -> None:
    port = free_port()
    env = {**os.environ, "XMR_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--artifacts", str(artifacts_copy),
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "xmr serve did not become ready"
            time.sleep(0.1)
        new_version = retrain(artifacts_copy, "cc", 1.2)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            markets = httpx.get(f"{url}/markets").json()["markets"]
            if [m["model_version"] for m in markets if m["market"] == "cc"] == [new_version]:
                break
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises after a clean stop


def test_loaded_bundles_are_kept_out_of_the_gc_walk(make_service_client) -> None:
    """A full collection would walk every object of the loaded markets (136 ms on the event
    loop for XMarket's seven); the app freezes them after a load and after each reload."""
    import gc

    def frozen(obj: object) -> bool:
        assert gc.is_tracked(obj)
        return all(o is not obj for o in gc.get_objects())  # the frozen are not listed

    with make_service_client(admin_token=TOKEN) as client:
        first = client.app.state.registry.current
        assert frozen(first.markets) and gc.get_freeze_count() > 0
        r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        second = client.app.state.registry.current
        assert second is not first and frozen(second.markets)
