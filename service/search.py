"""Searching a market's items: the `Search` protocol, exact inner-product top-K in torch (CPU
or GPU, the `torch` backend), search over a loaded FAISS index, and `MarketIndex`, a loaded
index with its search.

Every backend answers `search(users (B, D), k) -> (scores (B, k), rows (B, k))` with row -1
and score -inf where fewer than k items exist, so the recommender treats them alike. User vectors
come from the encoder as a numpy array (ONNX Runtime) or a torch tensor (the torch encoders);
torch is imported only by the torch backend, so serving with FAISS and ONNX Runtime needs none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.index_manifest import IndexManifest
from training.item_table import SoldVectors

if TYPE_CHECKING:
    import torch


class Search(Protocol):
    kind: str

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        ...


def as_numpy(users: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B, D) float32 user vectors on the host, contiguous (FAISS's input)."""
    if not isinstance(users, np.ndarray):
        users = users.detach().float().cpu().numpy()
    return np.ascontiguousarray(users, dtype=np.float32)


class RowVectors:
    """Exact item vectors by item row: `of_rows(rows (F,)) -> (F, D)` float32."""

    def __init__(self, of_rows: Callable[[np.ndarray], np.ndarray]) -> None:
        self.of_rows = of_rows

    @classmethod
    def of_array(cls, rows: np.ndarray, vectors: np.ndarray) -> RowVectors:
        """From vectors (N, D) of `rows` (N,) held in an array (a build's)."""
        position = {int(row): i for i, row in enumerate(rows.tolist())}
        return cls(lambda wanted: vectors[[position[int(r)] for r in wanted.tolist()]])


def rerank(queries: np.ndarray, rows: np.ndarray, exact: RowVectors | None,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's hits `rows` (B, k') by their exact scores, padded like FAISS
    (-inf, -1): the second step of an index with approximate codes (`ivf_sq8`, `ivf_pq4`)."""
    assert exact is not None
    found = rows >= 0
    vectors = exact.of_rows(rows[found])  # (F, D)
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)  # (B, k')
    scores[found] = np.einsum("fd,fd->f", vectors, queries[np.nonzero(found)[0]])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, min(k, k'))
    top = np.take_along_axis(scores, order, axis=1)
    best = np.where(np.isfinite(top), np.take_along_axis(rows, order, axis=1), -1)
    if k > rows.shape[1]:
        top = np.pad(top, ((0, 0), (0, k - rows.shape[1])), constant_values=-np.inf)
        best = np.pad(best, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
    return top, best


class FaissSearch:
    """Search over a FAISS `IndexIDMap` (`service.index` builds and loads it): exact (flat) on
    the CPU or a GPU, approximate (IVF, HNSW) on the CPU with the manifest's search parameter.
    With `refine` > 1 (`ivf_sq8`, `ivf_pq4`: approximate codes) it takes `refine` x k hits and
    orders them by their exact vectors' scores. `owner`: what the index borrows (GPU
    resources), kept alive with it."""

    def __init__(self, index: Any, refine: int = 1, exact: RowVectors | None = None,
                 kind: str = "faiss", owner: object = None) -> None:
        self.kind = kind
        self.index = index
        self.refine = refine
        self.exact = exact
        self._owner = owner

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_numpy(users)  # (B, D)
        if self.refine == 1 or self.exact is None:
            return self.index.search(queries, k)  # (B, k) each; -1 rows where missing
        wide = min(k * self.refine, self.index.ntotal)
        _, rows = self.index.search(queries, wide)  # (B, k') approximate order
        return rerank(queries, rows, self.exact, k)


class TorchSearch:
    """Scores every item of the market with one matmul and keeps the k best (exact)."""

    kind = "torch"

    def __init__(self, rows: np.ndarray, vectors: np.ndarray, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)  # (N,)
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32, device=self.device)  # (N, D)

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        users = torch.as_tensor(users).to(self.device, torch.float32)  # (B, D)
        n = self.vectors.shape[0]
        with torch.inference_mode():
            scores = users @ self.vectors.T  # (B, N)
            top, pos = torch.topk(scores, min(k, n), dim=1)  # (B, k')
            rows = self.rows[pos]
        top_np = top.cpu().numpy()
        rows_np = rows.cpu().numpy()
        if k > n:  # pad like FAISS does
            pad = k - n
            top_np = np.pad(top_np, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows_np = np.pad(rows_np, ((0, 0), (0, pad)), constant_values=-1)
        return top_np, rows_np


@dataclass
class MarketIndex:
    """A loaded, checked index: item rows and their vectors in index order, plus a search."""

    manifest: IndexManifest
    rows: np.ndarray  # (N,) item rows sold in the market
    # (N, D) market-shifted item vectors, float32, never normalised; served, computed on
    # demand from the shared item table (`SoldVectors`: indexing by positions gives an array)
    vectors: np.ndarray | SoldVectors
    position: np.ndarray  # (n_rows,) int32 index position of each item row, -1 if not sold
    search: Search
    encoder_path: Path  # the checked ONNX export of the market's encoder

    @classmethod
    def of(cls, manifest: IndexManifest, rows: np.ndarray, vectors: np.ndarray | SoldVectors,
           n_rows: int, search: Search, encoder_path: Path) -> MarketIndex:
        """The index with `position` computed for a vocabulary of `n_rows` rows."""
        position = np.full(n_rows, -1, dtype=np.int32)  # 4 MB per market at 1M items
        position[rows] = np.arange(len(rows), dtype=np.int32)
        return cls(manifest, rows, vectors, position, search, encoder_path)

    @property
    def exact(self) -> bool:
        """Whether searches return the exact top-K (flat FAISS, or torch over every item)."""
        return self.manifest.kind == "flat_ip" or isinstance(self.search, TorchSearch)

    def score(self, user: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact scores of the given item rows (all in the index) for one user vector (D,)."""
        return self.vectors[self.position[rows]] @ user.astype(np.float32)  # (len(rows),)
