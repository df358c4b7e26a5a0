"""Index build, load checks, and FAISS top-K against the model's own and torch's top-K."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import load_bundle
from service.errors import ArtifactsError, IndexLoadError, IndexMismatchError
from service.index import INDEX_MANIFEST, build_index, load_index, read_index_manifest
from service.recommender import Query, recommend_many
from training.checkpoint import file_sha256, load_checkpoint, save_checkpoint


def model_top_k(artifacts: Path, market: str, items: list[str], k: int) -> list[tuple[str, float]]:
    """The model's own ranking over the market's items, straight from the checkpoint."""
    ckpt = load_checkpoint(artifacts / "markets" / market)
    assert ckpt.market_items is not None
    rows = torch.as_tensor(ckpt.vocab.indices(items))[None]  # (1, T)
    market_t = torch.tensor([ckpt.market_row])
    with torch.no_grad():
        user = ckpt.model.encode(rows, market_t)[0]  # (D,)
        vectors = ckpt.model.item_vectors(ckpt.market_row)  # (n_rows, D)
    sold = ckpt.vocab.indices(ckpt.market_items)
    scores = vectors[sold] @ user  # (N,)
    order = torch.argsort(scores, descending=True)[:k].tolist()
    return [(ckpt.vocab.item_id(sold[i]), float(scores[i])) for i in order]


def test_build_writes_manifest_tied_to_checkpoint(service_artifacts: Path) -> None:
    market_dir = service_artifacts / "markets" / "aa"
    manifest = read_index_manifest(market_dir)
    ckpt = load_checkpoint(market_dir)
    assert ckpt.market_items is not None
    assert manifest.weights_sha256 == ckpt.manifest.weights_sha256
    assert manifest.model_version == ckpt.manifest.version
    assert manifest.n_items == len(ckpt.market_items)
    assert manifest.index_file == f"index-{manifest.version}.faiss"
    assert (market_dir / manifest.index_file).is_file()


def test_rebuild_is_idempotent_and_removes_old_index_files(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "bb"
    first = read_index_manifest(market_dir)
    (market_dir / "index-000000000000.faiss").write_bytes(b"stale")
    again = build_index(market_dir)
    assert again.version == first.version  # same weights, same bytes
    assert sorted(p.name for p in market_dir.glob("index-*.faiss")) == [again.index_file]
    assert not list(market_dir.glob(".*.tmp"))


@pytest.mark.parametrize("market", ["aa", "bb", "cc"])
def test_faiss_top_k_equals_model_and_torch_top_k(model_ranking_artifacts: Path,
                                                  market: str) -> None:
    faiss_bundle = load_bundle(model_ranking_artifacts, [market], "faiss", "cpu")
    torch_bundle = load_bundle(model_ranking_artifacts, [market], "torch", "cpu")
    popular = [item for item, _ in faiss_bundle.market(market).popular]
    for session in (popular[:1], popular[3:8], popular[10:30:3]):
        query = Query(session, k=20, exclude_seen=False)
        by_faiss = recommend_many(faiss_bundle.market(market), [query])[0].items
        by_torch = recommend_many(torch_bundle.market(market), [query])[0].items
        expected = model_top_k(model_ranking_artifacts, market, session, 20)
        assert [i for i, _ in by_faiss] == [i for i, _ in expected]
        assert [i for i, _ in by_torch] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in by_faiss], [s for _, s in expected], rtol=1e-5)
        np.testing.assert_allclose([s for _, s in by_torch], [s for _, s in expected], rtol=1e-5)


def test_search_beyond_market_size_drops_faiss_missing_ids(service_artifacts: Path) -> None:
    bundle = load_bundle(service_artifacts, ["cc"], "faiss", "cpu")
    model = bundle.market("cc")
    users = model.encoder.encode([[int(model.index.rows[0])]])
    scores, rows = model.index.search.search(users, model.n_items + 5)
    assert (rows[0, -5:] == -1).all()  # FAISS reports missing hits as -1
    item = model.popular[0][0]
    result = recommend_many(model, [Query([item], k=model.n_items + 5, exclude_seen=True)])[0]
    assert len(result.items) == model.n_items - 1
    assert item not in {i for i, _ in result.items}


def test_index_of_other_weights_is_refused(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    ckpt = load_checkpoint(market_dir)
    with torch.no_grad():
        ckpt.model.item_emb.weight.mul_(1.5)
    keep = (INDEX_MANIFEST, read_index_manifest(market_dir).index_file)
    save_checkpoint(market_dir, ckpt.model, ckpt.vocab, ckpt.manifest, ckpt.market_items, keep)
    retrained = load_checkpoint(market_dir)
    with pytest.raises(IndexMismatchError, match="rebuild with `xmr index build`"):
        load_index(market_dir, retrained, "faiss", "cpu")
    build_index(market_dir)
    assert load_index(market_dir, retrained, "faiss", "cpu").manifest.weights_sha256 == (
        retrained.manifest.weights_sha256
    )


def test_corrupt_or_missing_index_is_refused(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "cc"
    ckpt = load_checkpoint(market_dir)
    manifest = read_index_manifest(market_dir)
    with (market_dir / manifest.index_file).open("ab") as f:
        f.write(b"x")
    with pytest.raises(IndexLoadError, match="corrupt"):
        load_index(market_dir, ckpt, "faiss", "cpu")
    (market_dir / manifest.index_file).unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        load_index(market_dir, ckpt, "faiss", "cpu")
    data = json.loads((market_dir / INDEX_MANIFEST).read_text())
    data["index_file"] = "../../global/weights.safetensors"
    (market_dir / INDEX_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match="bad index_file"):
        load_index(market_dir, ckpt, "faiss", "cpu")
    (market_dir / INDEX_MANIFEST).unlink()
    with pytest.raises(IndexLoadError, match="xmr index build"):
        load_index(market_dir, ckpt, "faiss", "cpu")


def test_corrupt_missing_or_unloadable_encoder_is_refused(artifacts_copy: Path) -> None:
    market_dir = artifacts_copy / "markets" / "cc"
    ckpt = load_checkpoint(market_dir)
    manifest = read_index_manifest(market_dir)
    encoder = market_dir / manifest.encoder_file
    good = encoder.read_bytes()
    encoder.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IndexLoadError, match="corrupt"):
        load_index(market_dir, ckpt, "faiss", "cpu")
    encoder.unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        load_index(market_dir, ckpt, "faiss", "cpu")
    # a file that matches its manifest but is no ONNX graph: refused when the bundle loads
    encoder.write_bytes(b"not an onnx graph")
    data = json.loads((market_dir / INDEX_MANIFEST).read_text())
    data["encoder_sha256"] = file_sha256(encoder)
    (market_dir / INDEX_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match="ONNX Runtime cannot load"):
        load_bundle(artifacts_copy, ["cc"], "faiss", "cpu", encoder="onnx")
    assert load_bundle(artifacts_copy, ["cc"], "faiss", "cpu", encoder="torch").markets["cc"]


def test_served_encoders_agree_with_the_checkpoint(service_artifacts: Path) -> None:
    """ONNX Runtime (the CPU default) and the torch serving form give the module's vectors."""
    onnx = load_bundle(service_artifacts, None, "faiss", "cpu")
    plain = load_bundle(service_artifacts, None, "faiss", "cpu", encoder="torch")
    for market, model in onnx.markets.items():
        assert model.encoder.kind == "onnx" and plain.markets[market].encoder.kind == "torch"
        sessions = [[int(r) for r in model.index.rows[i : i + n]] for i, n in
                    [(0, 1), (3, 7), (10, 60)]]
        ckpt = load_checkpoint(model.checkpoint.path)
        with torch.inference_mode():
            want = torch.stack([ckpt.model.encode(torch.tensor([s[-ckpt.model.config.max_len:]]),
                                                  torch.tensor([ckpt.market_row]))[0]
                                for s in sessions])
        torch.testing.assert_close(torch.from_numpy(model.encoder.encode(sessions)), want,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain.markets[market].encoder.encode(sessions), want,
                                   rtol=1e-4, atol=1e-5)


def test_cuda_graphs_encoder_on_the_cpu_is_refused(service_artifacts: Path) -> None:
    with pytest.raises(ArtifactsError, match="'cuda-graphs' needs a CUDA device"):
        load_bundle(service_artifacts, None, "faiss", "cpu", encoder="cuda-graphs")


def test_torch_search_serves_without_faiss(service_artifacts: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without FAISS (the lent GPU machine has none) serves with XMR_SEARCH=torch, the
    same rankings; asking for FAISS there fails naming what is missing."""
    with_faiss = load_bundle(service_artifacts, None, "faiss", "cpu")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    without = load_bundle(service_artifacts, None, "torch", "cpu", encoder="torch")
    for market, model in without.markets.items():
        assert model.index.search.kind == "torch"
        query = Query([i for i, _ in model.popular[:3]], k=5)
        got = recommend_many(model, [query])[0].items
        want = recommend_many(with_faiss.markets[market], [query])[0].items
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4)
    with pytest.raises(IndexLoadError, match="FAISS is not installed"):
        load_bundle(service_artifacts, None, "faiss", "cpu")


def test_index_of_the_previous_schema_asks_for_a_rebuild(artifacts_copy: Path) -> None:
    """Stop-6 indexes (schema 1, no exported encoder) name the fix, not a missing field."""
    market_dir = artifacts_copy / "markets" / "cc"
    data = json.loads((market_dir / INDEX_MANIFEST).read_text())
    data["schema_version"] = 1
    del data["encoder_file"], data["encoder_sha256"]
    (market_dir / INDEX_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match=r"schema_version 1, .*xmr index build"):
        read_index_manifest(market_dir)
    (market_dir / INDEX_MANIFEST).write_text('{"schema_version": "two"}')
    with pytest.raises(IndexLoadError, match="invalid index manifest"):
        read_index_manifest(market_dir)


def test_markets_of_a_bundle_share_one_mapped_item_table(service_artifacts: Path) -> None:
    """`xmr train` writes markets sharing the global table (schema 2): one server maps it once
    and holds no float copy of any market's item vectors."""
    bundle = load_bundle(service_artifacts, None, "faiss", "cpu")
    tables = {id(model.checkpoint.table) for model in bundle.markets.values()}
    assert len(bundle.markets) == 3 and len(tables) == 1
    model = bundle.market("aa")
    assert isinstance(model.checkpoint.table.rows, np.memmap)
    assert model.checkpoint.table.path.resolve() == (service_artifacts / "global").resolve()
    assert not isinstance(model.index.vectors, np.ndarray)  # computed on demand
    rows = model.index.rows[:5]
    ckpt = load_checkpoint(service_artifacts / "markets" / "aa")
    with torch.inference_mode():
        want = ckpt.model.item_vectors(ckpt.market_row)[torch.from_numpy(rows)].numpy()
    np.testing.assert_allclose(model.index.vectors[np.arange(5)], want, rtol=1e-5, atol=1e-5)
