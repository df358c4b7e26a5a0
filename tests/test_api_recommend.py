"""POST /markets/{market}/recommend through the real app: ranking, fallback, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_index import model_top_k
from training.checkpoint import load_checkpoint


def popular(artifacts: Path, market: str) -> list[str]:
    ckpt = load_checkpoint(artifacts / "markets" / market)
    assert ckpt.market_items is not None
    return list(ckpt.market_items)


def test_recommend_equals_model_ranking_minus_seen(make_service_client,
                                                   model_ranking_artifacts) -> None:
    session = popular(model_ranking_artifacts, "aa")[2:5]
    with make_service_client(artifacts=model_ranking_artifacts) as client:
        r = client.post("/markets/aa/recommend", json={"items": session, "k": 7})
    assert r.status_code == 200
    body = r.json()
    expected = [hit for hit in model_top_k(model_ranking_artifacts, "aa", session, 10)
                if hit[0] not in session][:7]
    assert [i["item_id"] for i in body["items"]] == [i for i, _ in expected]
    np.testing.assert_allclose([i["score"] for i in body["items"]], [s for _, s in expected],
                               rtol=1e-5)
    ckpt = load_checkpoint(model_ranking_artifacts / "markets" / "aa")
    assert body["market"] == "aa"
    assert body["fallback"] is None and body["unknown_items"] == []
    assert body["model_version"] == ckpt.manifest.version
    assert len(body["index_version"]) == 12


def test_recommend_without_exclusion_keeps_seen_items(make_service_client,
                                                       model_ranking_artifacts) -> None:
    session = popular(model_ranking_artifacts, "bb")[:1]
    expected = model_top_k(model_ranking_artifacts, "bb", session, 5)
    with make_service_client(artifacts=model_ranking_artifacts) as client:
        body = client.post("/markets/bb/recommend",
                           json={"items": session, "k": 5, "exclude_seen": False}).json()
    assert [i["item_id"] for i in body["items"]] == [i for i, _ in expected]


def test_unknown_items_are_reported_not_dropped(make_service_client,
                                                model_ranking_artifacts) -> None:
    session = popular(model_ranking_artifacts, "aa")[:2]
    with make_service_client(artifacts=model_ranking_artifacts) as client:
        body = client.post("/markets/aa/recommend",
                           json={"items": ["nope-1", *session, "nope-2", "nope-1"], "k": 3}).json()
    assert body["unknown_items"] == ["nope-1", "nope-2"]
    assert body["fallback"] is None
    expected = [h for h in model_top_k(model_ranking_artifacts, "aa", session, 5)
                if h[0] not in session]
    assert [i["item_id"] for i in body["items"]] == [i for i, _ in expected[:3]]


@pytest.mark.parametrize("items", [[], ["unknown-a", "unknown-b"]])
def test_no_known_item_falls_back_to_popular(make_service_client, service_artifacts,
                                             items: list[str]) -> None:
    with make_service_client() as client:
        body = client.post("/markets/cc/recommend", json={"items": items, "k": 4}).json()
        metrics = client.get("/metrics").text
    assert body["fallback"] == "popular"
    assert [i["item_id"] for i in body["items"]] == popular(service_artifacts, "cc")[:4]
    assert body["unknown_items"] == items
    assert 'xmr_fallbacks_total{kind="popular",market="cc"} 1.0' in metrics


def test_candidates_are_reranked_by_model_score(make_service_client,
                                                model_ranking_artifacts) -> None:
    items = popular(model_ranking_artifacts, "aa")
    session, candidates = items[:2], items[5:15]
    ranking = [i for i, _ in model_top_k(model_ranking_artifacts, "aa", session, len(items))]
    with make_service_client(artifacts=model_ranking_artifacts) as client:
        body = client.post("/markets/aa/recommend", json={
            "items": session, "k": 4, "candidates": [*candidates, "nope", session[0]],
        }).json()
    expected = [i for i in ranking if i in candidates][:4]  # session[0] excluded as seen
    assert [i["item_id"] for i in body["items"]] == expected
    assert body["unknown_items"] == ["nope"]


def test_candidates_with_unknown_session_use_popular_order(make_service_client,
                                                           service_artifacts) -> None:
    items = popular(service_artifacts, "bb")
    with make_service_client() as client:
        body = client.post("/markets/bb/recommend",
                           json={"items": [], "candidates": [items[9], items[3], items[6]]}).json()
    assert body["fallback"] == "popular"
    assert [i["item_id"] for i in body["items"]] == [items[3], items[6], items[9]]


def test_unknown_market_returns_404_listing_known(make_service_client) -> None:
    with make_service_client() as client:
        r = client.post("/markets/zz/recommend", json={"items": []})
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_market"
    assert r.json()["known_markets"] == ["aa", "bb", "cc"]
    assert "aa, bb, cc" in r.json()["message"]


@pytest.mark.parametrize("body", [
    {"items": "I00001"}, {"items": [1, 2]}, {"k": 0}, {"k": "ten"}, {"itemz": []},
    {"items": [""]}, {"session_id": "a/b"}, {"candidates": "x"},
])
def test_invalid_body_returns_422(make_service_client, body: dict[str, object]) -> None:
    with make_service_client() as client:
        r = client.post("/markets/aa/recommend", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert r.json()["message"]


def test_malformed_json_and_bad_market_path_return_422(make_service_client) -> None:
    with make_service_client() as client:
        bad_json = client.post("/markets/aa/recommend", content=b"{not json",
                               headers={"content-type": "application/json"})
        bad_market = client.post("/markets/a:b/recommend", json={})
    assert bad_json.status_code == 422
    assert bad_market.status_code == 422


def test_k_above_maximum_returns_422(make_service_client) -> None:
    with make_service_client(max_k=5) as client:
        r = client.post("/markets/aa/recommend", json={"items": [], "k": 6})
        ok = client.post("/markets/aa/recommend", json={"items": [], "k": 5})
    assert r.status_code == 422
    assert "maximum of 5" in r.json()["message"]
    assert ok.status_code == 200


def test_too_many_items_returns_422(make_service_client) -> None:
    with make_service_client(max_request_items=3) as client:
        r = client.post("/markets/aa/recommend", json={"items": ["a", "b", "c", "d"]})
        c = client.post("/markets/aa/recommend", json={"candidates": ["a", "b", "c", "d"]})
    assert r.status_code == c.status_code == 422


def test_oversized_body_returns_413(make_service_client) -> None:
    body = b'{"items": [' + b'"I00001",' * 200 + b'"I00002"]}'
    with make_service_client(max_body_bytes=1000) as client:
        declared = client.post("/markets/aa/recommend", content=body,
                               headers={"content-type": "application/json"})
        streamed = client.post("/markets/aa/recommend", content=iter([body[:600], body[600:]]),
                               headers={"content-type": "application/json"})
        small = client.post("/markets/aa/recommend", content=iter([b'{"items": []}']),
                            headers={"content-type": "application/json"})
        metrics = client.get("/metrics").text
    assert declared.status_code == 413 and declared.json()["error"] == "body_too_large"
    assert streamed.status_code == 413
    assert small.status_code == 200
    assert 'xmr_errors_total{market="",route="unmatched",status="413"} 2.0' in metrics


def served_top_k(artifacts: Path, market: str, sessions: list[list[str]], k: int,
                 candidates: list[str] | None = None) -> list[list[tuple[str, float]]]:
    """What the experiment harness scores as `served` (training.served.ServedScorer) for the
    same checkpoint and sessions: its top k item ids and scores."""
    from training.ranker import load_ranker
    from training.served import ServedScorer, item_vectors

    ckpt = load_checkpoint(artifacts / "markets" / market)
    assert ckpt.market_items is not None
    ranker = load_ranker(artifacts / "markets" / market, ckpt.manifest.weights_sha256,
                         ckpt.vocab.n_rows)
    assert ranker is not None
    rows = np.asarray(ckpt.vocab.indices(ckpt.market_items), dtype=np.int64)
    scorer = ServedScorer(ranker, item_vectors(ckpt.model, ckpt.market_row, rows), ckpt.model,
                          ckpt.market_row, depth=k)
    histories = [ckpt.vocab.indices(s) for s in sessions]
    if candidates is None:
        scores = scorer(histories).numpy()  # (B, n_rows), -inf outside the served top k
    else:
        assert ranker.slate_scorer is not None  # `xmr train` fits one: lists are ordered by it
        cols = np.asarray([ckpt.vocab.indices(candidates)] * len(sessions))
        picked = scorer.score_candidates(histories, cols).numpy()  # (B, C)
        scores = np.full((len(sessions), ckpt.vocab.n_rows), -np.inf)
        np.put_along_axis(scores, cols, picked, axis=1)
    out = []
    for row in scores:
        order = sorted((r for r in np.flatnonzero(np.isfinite(row))), key=lambda r: (-row[r], r))
        out.append([(ckpt.vocab.item_id(int(r)), float(row[r])) for r in order[:k]])
    return out


def test_served_top_k_equals_the_experiments_served_ranking(make_service_client,
                                                            service_artifacts) -> None:
    items = popular(service_artifacts, "aa")
    sessions = [items[2:5], items[:1], items[10:30:3], [items[7], items[1], items[40]]]
    with make_service_client() as client:
        markets = {m["market"]: m for m in client.get("/markets").json()["markets"]}
        served = [client.post("/markets/aa/recommend", json={"items": s, "k": 8}).json()
                  for s in sessions]
        given = items[3:40:2]
        chosen = [client.post("/markets/aa/recommend", json={
            "items": s, "k": 6, "candidates": given}).json() for s in sessions]
        metrics = client.get("/metrics").text
    assert markets["aa"]["ranking"] == "two-stage"
    assert 'xmr_rerank_seconds_count{market="aa"} 8.0' in metrics  # each re-ranked request
    expected = served_top_k(service_artifacts, "aa", sessions, 8)
    for body, want in zip(served, expected, strict=True):
        assert [i["item_id"] for i in body["items"]] == [i for i, _ in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], [s for _, s in want],
                                   rtol=1e-4, atol=1e-4)
    expected = served_top_k(service_artifacts, "aa", sessions, 6, candidates=given)
    for body, want, session in zip(chosen, expected, sessions, strict=True):
        assert [i["item_id"] for i in body["items"]] == [i for i, _ in want]
        assert not set(session) & {i["item_id"] for i in body["items"]}


def test_markets_without_a_ranker_serve_the_model_ranking(make_service_client,
                                                          model_ranking_artifacts) -> None:
    with make_service_client(artifacts=model_ranking_artifacts) as client:
        markets = client.get("/markets").json()["markets"]
    assert {m["ranking"] for m in markets} == {"model"}
