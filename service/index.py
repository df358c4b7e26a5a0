"""Per-market serving artifacts: a FAISS index of the market's item vectors and the market's
encoder exported to ONNX. Built from a market checkpoint, written atomically with a manifest
that ties both to the checkpoint's weights, loaded and checked. The only module that imports
`faiss`, and only on first use: a GPU host serving with torch search needs no FAISS.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ValidationError

from service.errors import IndexLoadError, IndexMismatchError
from service.search import Search, TorchSearch, as_numpy
from training.checkpoint import Checkpoint, CheckpointInfo, file_sha256, load_checkpoint

if TYPE_CHECKING:  # torch only where an index is built or searched with torch
    import torch

logger = logging.getLogger(__name__)

INDEX_MANIFEST = "index.json"
SCHEMA_VERSION = 2  # 2: the exported encoder joined the index


class _SchemaVersion(BaseModel):
    schema_version: int


class IndexManifest(BaseModel):
    """`index.json`: which `index-<version>.faiss` serves the market, built from which weights."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["flat_ip"] = "flat_ip"
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
    import torch

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


def build_index(market_dir: Path) -> IndexManifest:
    """Write `index-<version>.faiss` and `encoder-<sha>.onnx`, then atomically replace
    `index.json`; the files of earlier builds go."""
    from service.export import export_onnx

    checkpoint = load_checkpoint(market_dir)
    manifest = checkpoint.manifest
    rows, vectors = market_vectors(checkpoint)
    faiss = _faiss()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, rows)
    index_file, sha = _write_addressed(market_dir, "index", ".faiss",
                                       lambda path: faiss.write_index(index, str(path)))
    encoder_file, encoder_sha = _write_addressed(
        market_dir, "encoder", ".onnx",
        lambda path: export_onnx(checkpoint.model, checkpoint.market_row, path),
    )
    result = IndexManifest(
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
    logger.info("index built market=%s version=%s n_items=%d", result.market, result.version,
                result.n_items)
    return result


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
        if version != SCHEMA_VERSION:
            raise IndexLoadError(f"{path}: schema_version {version}, this reader knows "
                                 f"{SCHEMA_VERSION}; rebuild with `xmr index build`")
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
    """FAISS exact inner-product search (`IndexIDMap(IndexFlatIP)`), on a GPU when asked."""

    def __init__(self, index: Any, gpu: bool = False) -> None:
        self.kind = "faiss"
        if gpu:
            faiss = _faiss()
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
            self.kind = "faiss-gpu"
        self.index = index

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_numpy(users)  # (B, D)
        scores, rows = self.index.search(queries, k)  # (B, k) each; -1 rows where missing
        return scores, rows


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
    path = _checked_file(market_dir, "index_file", manifest.index_file, manifest.sha256)
    encoder_path = _checked_file(market_dir, "encoder_file", manifest.encoder_file,
                                 manifest.encoder_sha256)
    if search == "torch":
        # The weights are the index's (checked above): the vectors come from them, no FAISS.
        rows, vectors = market_vectors(load_checkpoint(market_dir))
        return MarketIndex(manifest, rows, vectors, _positions(checkpoint, rows),
                           TorchSearch(rows, vectors, device), encoder_path)
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))  # keep this owner alive: downcasts borrow from it
    except RuntimeError as e:
        raise IndexLoadError(f"{path}: unreadable FAISS index ({e})") from e
    if not isinstance(index, faiss.IndexIDMap):
        raise IndexLoadError(
            f"{path}: expected IndexIDMap(IndexFlatIP), got {type(index).__name__}"
        )
    flat = faiss.downcast_index(index.index)
    rows = faiss.vector_to_array(index.id_map).astype(np.int64)  # (N,)
    vectors = flat.reconstruct_n(0, index.ntotal)  # (N, D)
    sold = checkpoint.market_items or {}
    expected_rows = set(checkpoint.vocab.indices(sold))
    if index.d != checkpoint.d_model or set(rows.tolist()) != expected_rows:
        raise IndexMismatchError(f"{path}: items or width differ from the checkpoint's market")
    backend: Search
    if device == "cpu" or gpu_faiss_available():
        backend = FaissSearch(index, gpu=device != "cpu")
    else:  # a GPU without FAISS GPU: exact top-K in torch on the device
        backend = TorchSearch(rows, vectors, device)
    return MarketIndex(manifest, rows, vectors, _positions(checkpoint, rows), backend,
                       encoder_path)


def _positions(checkpoint: CheckpointInfo, rows: np.ndarray) -> np.ndarray:
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

