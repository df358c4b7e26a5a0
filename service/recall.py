"""Recall of an approximate index against exact search, measured at build time on query vectors
the market's own model makes. No FAISS here: `service.index` passes its searches in.

Queries are user vectors encoded by the checkpoint's model (the served encoder's module) from
two kinds of sessions, half each: 1 to 20 items drawn in proportion to the market's interaction
counts (the head, where most traffic is), and one item drawn uniformly from the items the market
sells (the tail). Exact search is the reference: every item of the market scored by one matmul,
and a found item counts when it scores at least the exact k-th best (`recall_at_k`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.search import TorchSearch
from training.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

RECALL_K = 10
MAX_SESSION_ITEMS = 20
EXACT_BLOCK = 64  # queries per exact matmul: (64, N) scores stay small at a million items

Searcher = Callable[[np.ndarray, int], np.ndarray]  # (Q, D) queries, k -> (Q, k) rows


@dataclass(frozen=True)
class Queries:
    """Query vectors split in two: one half chooses search parameters, the other checks them,
    so the recall reported is not the one the parameters were fitted to."""

    tune: np.ndarray  # (Q/2, D) float32
    check: np.ndarray  # (Q - Q/2, D) float32


@dataclass(frozen=True)
class Tuned:
    """A search parameter's value and what it gave on the check queries."""

    value: int
    recall: float  # recall@10 on the check queries
    n_queries: int  # check queries
    search_p50_ms: float  # one query at a time, on the calling thread's FAISS threads
    search_p99_ms: float
    tried: dict[int, float]  # value -> recall@10 on the tune queries


def sample_queries(checkpoint: Checkpoint, rows: np.ndarray, n_queries: int,
                   seed: int = 0) -> Queries:
    """`n_queries` user vectors of sessions drawn from the market (see the module docstring)."""
    assert checkpoint.info.items is not None
    rng = np.random.default_rng(seed)
    counts = checkpoint.info.items.counts.astype(np.float64)  # (N,), in the order of `rows`
    n_head = n_queries // 2
    cdf = np.cumsum(counts) / counts.sum()
    lengths = rng.integers(1, MAX_SESSION_ITEMS + 1, size=n_head)
    # drawn with replacement, repeats dropped: a session holds an item once
    sessions = [rows[np.unique(np.minimum(np.searchsorted(cdf, rng.random(n)), len(rows) - 1))]
                for n in lengths]
    sessions += [rows[[i]] for i in rng.integers(len(rows), size=n_queries - n_head)]
    vectors = encode_sessions(checkpoint, sessions)
    order = rng.permutation(n_queries)  # mix head and tail into both halves
    half = n_queries // 2
    return Queries(vectors[order[:half]], vectors[order[half:]])


def encode_sessions(checkpoint: Checkpoint, sessions: Sequence[np.ndarray],
                    batch: int = 256) -> np.ndarray:
    """(Q, D) float32 user vectors of item-row sessions, by the checkpoint's model."""
    model = checkpoint.model
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(sessions), batch):
            chunk = sessions[start:start + batch]
            width = max(len(s) for s in chunk)
            items = np.zeros((len(chunk), width), dtype=np.int64)  # (B, T), PAD = 0
            for i, session in enumerate(chunk):
                items[i, :len(session)] = session
            market = torch.full((len(chunk),), checkpoint.market_row, device=device)
            users = model.encode(torch.as_tensor(items, device=device), market)  # (B, D)
            out.append(users.float().cpu().numpy())
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def exact_kth_scores(rows: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                     k: int = RECALL_K) -> np.ndarray:
    """(Q,) each query's exact k-th best score over the market's items: the reference."""
    search = TorchSearch(rows, vectors, "cpu")
    found = [search.search(torch.from_numpy(queries[i:i + EXACT_BLOCK]), k)[0][:, k - 1]
             for i in range(0, len(queries), EXACT_BLOCK)]
    return np.concatenate(found)


def recall_at_k(found: np.ndarray, queries: np.ndarray, rows: np.ndarray,
                vectors: np.ndarray, kth: np.ndarray) -> float:
    """Mean share of the k places whose found item scores at least the exact k-th best score.

    By score, not by item: items with equal vectors (two items only ever bought together, say)
    tie, and exact search itself may return either; a tie found is a hit (as ann-benchmarks
    counts it), and float rounding between two searches is no miss."""
    position = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    valid = (found >= 0) & (found < len(position))
    at = np.where(valid, position[np.where(valid, found, 0)], -1)  # (Q, k) index positions
    scores = np.einsum("qd,qkd->qk", queries, vectors[np.maximum(at, 0)])  # (Q, k)
    hits = (at >= 0) & (scores >= (kth - 1e-5 * np.abs(kth) - 1e-6)[:, None])
    return float(hits.sum() / found.size)


def search_latency_ms(search: Searcher, queries: np.ndarray, k: int = RECALL_K,
                      n: int = 200) -> tuple[float, float]:
    """p50 and p99 of one query at a time (ms), over the first `n` queries."""
    times = []
    for query in queries[:n]:
        started = time.perf_counter()
        search(query[None, :], k)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def tune(search: Searcher, set_value: Callable[[int], None], values: Sequence[int],
         queries: Queries, rows: np.ndarray, vectors: np.ndarray, floor: float) -> Tuned:
    """The smallest of `values` (cheapest first) whose recall@10 on the tune queries reaches
    `floor`, or the last one tried; then its recall and latency on the check queries."""
    kth_tune = exact_kth_scores(rows, vectors, queries.tune)
    kth_check = exact_kth_scores(rows, vectors, queries.check)
    tried: dict[int, float] = {}
    for value in values:
        set_value(value)
        found = search(queries.tune, RECALL_K)
        tried[value] = recall_at_k(found, queries.tune, rows, vectors, kth_tune)
        logger.debug("recall tuning value=%d recall@10=%.4f", value, tried[value])
        if tried[value] >= floor:
            break
    recall = recall_at_k(search(queries.check, RECALL_K), queries.check, rows, vectors,
                         kth_check)
    p50, p99 = search_latency_ms(search, queries.check)
    return Tuned(value, recall, len(queries.check), p50, p99, tried)
