"""Per-market serving artifacts: a FAISS index of the market's item vectors and the market's
encoder exported to ONNX. Built from a market checkpoint, written atomically with a manifest
that ties both to the checkpoint's weights, loaded and checked. The only module that imports
`faiss`, and only on first use: a GPU host serving with torch search needs no FAISS.

All kinds (`service.index_manifest`) are inner product over the unnormalised vectors in an
`IndexIDMap` (ids = item rows). An approximate one is tuned at build time to a recall floor
against exact search (`service.recall`); one that cannot reach it is refused, nothing written.
`ivf_sq8` (8-bit codes) and `ivf_pq4` (4-bit codes, one per dimension, scanned by FAISS's fast
scan) re-rank `refine` x k hits by their exact vectors, computed from the item table all markets
share (`service.search.rerank`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import IndexBuildError, IndexLoadError, IndexMismatchError, IndexRecallError
from service.index_manifest import (
    HNSW_EF_SEARCHES,
    INDEX_MANIFEST,
    IVF_NPROBES,
    PQ4_CENTROIDS,
    TUNE_MARGIN,
    IndexKind,
    IndexManifest,
    IndexOptions,
    checked_file,
    default_nlist,
    read_index_manifest,
    write_addressed,
    write_index_manifest,
)
from service.search import FaissSearch, MarketIndex, RowVectors, Search, TorchSearch
from training.checkpoint import Checkpoint, CheckpointInfo, Tables, load_checkpoint
from training.item_table import SoldVectors

if TYPE_CHECKING:
    from service.recall import Tuned

logger = logging.getLogger(__name__)


def _faiss() -> Any:
    # FAISS's loader logs each CPU-specific build it fails to find (AVX-512, AVX2) at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as e:
        raise IndexLoadError(
            "FAISS is not installed (faiss-cpu, or faiss-gpu): build indexes where it is, or "
            "serve with XMR_SEARCH=torch, which needs only torch"
        ) from e
    return faiss


def market_vectors(checkpoint: Checkpoint | CheckpointInfo) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the items sold in the checkpoint's market and their vectors v_m(i): (N,), (N, D),
    computed as serving computes them (`MarketItems.vectors`, no torch)."""
    info = checkpoint.info if isinstance(checkpoint, Checkpoint) else checkpoint
    if info.items is None:
        raise IndexLoadError(f"{info.path}: not a market checkpoint")
    rows = info.items.sold  # (N,)
    return rows, info.items.vectors(rows)


def build_index(market_dir: Path, options: IndexOptions | None = None,
                tables: Tables | None = None) -> IndexManifest:
    """Write `index-<version>.faiss` and `encoder-<sha>.onnx`, then replace `index.json`
    atomically. Below the recall floor: `IndexRecallError` (an `IndexBuildError`, as is a kind
    the market cannot have), nothing written (`auto` falls back,
    `IndexOptions.fallbacks`). `tables`: item tables already read, shared across markets."""
    from service.export import export_onnx

    options = options or IndexOptions()
    checkpoint = load_checkpoint(market_dir, tables=tables)
    manifest = checkpoint.manifest
    rows, vectors = market_vectors(checkpoint)
    started = time.perf_counter()
    fallbacks = options.fallbacks()
    while True:
        try:
            index, kind, params, tuned = _build_faiss(checkpoint, rows, vectors, options)
            break
        except IndexBuildError as e:
            if not fallbacks:
                raise
            options = replace(options, kind=fallbacks.pop(0))
            logger.warning("auto: %s; building %s instead", e.message, options.kind)
    seconds = time.perf_counter() - started
    faiss = _faiss()
    index_file, sha = write_addressed(market_dir, "index", ".faiss",
                                       lambda path: faiss.write_index(index, str(path)))
    encoder_file, encoder_sha = write_addressed(
        market_dir, "encoder", ".onnx",
        lambda path: export_onnx(checkpoint.model, checkpoint.market_row, path),
    )
    result = IndexManifest(
        kind=kind, params=params, build_seconds=round(seconds, 3),
        recall_at_10=None if tuned is None else round(tuned.recall, 4),
        recall_queries=0 if tuned is None else tuned.n_queries,
        search_p50_ms=None if tuned is None else round(tuned.search_p50_ms, 4),
        market=str(manifest.market), index_file=index_file, version=sha[:12], sha256=sha,
        encoder_file=encoder_file, encoder_sha256=encoder_sha,
        weights_sha256=manifest.weights_sha256, model_version=manifest.version,
        n_items=len(rows), dim=int(vectors.shape[1]),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_index_manifest(market_dir, result)
    for old in [*market_dir.glob("index-*.faiss"), *market_dir.glob("encoder-*.onnx")]:
        if old.name not in (index_file, encoder_file):
            old.unlink(missing_ok=True)
    logger.info("index built market=%s version=%s kind=%s params=%s n_items=%d recall@10=%s "
                "seconds=%.2f", result.market, result.version, result.kind, result.params,
                result.n_items, result.recall_at_10, seconds)
    return result


def _build_faiss(checkpoint: Checkpoint, rows: np.ndarray, vectors: np.ndarray,
                 options: IndexOptions) -> tuple[Any, IndexKind, dict[str, int], Tuned | None]:
    """The market's FAISS index (an IndexIDMap, ids = item rows) in memory, its kind and
    parameters; an approximate one tuned and checked for recall (`Tuned`)."""
    from service import recall  # here: it needs torch, which serving does without

    faiss = _faiss()
    n, d = vectors.shape
    kind = options.resolve(n)
    if kind == "flat_ip":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        index.add_with_ids(vectors, rows)
        return index, kind, {}, None
    refine = options.refine_for(kind)
    if kind in ("ivf_ip", "ivf_sq8", "ivf_pq4"):
        nlist = options.nlist or default_nlist(n, kind)
        inner = _ivf(faiss, kind, d, nlist, n)
        inner.cp.seed = options.seed
        # 64 training points per list: k-means wants 39 or more; FAISS's default, 256, is 4x
        sample = np.random.default_rng(options.seed).choice(n, size=min(n, 64 * nlist),
                                                            replace=False)
        inner.train(vectors[np.sort(sample)])
        params = {"nlist": nlist} if refine == 1 else {"nlist": nlist, "refine": refine}
        values = [options.nprobe] if options.nprobe else [v for v in IVF_NPROBES
                                                           if v <= max(1, nlist // 4)]
    else:
        inner = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = options.ef_construction
        params = {"m": options.hnsw_m, "ef_construction": options.ef_construction}
        values = [options.ef_search] if options.ef_search else list(HNSW_EF_SEARCHES)
    name, set_value = _search_parameter(kind, inner)
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(vectors, rows)
    queries = recall.sample_queries(checkpoint, rows, options.recall_queries, options.seed)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the latency recorded is one query on one thread
    searcher = FaissSearch(index, refine=refine, exact=RowVectors.of_array(rows, vectors))
    try:
        tuned = recall.tune(lambda batch, k: searcher.search(batch, k)[1], set_value, values,
                            queries, rows, vectors, min(1.0, options.min_recall + TUNE_MARGIN))
    finally:
        faiss.omp_set_num_threads(threads)
    params[name] = tuned.value
    if tuned.recall < options.min_recall:
        tried = ", ".join(f"{name}={v}: {r:.3f}" for v, r in tuned.tried.items())
        raise IndexRecallError(
            f"{checkpoint.path}: {kind} recall@10={tuned.recall:.3f} on {tuned.n_queries} "
            f"query vectors is below the floor {options.min_recall} with {name}={tuned.value} "
            f"(on the tuning queries {tried}); nothing written, the current index keeps "
            f"serving. Use a larger {name}, --index flat, or a lower --min-recall"
        )
    return index, kind, params, tuned


def _ivf(faiss: Any, kind: IndexKind, d: int, nlist: int, n: int) -> Any:
    """An untrained IVF index of `kind` with `nlist` lists over `n` vectors of width `d`."""
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "ivf_ip":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, metric)
    if kind == "ivf_sq8":
        return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist,
                                             faiss.ScalarQuantizer.QT_8bit, metric)
    if n < PQ4_CENTROIDS:
        raise IndexBuildError(f"ivf_pq4 needs at least {PQ4_CENTROIDS} items to train its "
                              f"codes, the market sells {n}: use --index flat")
    # one 4-bit code per dimension, of the residual to the vector's list centroid
    inner = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, d, 4, metric)
    inner.by_residual = True
    # 16 centroids on one number each: a few points per centroid do (FAISS warns below 39,
    # once per dimension, in every small market)
    inner.pq.cp.min_points_per_centroid = 1
    return inner


def _search_parameter(kind: IndexKind, inner: Any) -> tuple[str, Callable[[int], None]]:
    """An approximate kind's search parameter: its name in index.json, and its setter."""
    if kind in ("ivf_ip", "ivf_sq8", "ivf_pq4"):
        return "nprobe", partial(setattr, inner, "nprobe")
    return "ef_search", partial(setattr, inner.hnsw, "efSearch")


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads for searches from the calling thread (counts are per thread). The
    default, one per core, left idle threads spinning after each small search (measured)."""
    try:
        faiss = _faiss()
    except IndexLoadError:
        return
    faiss.omp_set_num_threads(threads)


def gpu_faiss_available() -> bool:
    get_num_gpus = getattr(_faiss(), "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def load_index(market_dir: Path, checkpoint: CheckpointInfo | Checkpoint, search: str,
               device: str) -> MarketIndex:
    """Read the market's index, refusing one that does not belong to `checkpoint`."""
    if isinstance(checkpoint, Checkpoint):
        checkpoint = checkpoint.info
    manifest = read_index_manifest(market_dir)
    expected = checkpoint.weights_sha256
    if manifest.weights_sha256 != expected:
        raise IndexMismatchError(
            f"{market_dir / INDEX_MANIFEST}: built from weights {manifest.weights_sha256[:12]}, "
            f"but the checkpoint holds {expected[:12]}; rebuild with `xmr index build`"
        )
    path = checked_file(market_dir, "index_file", manifest.index_file, manifest.sha256)
    encoder_path = checked_file(market_dir, "encoder_file", manifest.encoder_file,
                                manifest.encoder_sha256)
    assert checkpoint.items is not None
    if search == "torch":  # vectors from the weights checked above, no FAISS
        rows, vectors = market_vectors(checkpoint)
        return MarketIndex.of(manifest, rows, vectors, checkpoint.vocab.n_rows,
                              TorchSearch(rows, vectors, device), encoder_path)
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))  # keep this owner alive: downcasts borrow from it
    except RuntimeError as e:
        raise IndexLoadError(f"{path}: unreadable FAISS index ({e})") from e
    _checked_kind(faiss, index, manifest, path)
    rows = faiss.vector_to_array(index.id_map).astype(np.int64)  # (N,)
    sold = checkpoint.items.sold
    in_order = np.array_equal(rows, sold)  # as build_index adds them
    if index.d != checkpoint.d_model or not (
            in_order or np.array_equal(np.sort(rows), np.sort(sold))):
        raise IndexMismatchError(f"{path}: items or width differ from the checkpoint's market")
    rows = sold if in_order else rows  # one array of rows per market, not two
    served = SoldVectors(checkpoint.items, rows)  # on demand: no float copy per market
    backend: Search
    if device == "cpu":
        backend = FaissSearch(index, refine=manifest.params.get("refine", 1),
                              exact=RowVectors(checkpoint.items.vectors))
    elif manifest.kind == "flat_ip" and gpu_faiss_available():
        resources = faiss.StandardGpuResources()  # the GPU index borrows it: kept beside it
        backend = FaissSearch(faiss.index_cpu_to_gpu(resources, 0, index), kind="faiss-gpu",
                              owner=resources)
    else:  # a GPU without FAISS GPU, or an approximate kind: exact top-K in torch on the GPU
        backend = TorchSearch(rows, np.asarray(served), device)
    return MarketIndex.of(manifest, rows, served, checkpoint.vocab.n_rows, backend,
                          encoder_path)


# The FAISS class inside the IndexIDMap of each kind.
_INNER = {"flat_ip": "IndexFlatIP", "ivf_ip": "IndexIVFFlat", "hnsw_ip": "IndexHNSWFlat",
          "ivf_sq8": "IndexIVFScalarQuantizer", "ivf_pq4": "IndexIVFPQFastScan"}


def _checked_kind(faiss: Any, index: Any, manifest: IndexManifest, path: Path) -> Any:
    """The index inside the file's IndexIDMap, checked against the manifest's kind and metric,
    with the manifest's search parameter set (nprobe, efSearch)."""
    if not isinstance(index, faiss.IndexIDMap):
        raise IndexLoadError(f"{path}: expected an IndexIDMap, got {type(index).__name__}")
    inner = faiss.downcast_index(index.index)
    expected = _INNER[manifest.kind]
    if type(inner).__name__ != expected or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexLoadError(f"{path}: {INDEX_MANIFEST} says {manifest.kind} ({expected}, "
                             f"inner product), the file holds {type(inner).__name__}")
    if manifest.kind != "flat_ip":
        name, set_value = _search_parameter(manifest.kind, inner)
        if name not in manifest.params:
            raise IndexLoadError(f"{path.parent / INDEX_MANIFEST}: {manifest.kind} without its "
                                 f"search parameter {name}; rebuild with `xmr index build`")
        set_value(manifest.params[name])
    return inner
