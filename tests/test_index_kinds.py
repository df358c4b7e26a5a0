"""Approximate index kinds (IVF, HNSW): built on request or by `auto` above a size, tuned to a
recall floor measured against exact search, refused below it, loaded with their parameters,
and reported by the service."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service.bundle import load_bundle
from service.cli import app
from service.errors import IndexBuildError, IndexLoadError, IndexRecallError
from service.index import build_index, load_index, market_vectors
from service.index_manifest import INDEX_MANIFEST, IndexOptions, read_index_manifest
from service.recall import exact_kth_scores, recall_at_k, sample_queries
from training.checkpoint import load_checkpoint


def test_recall_at_k_counts_found_items_scoring_at_least_the_exact_kth() -> None:
    rows = np.array([1, 2, 3, 4, 5])
    vectors = np.array([[5.0], [4.0], [4.0], [2.0], [1.0]], dtype=np.float32)  # rows 2, 3 tie
    queries = np.ones((3, 1), dtype=np.float32)
    kth = exact_kth_scores(rows, vectors, queries, k=2)
    np.testing.assert_array_equal(kth, [4.0, 4.0, 4.0])
    found = np.array([[1, 3], [1, 4], [5, -1]])  # a tie counts; a miss and -1 do not
    assert recall_at_k(found[:1], queries[:1], rows, vectors, kth[:1]) == 1.0
    assert recall_at_k(found[1:2], queries[1:2], rows, vectors, kth[1:2]) == 0.5
    assert recall_at_k(found, queries, rows, vectors, kth) == pytest.approx((2 + 1 + 0) / 6)


def test_sampled_queries_are_the_models_user_vectors(service_artifacts: Path) -> None:
    checkpoint = load_checkpoint(service_artifacts / "markets" / "aa")
    rows, vectors = market_vectors(checkpoint)
    first = sample_queries(checkpoint, rows, 40, seed=3)
    again = sample_queries(checkpoint, rows, 40, seed=3)
    assert first.tune.shape == first.check.shape == (20, vectors.shape[1])
    np.testing.assert_array_equal(first.tune, again.tune)
    # half the queries are one item each: the model's own encoding of a single-item session
    with torch.inference_mode():
        singles = checkpoint.model.encode(torch.as_tensor(rows)[:, None],
                                          torch.full((len(rows),), checkpoint.market_row))
    queries = np.concatenate([first.tune, first.check])
    distance = np.linalg.norm(queries[:, None, :] - singles.numpy()[None], axis=2)  # (Q, N)
    assert (distance.min(axis=1) < 1e-4).sum() >= 20
    brute = np.sort(queries @ vectors.T, axis=1)[:, -10]  # (Q,) the 10th best score
    np.testing.assert_allclose(exact_kth_scores(rows, vectors, queries), brute, rtol=1e-5)


@pytest.mark.parametrize("kind, params", [
    ("hnsw", {"m", "ef_construction", "ef_search"}),
    ("ivf", {"nlist", "nprobe"}),
    ("ivf-sq8", {"nlist", "nprobe", "refine"}),
    ("ivf-pq4", {"nlist", "nprobe", "refine"}),
])
def test_approximate_index_records_kind_parameters_and_recall(
        artifacts_copy: Path, kind: str, params: set[str]) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    # 2 IVF lists searched both: tiny markets need every list for the floor
    options = IndexOptions(kind=kind, nlist=2, nprobe=2, recall_queries=200)
    manifest = build_index(market_dir, options)
    assert manifest.kind == {"ivf-sq8": "ivf_sq8", "ivf-pq4": "ivf_pq4"}.get(kind, f"{kind}_ip")
    assert set(manifest.params) == params
    assert manifest.recall_at_10 is not None and manifest.recall_at_10 >= 0.95
    assert manifest.recall_queries == 100 and manifest.search_p50_ms is not None
    assert read_index_manifest(market_dir) == manifest
    checkpoint = load_checkpoint(market_dir)
    index = load_index(market_dir, checkpoint, "faiss", "cpu")
    assert not index.exact
    # at this size the tuned search finds the exact top-10 of real user vectors
    rows, vectors = market_vectors(checkpoint)
    queries = sample_queries(checkpoint, rows, 50, seed=11).check
    _, found = index.search.search(torch.from_numpy(queries), 10)
    kth = exact_kth_scores(rows, vectors, queries)
    assert recall_at_k(found, queries, rows, vectors, kth) == 1.0
    np.testing.assert_array_equal(np.sort(index.rows), np.sort(rows))


def test_auto_is_exact_up_to_its_size_and_ivf_pq4_above(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "bb"
    n_items = read_index_manifest(market_dir).n_items
    exact = build_index(market_dir, IndexOptions(exact_max_items=n_items))
    assert exact.kind == "flat_ip" and exact.params == {} and exact.recall_at_10 is None
    above = build_index(market_dir, IndexOptions(exact_max_items=n_items - 1, nlist=2, nprobe=2,
                                                 recall_queries=100))
    assert above.kind == "ivf_pq4" and above.params == {"nlist": 2, "nprobe": 2, "refine": 24}
    assert build_index(market_dir).kind == "flat_ip"  # the default keeps small markets exact


def test_ivf_pq4_refuses_a_market_too_small_to_train_its_codes() -> None:
    import faiss

    from service.index import _ivf

    with pytest.raises(IndexBuildError, match="ivf_pq4 needs at least 16 items .* sells 10"):
        _ivf(faiss, "ivf_pq4", 8, 1, 10)
    assert _ivf(faiss, "ivf_pq4", 8, 1, 16).by_residual


def test_auto_builds_hnsw_where_ivf_falls_short_of_the_floor(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    # 16 lists with one searched cannot reach the floor (next test); auto then tries HNSW
    manifest = build_index(market_dir, IndexOptions(exact_max_items=10, nlist=16, nprobe=1,
                                                    recall_queries=100))
    assert manifest.kind == "hnsw_ip" and manifest.recall_at_10 is not None
    assert manifest.recall_at_10 >= 0.95


def test_auto_builds_the_exact_index_where_no_approximate_one_reaches_the_floor(
        artifacts_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    hopeless = IndexOptions(exact_max_items=10, nlist=16, nprobe=1, ef_search=1, hnsw_m=2,
                            recall_queries=100)
    with pytest.raises(IndexRecallError, match="hnsw_ip recall@10"):  # asked for by name
        build_index(market_dir, replace(hopeless, kind="hnsw"))
    with caplog.at_level(logging.WARNING, logger="service.index"):
        manifest = build_index(market_dir, hopeless)
    assert manifest.kind == "flat_ip" and manifest.recall_at_10 is None
    assert "building hnsw instead" in caplog.text and "building flat instead" in caplog.text
    checkpoint = load_checkpoint(market_dir)
    assert load_index(market_dir, checkpoint, "faiss", "cpu").exact


def test_index_below_the_recall_floor_is_refused_and_the_old_one_keeps_serving(
        artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    before = (market_dir / INDEX_MANIFEST).read_bytes()
    files = sorted(p.name for p in market_dir.iterdir())
    # 16 lists with one searched cannot find the exact top-10 of most queries
    with pytest.raises(IndexRecallError, match=r"recall@10=0\.\d+ .* below the floor 0\.95"):
        build_index(market_dir, IndexOptions(kind="ivf", nlist=16, nprobe=1))
    assert (market_dir / INDEX_MANIFEST).read_bytes() == before
    assert sorted(p.name for p in market_dir.iterdir()) == files
    checkpoint = load_checkpoint(market_dir)
    assert load_index(market_dir, checkpoint, "faiss", "cpu").manifest.kind == "flat_ip"


def test_index_build_command_prints_recall_and_refuses_below_the_floor(
        artifacts_copy: Path) -> None:
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                "--index", "hnsw", "--recall-queries", "100"])
    assert built.exit_code == 0, built.output
    lines = [line for line in built.output.splitlines() if ": index " in line]
    assert [line.split(":")[0] for line in lines] == ["aa", "bb", "cc"]
    assert all("kind=hnsw_ip" in line and "recall@10=" in line for line in lines)
    exact = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                "--market", "cc"])
    assert "kind=flat_ip" in exact.output and "recall@10=1.000 (exact)" in exact.output
    before = (artifacts_copy / "markets" / "aa" / INDEX_MANIFEST).read_bytes()
    refused = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                  "--index", "ivf", "--nlist", "16", "--nprobe", "1"])
    assert refused.exit_code == 1
    assert "aa: refused:" in refused.output and "not replaced" in refused.output
    assert (artifacts_copy / "markets" / "aa" / INDEX_MANIFEST).read_bytes() == before
    fixed = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                "--market", "bb", "--index", "ivf-pq4", "--nlist", "2",
                                "--nprobe", "2", "--refine", "8", "--recall-queries", "100"])
    assert fixed.exit_code == 0, fixed.output
    assert "kind=ivf_pq4 nlist=2 refine=8 nprobe=2" in fixed.output
    assert read_index_manifest(artifacts_copy / "markets" / "bb").params["refine"] == 8
    bad = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                              "--index", "annoy"])
    assert bad.exit_code == 1 and "one of auto, flat, ivf, hnsw, ivf-sq8, ivf-pq4" in bad.output


def test_index_whose_file_is_not_its_manifests_kind_is_refused(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "cc"
    data = json.loads((market_dir / INDEX_MANIFEST).read_text())
    data.update(kind="hnsw_ip", params={"m": 32, "ef_construction": 40, "ef_search": 64})
    (market_dir / INDEX_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match="says hnsw_ip .* holds IndexFlatIP"):
        load_index(market_dir, load_checkpoint(market_dir), "faiss", "cpu")


@pytest.mark.parametrize("version", [2, 3])
def test_index_whose_encoder_holds_the_item_table_asks_for_a_rebuild(
        artifacts_copy: Path, version: int) -> None:
    """Schema 2 and 3 encoders hold the item table; schema 4 takes the shared table's rows."""
    market_dir = artifacts_copy / "markets" / "cc"
    data = json.loads((market_dir / INDEX_MANIFEST).read_text())
    data["schema_version"] = version
    (market_dir / INDEX_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match=rf"schema_version {version}, .*xmr index build"):
        load_index(market_dir, load_checkpoint(market_dir), "faiss", "cpu")


def test_markets_route_reports_the_index_kind_and_its_recall(artifacts_copy: Path,
                                                             make_service_client) -> None:  # type: ignore[no-untyped-def]
    build_index(artifacts_copy / "markets" / "aa",
                IndexOptions(kind="hnsw", recall_queries=100))
    with make_service_client(artifacts=artifacts_copy) as client:
        markets = {m["market"]: m for m in client.get("/markets").json()["markets"]}
        assert markets["aa"]["index"] == "hnsw_ip" and markets["aa"]["exact"] is False
        assert markets["aa"]["index_params"]["ef_search"] >= 16
        assert markets["aa"]["recall_at_10"] >= 0.95
        assert markets["bb"]["index"] == "flat_ip" and markets["bb"]["exact"] is True
        assert markets["bb"]["recall_at_10"] is None
        response = client.post("/markets/aa/recommend", json={"items": [], "k": 3})
        assert response.status_code == 200
    # torch search scores every item: exact whatever the index file holds
    bundle = load_bundle(artifacts_copy, ["aa"], "torch", "cpu")
    assert bundle.market("aa").index.exact
