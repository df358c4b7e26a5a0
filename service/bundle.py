"""What the service serves: one loaded model + index per market (a `Bundle`), and the `Registry`
that swaps whole bundles on reload, so a request sees one consistent set of versions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np

from service.artifacts import resolve_set
from service.errors import (
    ArtifactsError,
    IndexLoadError,
    ReloadError,
    ServiceError,
    UnknownMarketError,
)
from service.index import MarketIndex, load_index
from service.onnx_encoder import OnnxEncoder
from training.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    Tables,
    load_checkpoint,
    read_checkpoint_info,
)
from training.item_table import MarketItems
from training.ranker import BoundRanker, ItemVectors, RankerError, bind, load_ranker

if TYPE_CHECKING:
    from service.encoder import Encoder

logger = logging.getLogger(__name__)


class PopularItems(Sequence[tuple[str, int]]):
    """A market's (item id, interactions), most popular first, read from its sold-item arrays
    as they are asked for: no list of every item per market."""

    def __init__(self, items: MarketItems) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items.sold)

    def __getitem__(self, at: int | slice) -> Any:
        vocab = self.items.table.vocab
        if isinstance(at, slice):
            return [(vocab.item_id(int(r)), int(c)) for r, c in
                    zip(self.items.sold[at], self.items.counts[at], strict=True)]
        return vocab.item_id(int(self.items.sold[at])), int(self.items.counts[at])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        vocab = self.items.table.vocab
        for row, count in zip(self.items.sold.tolist(), self.items.counts.tolist(),
                              strict=True):
            yield vocab.item_id(row), count


@dataclass(frozen=True)
class MarketModel:
    """A market's fine-tuned checkpoint with the index built from it."""

    market: str
    checkpoint: CheckpointInfo  # the model itself only inside a torch encoder
    index: MarketIndex
    popular: PopularItems  # (item id, interactions), most popular first
    device: str  # "cpu", "cuda" or "cuda:N"
    encoder: Encoder  # the checkpoint's encoder in its serving form
    ranker: BoundRanker | None = None  # the second stage; None: the model's own ranking

    @property
    def ranking(self) -> str:
        """What orders the answers: "two-stage" (retrieval + fitted ranker) or "model"."""
        return "model" if self.ranker is None else "two-stage"

    @property
    def model_version(self) -> str:
        return self.checkpoint.version

    @property
    def index_version(self) -> str:
        return self.index.manifest.version

    @property
    def n_items(self) -> int:
        return len(self.index.rows)


@dataclass(frozen=True)
class Bundle:
    markets: dict[str, MarketModel]
    loaded_at: str

    def market(self, market: str) -> MarketModel:
        try:
            return self.markets[market]
        except KeyError:
            raise UnknownMarketError(market, sorted(self.markets)) from None


def resolve_device(device: str) -> str:
    """"cpu", "cuda" or "cuda:N"; only a CUDA (or "auto") request imports torch."""
    if device == "cpu":
        return device
    try:
        import torch
    except ImportError:
        if device == "auto":
            return "cpu"
        raise ArtifactsError(f"device {device!r} needs torch, which is not installed") from None
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactsError(f"device {device!r} requested but torch sees no CUDA device")
    return str(torch.device(device))


def uses_torch(device: str, search: str, encoder: str) -> bool:
    """Whether serving so runs torch: on a GPU, with torch search or a torch encoder. The CPU
    default (ONNX Runtime + FAISS) never imports it."""
    return device != "cpu" or search == "torch" or encoder in ("torch", "cuda-graphs")


def discover_markets(artifacts: Path) -> list[str]:
    """Markets with a checkpoint under `artifacts/markets/`."""
    root = artifacts / "markets"
    if not root.is_dir():
        raise ArtifactsError(f"{root}: no markets directory; run `xmr train` first")
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def market_encoder(checkpoint: CheckpointInfo, index: MarketIndex, kind: str, device: str,
                   threads: int, tables: Tables | None = None) -> Encoder:
    """The encoder that serves: "auto" is ONNX Runtime on the CPU, CUDA graphs on a GPU;
    "torch" is the eager torch encoder on either (these two load the model, with torch)."""
    if kind == "auto":
        kind = "onnx" if device == "cpu" else "cuda-graphs"
    if kind in ("torch", "cuda-graphs"):
        from service.encoder import CudaGraphEncoder, SessionEncoder

        if kind == "cuda-graphs" and not device.startswith("cuda"):
            raise ArtifactsError(f"encoder 'cuda-graphs' needs a CUDA device, not {device}; "
                                 "use encoder 'onnx', 'torch' or 'auto' on the CPU")
        model = load_checkpoint(checkpoint.path, map_location=device, tables=tables).model
        if kind == "torch":
            return SessionEncoder(model, checkpoint.market_row)
        graphed = CudaGraphEncoder(SessionEncoder(model, checkpoint.market_row))
        graphed.capture_all()
        return graphed
    if device != "cpu":
        raise ArtifactsError(f"encoder 'onnx' runs on the CPU only, not on {device}; "
                             "use encoder 'torch' or 'auto' with a GPU")
    assert checkpoint.items is not None
    try:
        return OnnxEncoder(index.encoder_path, checkpoint.items, checkpoint.max_len, threads)
    except Exception as e:  # ONNX Runtime's own error types (bad graph, bad file)
        raise IndexLoadError(f"{index.encoder_path}: ONNX Runtime cannot load it ({e}); "
                             "rebuild with `xmr index build`") from e


def load_market(artifacts: Path, market: str, search: str, device: str,
                encoder: str = "auto", threads: int = 1,
                tables: Tables | None = None) -> MarketModel:
    """One market; `tables` holds the item tables already read (markets sharing their global
    checkpoint's table share one memory map of it)."""
    market_dir = artifacts / "markets" / market
    checkpoint = read_checkpoint_info(market_dir, tables)
    if checkpoint.market != market or checkpoint.items is None:
        raise ArtifactsError(f"{market_dir}: not the market checkpoint of {market!r}")
    index = load_index(market_dir, checkpoint, search, device.split(":")[0])
    return MarketModel(market, checkpoint, index, PopularItems(checkpoint.items), device,
                       market_encoder(checkpoint, index, encoder, device, threads, tables),
                       market_ranker(market_dir, checkpoint, index))


# The ranker scores a few hundred candidates per request by their vectors. Computing them from
# the shared item table on each request (SoldVectors) costs ~3x the rest of the features, so a
# market whose vectors fit in this many bytes keeps them as one float32 array; larger markets
# (a million-item catalogue) compute them per request and hold no copy.
RANKER_DENSE_BYTES = 32 << 20


def ranker_vectors(index: MarketIndex) -> Any:
    """The vectors the ranker reads: the index's own, as one float32 array where they fit in
    RANKER_DENSE_BYTES, else as the index gives them (computed when indexed)."""
    n, d = index.vectors.shape
    if isinstance(index.vectors, np.ndarray) or n * d * 4 > RANKER_DENSE_BYTES:
        return index.vectors
    return np.asarray(index.vectors, dtype=np.float32)


def market_ranker(market_dir: Path, checkpoint: CheckpointInfo, index: MarketIndex
                  ) -> BoundRanker | None:
    """The market's fitted ranker joined to its index, or None (with a warning) where
    `xmr train` wrote none: the model's inner-product ranking then serves."""
    try:
        ranker = load_ranker(market_dir, checkpoint.weights_sha256, checkpoint.vocab.n_rows)
        if ranker is None:
            logger.warning("no ranker market=%s path=%s: serving the model's own ranking; "
                           "`xmr train` fits one", checkpoint.market, market_dir)
            return None
        return bind(ranker, ItemVectors(index.rows, ranker_vectors(index), index.position),
                    checkpoint.max_len)
    except (RankerError, ValueError) as e:
        raise ArtifactsError(f"{market_dir}: {e}") from e


def load_bundle(
    artifacts: Path, markets: list[str] | None, search: str, device: str,
    encoder: str = "auto", threads: int = 1,
) -> Bundle:
    """Load every market (or the `markets` subset) of the current artifact set, resolved once;
    any failure fails the whole bundle."""
    artifacts = resolve_set(artifacts)
    resolved = resolve_device(device)
    names = markets or discover_markets(artifacts)
    if not names:
        raise ArtifactsError(f"{artifacts}: no market checkpoints found")
    loaded: dict[str, MarketModel] = {}
    tables: Tables = {}  # one item table per global checkpoint, for every market
    for market in names:
        try:
            loaded[market] = load_market(artifacts, market, search, resolved, encoder, threads,
                                         tables)
        except CheckpointError as e:
            raise ArtifactsError(str(e)) from e
        logger.info("market loaded market=%s model_version=%s index_version=%s n_items=%d",
                    market, loaded[market].model_version, loaded[market].index_version,
                    loaded[market].n_items)
    return Bundle(loaded, datetime.now(UTC).isoformat(timespec="seconds"))


def settle_heap() -> None:
    """Put what a load left on the heap out of the cyclic GC's way (`gc.freeze`).

    Loading the 7 XMarket markets leaves about 230,000 objects tracked by the GC: vocabularies,
    item lists and tensors' Python parts. A full collection walks them all, and each one took
    136 ms on the event loop (measured). That matched the p99 at concurrency 32. Frozen objects
    are still freed by reference counting. Unfreezing first lets a reload's old bundle be
    collected; its one collection is a single pause per reload."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Registry:
    """Holds the current bundle. Reload builds a new one off to the side, then swaps the one
    reference; requests read `current` once, so a response never mixes versions."""

    def __init__(self, load: Callable[[], Bundle], bundle: Bundle) -> None:
        self._load = load
        self._current = bundle
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Bundle:
        return self._current

    async def reload(self) -> Bundle:
        async with self._lock:
            try:
                bundle = await anyio.to_thread.run_sync(self._load)
            except (ServiceError, CheckpointError, OSError) as e:
                message = getattr(e, "message", str(e))
                logger.error("reload failed, keeping the current bundle: %s", message)
                raise ReloadError(
                    f"reload failed, still serving the previous models: {message}"
                ) from e
            self._current = bundle
            settle_heap()
            logger.info("reloaded markets=%s", ",".join(sorted(bundle.markets)))
            return bundle
