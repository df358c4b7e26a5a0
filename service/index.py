"""Per-market serving artifacts: a FAISS index of the market's item vectors and the market's
encoder exported to ONNX. Built from a market checkpoint, written atomically with a manifest
that ties both to the checkpoint's weights, loaded and checked. The only module that imports
`faiss`, and only on first use: a GPU host serving with torch search needs no FAISS.

Index kinds: `flat_ip` (exact, `IndexFlatIP`), and two approximate ones for large catalogues,
`ivf_ip` (`IndexIVFFlat`) and `hnsw_ip` (`IndexHNSWFlat`), all inner product over the
unnormalised vectors and wrapped in `IndexIDMap` (ids = item rows). An approximate index is
built only when asked for, or by `auto` above `IndexOptions.exact_max_items`; its search
parameter (nprobe, efSearch) is tuned at build time to reach `min_recall` recall@10 against
exact search (`service.recall`), and an index that cannot reach it is refused, nothing written.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from service import recall
from service.errors import IndexLoadError, IndexMismatchError, IndexRecallError
from service.export import export_onnx
from service.search import Search, TorchSearch
from training.checkpoint import Checkpoint, file_sha256, load_checkpoint

logger = logging.getLogger(__name__)

INDEX_MANIFEST = "index.json"
SCHEMA_VERSION = 3  # 2: the exported encoder joined the index; 3: approximate kinds
READABLE_VERSIONS = (2, 3)  # a schema-2 manifest is a flat_ip one without the new fields
IndexKind = Literal["flat_ip", "ivf_ip", "hnsw_ip"]
INDEX_CHOICES = ("auto", "flat", "ivf", "hnsw")
# `auto` builds the exact index up to this many items: one query over 100K items x 64 took
# about 1 ms on one core here, over 1M items 15 ms (benchmarks/README.md, scale benchmark).
EXACT_MAX_ITEMS = 100_000
# Tried in order, steps of about 1.5x: at 1M items nprobe 64 gave recall@10 0.951 in 1.1 ms,
# 96 gave 0.974 in 1.4 ms and 128 0.986 in 2.2 ms (benchmarks/README.md, scale benchmark).
IVF_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # <= nlist / 4
# Tuning aims this far above the floor on one half of the queries, so that the other half,
# which decides, does not miss the floor by the sampling noise of 500 queries (~0.01).
TUNE_MARGIN = 0.01
HNSW_EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class IndexOptions:
    """How `build_index` builds: the kind, the recall floor and the parameters it may tune."""

    kind: str = "auto"  # auto, flat, ivf or hnsw
    exact_max_items: int = EXACT_MAX_ITEMS  # auto: flat up to this many items, ivf above
    min_recall: float = 0.95  # recall@10 against exact search that an approximate index needs
    recall_queries: int = 1000  # query vectors sampled for tuning (half) and checking (half)
    seed: int = 0
    nlist: int | None = None  # IVF lists; default about sqrt(N), a power of two
    nprobe: int | None = None  # IVF lists searched; default the smallest meeting the floor
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 40
    ef_search: int | None = None  # HNSW; default the smallest meeting the floor

    def __post_init__(self) -> None:
        if self.kind not in INDEX_CHOICES:
            raise ValueError(f"index kind {self.kind!r}: one of {', '.join(INDEX_CHOICES)}")
        if not 0.0 < self.min_recall <= 1.0:
            raise ValueError(f"min_recall {self.min_recall} must lie in (0, 1]")
        if self.recall_queries < 2:
            raise ValueError("recall_queries must be at least 2")

    def resolve(self, n_items: int) -> IndexKind:
        """The kind to build for a market of `n_items` items."""
        if self.kind == "auto":
            return "flat_ip" if n_items <= self.exact_max_items else "ivf_ip"
        return _KINDS[self.kind]


_KINDS: dict[str, IndexKind] = {"flat": "flat_ip", "ivf": "ivf_ip", "hnsw": "hnsw_ip"}


class _SchemaVersion(BaseModel):
    schema_version: int


class IndexManifest(BaseModel):
    """`index.json`: which `index-<version>.faiss` serves the market, built from which weights."""

    schema_version: int = SCHEMA_VERSION
    kind: IndexKind = "flat_ip"
    params: dict[str, int] = {}  # ivf_ip: nlist, nprobe; hnsw_ip: m, ef_construction, ef_search
    recall_at_10: float | None = None  # against exact search; None for the exact flat_ip
    recall_queries: int = 0  # query vectors that measured it (the check half)
    search_p50_ms: float | None = None  # one query, one thread, on the building machine
    build_seconds: float | None = None  # the FAISS index alone (and its tuning)
    market: str
    index_file: str
    version: str  # first 12 hex digits of the index file's sha256
    sha256: str
    encoder_file: str  # encoder-<12 hex>.onnx: the market's encoder (service.export)
    encoder_sha256: str
    weights_sha256: str
    model_version: str
    n_items: int
    dim: int
    built_at: str


@dataclass
class MarketIndex:
    """A loaded, checked index: item rows and their vectors in index order, plus a search."""

    manifest: IndexManifest
    rows: np.ndarray  # (N,) item rows sold in the market
    vectors: np.ndarray  # (N, D) market-shifted item vectors, float32, never normalised
    position: np.ndarray  # (n_rows,) index position of each item row, -1 if not in the market
    search: Search
    encoder_path: Path  # the checked ONNX export of the market's encoder

    @property
    def exact(self) -> bool:
        """Whether searches return the exact top-K (flat FAISS, or torch over every item)."""
        return self.manifest.kind == "flat_ip" or isinstance(self.search, TorchSearch)

    def score(self, user: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact scores of the given item rows (all in the index) for one user vector (D,)."""
        return self.vectors[self.position[rows]] @ user.astype(np.float32)  # (len(rows),)


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


def market_vectors(checkpoint: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the items sold in the checkpoint's market and their vectors v_m(i): (N,), (N, D)."""
    if checkpoint.market_items is None:
        raise IndexLoadError(f"{checkpoint.path}: not a market checkpoint")
    rows = np.asarray(checkpoint.vocab.indices(checkpoint.market_items), dtype=np.int64)  # (N,)
    with torch.inference_mode():
        vectors = checkpoint.model.item_vectors(checkpoint.market_row)  # (n_rows, D)
    picked = vectors.float().cpu().numpy()[rows]  # (N, D)
    return rows, np.ascontiguousarray(picked, dtype=np.float32)


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_addressed(market_dir: Path, prefix: str, suffix: str,
                     write: Callable[[Path], None]) -> tuple[str, str]:
    """Write through a temporary file to `<prefix>-<sha12><suffix>`; (file name, sha256)."""
    tmp = market_dir / f".{prefix}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        sha = file_sha256(tmp)
        name = f"{prefix}-{sha[:12]}{suffix}"
        os.replace(tmp, market_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, sha


def build_index(market_dir: Path, options: IndexOptions | None = None) -> IndexManifest:
    """Write `index-<version>.faiss` and `encoder-<sha>.onnx`, then atomically replace
    `index.json`; the files of earlier builds go. An approximate index below the recall floor
    raises `IndexRecallError` before anything is written: the current index keeps serving."""
    options = options or IndexOptions()
    checkpoint = load_checkpoint(market_dir)
    manifest = checkpoint.manifest
    rows, vectors = market_vectors(checkpoint)
    built = _build_faiss(checkpoint, rows, vectors, options)
    faiss = _faiss()
    index_file, sha = _write_addressed(market_dir, "index", ".faiss",
                                       lambda path: faiss.write_index(built.index, str(path)))
    encoder_file, encoder_sha = _write_addressed(
        market_dir, "encoder", ".onnx",
        lambda path: export_onnx(checkpoint.model, checkpoint.market_row, path),
    )
    result = IndexManifest(
        kind=built.kind, params=built.params, recall_at_10=built.recall,
        recall_queries=built.recall_queries, search_p50_ms=built.search_p50_ms,
        build_seconds=round(built.seconds, 3),
        market=str(manifest.market), index_file=index_file, version=sha[:12], sha256=sha,
        encoder_file=encoder_file, encoder_sha256=encoder_sha,
        weights_sha256=manifest.weights_sha256, model_version=manifest.version,
        n_items=len(rows), dim=int(vectors.shape[1]),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    tmp_manifest = market_dir / f".{INDEX_MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _fsync_write(tmp_manifest, result.model_dump_json(indent=2) + "\n")
        os.replace(tmp_manifest, market_dir / INDEX_MANIFEST)
    finally:
        tmp_manifest.unlink(missing_ok=True)
    for old in [*market_dir.glob("index-*.faiss"), *market_dir.glob("encoder-*.onnx")]:
        if old.name not in (index_file, encoder_file):
            old.unlink(missing_ok=True)
    logger.info("index built market=%s version=%s kind=%s params=%s n_items=%d recall@10=%s "
                "seconds=%.2f", result.market, result.version, result.kind, result.params,
                result.n_items, result.recall_at_10, built.seconds)
    return result


@dataclass(frozen=True)
class _Built:
    index: Any  # IndexIDMap over the kind's index, ids = item rows
    kind: IndexKind
    params: dict[str, int]
    recall: float | None
    recall_queries: int
    search_p50_ms: float | None
    seconds: float


def _build_faiss(checkpoint: Checkpoint, rows: np.ndarray, vectors: np.ndarray,
                 options: IndexOptions) -> _Built:
    """The market's FAISS index in memory; an approximate one tuned and checked for recall."""
    faiss = _faiss()
    n, d = vectors.shape
    kind = options.resolve(n)
    started = time.perf_counter()
    if kind == "flat_ip":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        index.add_with_ids(vectors, rows)
        return _Built(index, kind, {}, None, 0, None, time.perf_counter() - started)
    if kind == "ivf_ip":
        nlist = options.nlist or default_nlist(n)
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.cp.seed = options.seed
        # 64 training points per list: FAISS's k-means wants at least 39, and its default
        # sample of 256 per list is 4x the k-means work
        sample = np.random.default_rng(options.seed).choice(n, size=min(n, 64 * nlist),
                                                            replace=False)
        inner.train(vectors[np.sort(sample)])
        params = {"nlist": nlist}
        values = [options.nprobe] if options.nprobe else [v for v in IVF_NPROBES
                                                           if v <= max(1, nlist // 4)]
        name = "nprobe"

        def set_value(value: int) -> None:
            inner.nprobe = value
    else:
        inner = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = options.ef_construction
        params = {"m": options.hnsw_m, "ef_construction": options.ef_construction}
        values = [options.ef_search] if options.ef_search else list(HNSW_EF_SEARCHES)
        name = "ef_search"

        def set_value(value: int) -> None:
            inner.hnsw.efSearch = value
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(vectors, rows)
    queries = recall.sample_queries(checkpoint, rows, options.recall_queries, options.seed)

    def search(batch: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(index.search(batch, k)[1])

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the latency recorded is one query on one thread
    try:
        tuned = recall.tune(search, set_value, values, queries, rows, vectors,
                            min(1.0, options.min_recall + TUNE_MARGIN))
    finally:
        faiss.omp_set_num_threads(threads)
    params[name] = tuned.value
    if tuned.recall < options.min_recall:
        tried = ", ".join(f"{name}={v}: {r:.3f}" for v, r in tuned.tried.items())
        raise IndexRecallError(
            f"{checkpoint.path}: {kind} recall@10={tuned.recall:.3f} on {len(queries.check)} "
            f"query vectors is below the floor {options.min_recall} with {name}={tuned.value} "
            f"(on the tuning queries {tried}); nothing written, the current index keeps "
            f"serving. Use a larger {name}, --index flat, or a lower --min-recall"
        )
    return _Built(index, kind, params, round(tuned.recall, 4), len(queries.check),
                  round(tuned.search_p50_ms, 4), time.perf_counter() - started)


def default_nlist(n_items: int) -> int:
    """About sqrt(N) lists, a power of two: 1024 at a million items, where a list holds ~1,000
    vectors and k-means on 64 points per list trains in seconds; at most N/39 lists, the
    fewest points per list FAISS's k-means accepts without a warning."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n_items))))
    return max(1, min(nlist, n_items // 39))


def read_index_manifest(market_dir: Path) -> IndexManifest:
    path = market_dir / INDEX_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: missing; run `xmr index build`") from None
    try:
        # The version first: an index of another version fails on its fields otherwise, and
        # the message would not say what to do.
        version = _SchemaVersion.model_validate_json(text).schema_version
        if version not in READABLE_VERSIONS:
            raise IndexLoadError(f"{path}: schema_version {version}, this reader knows "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild with "
                                 "`xmr index build`")
        return IndexManifest.model_validate_json(text)
    except ValidationError as e:
        raise IndexLoadError(f"{path}: invalid index manifest ({e.error_count()} errors: "
                             f"{e.errors()[0]['msg']})") from e


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads for searches made from the calling thread (OpenMP counts are per
    thread). The default, one per core, left idle threads spinning after each small search:
    a second core burnt at no gain (measured). Nothing to set without FAISS."""
    try:
        faiss = _faiss()
    except IndexLoadError:
        return
    faiss.omp_set_num_threads(threads)


def gpu_faiss_available() -> bool:
    get_num_gpus = getattr(_faiss(), "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


class FaissSearch:
    """FAISS inner-product search over an `IndexIDMap`: exact (flat) on the CPU or a GPU,
    approximate (IVF, HNSW) on the CPU with the manifest's search parameter."""

    def __init__(self, index: Any, gpu: bool = False) -> None:
        self.kind = "faiss"
        if gpu:
            faiss = _faiss()
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
            self.kind = "faiss-gpu"
        self.index = index

    def search(self, users: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(users.detach().float().cpu().numpy())  # (B, D)
        scores, rows = self.index.search(queries, k)  # (B, k) each; -1 rows where missing
        return scores, rows


def load_index(market_dir: Path, checkpoint: Checkpoint, search: str, device: str) -> MarketIndex:
    """Read the market's index, refusing one that does not belong to `checkpoint`."""
    manifest = read_index_manifest(market_dir)
    expected = checkpoint.manifest.weights_sha256
    if manifest.weights_sha256 != expected:
        raise IndexMismatchError(
            f"{market_dir / INDEX_MANIFEST}: built from weights {manifest.weights_sha256[:12]}, "
            f"but the checkpoint holds {expected[:12]}; rebuild with `xmr index build`"
        )
    path = _checked_file(market_dir, "index_file", manifest.index_file, manifest.sha256)
    encoder_path = _checked_file(market_dir, "encoder_file", manifest.encoder_file,
                                 manifest.encoder_sha256)
    if search == "torch":
        # The weights are the index's (checked above): the vectors come from them, no FAISS.
        rows, vectors = market_vectors(checkpoint)
        return MarketIndex(manifest, rows, vectors, _positions(checkpoint, rows),
                           TorchSearch(rows, vectors, device), encoder_path)
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))  # keep this owner alive: downcasts borrow from it
    except RuntimeError as e:
        raise IndexLoadError(f"{path}: unreadable FAISS index ({e})") from e
    inner = _checked_kind(faiss, index, manifest, path)
    rows = faiss.vector_to_array(index.id_map).astype(np.int64)  # (N,)
    if manifest.kind == "ivf_ip":
        inner.make_direct_map()  # IVF vectors sit in their lists; this finds them by position
    vectors = inner.reconstruct_n(0, index.ntotal)  # (N, D)
    sold = checkpoint.market_items or {}
    expected_rows = np.sort(np.asarray(checkpoint.vocab.indices(sold), dtype=np.int64))
    if index.d != checkpoint.manifest.model_config.d_model or not np.array_equal(
            np.sort(rows), expected_rows):
        raise IndexMismatchError(f"{path}: items or width differ from the checkpoint's market")
    backend: Search
    if device == "cpu":
        backend = FaissSearch(index)
    elif manifest.kind == "flat_ip" and gpu_faiss_available():
        backend = FaissSearch(index, gpu=True)
    else:  # a GPU without FAISS GPU, or an approximate kind: exact top-K in torch on the GPU
        backend = TorchSearch(rows, vectors, device)
    return MarketIndex(manifest, rows, vectors, _positions(checkpoint, rows), backend,
                       encoder_path)


# The FAISS class inside the IndexIDMap of each kind, and where its search parameter goes.
_INNER = {"flat_ip": "IndexFlatIP", "ivf_ip": "IndexIVFFlat", "hnsw_ip": "IndexHNSWFlat"}


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
    try:
        if manifest.kind == "ivf_ip":
            inner.nprobe = manifest.params["nprobe"]
        elif manifest.kind == "hnsw_ip":
            inner.hnsw.efSearch = manifest.params["ef_search"]
    except KeyError as e:
        raise IndexLoadError(f"{path.parent / INDEX_MANIFEST}: {manifest.kind} without its "
                             f"search parameter {e}; rebuild with `xmr index build`") from e
    return inner


def _positions(checkpoint: Checkpoint, rows: np.ndarray) -> np.ndarray:
    """(n_rows,) index position of each item row, -1 where the market does not sell it."""
    position = np.full(checkpoint.vocab.n_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    return position


def _checked_file(market_dir: Path, field: str, name: str, sha256: str) -> Path:
    """A file named by index.json's `field`: in the market directory, present, not corrupt."""
    path = market_dir / name
    prefix = field.removesuffix("_file") + "-"
    if path.parent != market_dir or not path.name.startswith(prefix):
        raise IndexLoadError(f"{market_dir / INDEX_MANIFEST}: bad {field} {name!r}")
    if not path.is_file():
        raise IndexLoadError(f"{path}: missing (named by {INDEX_MANIFEST})")
    if file_sha256(path) != sha256:
        raise IndexLoadError(f"{path}: sha256 does not match {INDEX_MANIFEST} (corrupt file)")
    return path

