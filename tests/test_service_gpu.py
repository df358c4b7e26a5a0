"""GPU serving: encoding on CUDA with exact torch (or FAISS GPU) search; skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import load_bundle
from service.errors import ArtifactsError
from service.recommender import Query, recommend_many

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_search_equals_cpu_faiss(service_artifacts: Path) -> None:
    cpu = load_bundle(service_artifacts, None, "faiss", "cpu")
    for search in ("torch", "faiss"):  # faiss without FAISS GPU falls back to torch on CUDA
        gpu = load_bundle(service_artifacts, None, search, "cuda")
        for market, model in gpu.markets.items():
            assert model.device.startswith("cuda")
            assert model.index.search.kind in ("torch", "faiss-gpu")
            popular = [i for i, _ in model.popular]
            for session in (popular[:1], popular[2:9]):
                query = Query(session, k=10)
                on_gpu = recommend_many(model, [query])[0].items
                on_cpu = recommend_many(cpu.market(market), [query])[0].items
                assert [i for i, _ in on_gpu] == [i for i, _ in on_cpu]
                np.testing.assert_allclose([s for _, s in on_gpu], [s for _, s in on_cpu],
                                           rtol=1e-4)


def test_app_serves_from_cuda(make_service_client, service_artifacts: Path) -> None:
    from tests.test_api_recommend import popular

    session = popular(service_artifacts, "aa")[:3]
    with make_service_client(device="cuda") as client:
        markets = client.get("/markets").json()["markets"]
        on_gpu = client.post("/markets/aa/recommend", json={"items": session}).json()
    with make_service_client(device="cpu") as client:
        on_cpu = client.post("/markets/aa/recommend", json={"items": session}).json()
    assert {m["device"].split(":")[0] for m in markets} == {"cuda"}
    assert [i["item_id"] for i in on_gpu["items"]] == [i["item_id"] for i in on_cpu["items"]]



def test_cuda_uses_cuda_graphs_or_eager_torch_and_refuses_onnx(service_artifacts: Path) -> None:
    graphed = load_bundle(service_artifacts, None, "torch", "cuda")
    assert {m.encoder.kind for m in graphed.markets.values()} == {"cuda-graphs"}
    eager = load_bundle(service_artifacts, None, "torch", "cuda", encoder="torch")
    assert {m.encoder.kind for m in eager.markets.values()} == {"torch"}
    for market, model in graphed.markets.items():
        query = Query([i for i, _ in model.popular][:5], k=10)
        assert (recommend_many(model, [query])[0].items
                == recommend_many(eager.market(market), [query])[0].items)
    with pytest.raises(ArtifactsError, match="CPU only"):
        load_bundle(service_artifacts, None, "torch", "cuda", encoder="onnx")
