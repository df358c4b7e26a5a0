"""Turning a session into ranked items of one market: resolve ids, encode, search, exclude,
fall back to popular items. Synchronous and CPU/GPU-bound: callers run it in a thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.bundle import MarketModel
from service.search import as_numpy
from training.ranker import rank_session

if TYPE_CHECKING:
    import torch

POPULAR = "popular"


@dataclass(frozen=True)
class Query:
    items: list[str]  # the session, oldest first
    k: int
    exclude_seen: bool = True
    candidates: list[str] | None = None  # rank only these


@dataclass(frozen=True)
class Recommendation:
    items: list[tuple[str, float]]  # (item id, score), best first
    unknown_items: list[str]
    fallback: str | None
    model_version: str
    index_version: str
    rerank_seconds: float | None = None  # the second stage's time for this query, if it ran


@dataclass(frozen=True)
class Resolved:
    """A query in rows: the known session rows, what is excluded, what may be ranked."""

    rows: list[int]
    unknown: list[str]
    excluded: set[int]
    candidates: list[int] | None  # rows sold in the market, deduplicated, or None = all


def resolve(model: MarketModel, query: Query) -> Resolved:
    """Map ids to rows; unknown session items and candidates not sold here are reported."""
    vocab = model.checkpoint.vocab
    rows: list[int] = []
    unknown: list[str] = []
    for item_id in query.items:
        row = vocab.get(item_id)
        if row is None:
            unknown.append(item_id)
        else:
            rows.append(row)
    candidates: list[int] | None = None
    if query.candidates is not None:
        candidates = []
        for item_id in dict.fromkeys(query.candidates):
            row = vocab.get(item_id)
            if row is None or model.index.position[row] < 0:
                unknown.append(item_id)
            else:
                candidates.append(row)
    excluded = set(rows) if query.exclude_seen else set()
    return Resolved(rows, list(dict.fromkeys(unknown)), excluded, candidates)


def popular_items(model: MarketModel, resolved: Resolved, k: int) -> list[tuple[str, float]]:
    """The market's most popular items (score = interactions), minus exclusions."""
    vocab = model.checkpoint.vocab
    items = model.popular.items
    allowed = set(resolved.candidates) if resolved.candidates is not None else None
    out: list[tuple[str, float]] = []
    for row, count in zip(items.sold.tolist(), items.counts.tolist(), strict=True):
        if row in resolved.excluded or (allowed is not None and row not in allowed):
            continue
        out.append((vocab.item_id(row), float(count)))
        if len(out) == k:
            break
    return out


def rank_candidates(
    model: MarketModel, user: np.ndarray, resolved: Resolved, k: int
) -> list[tuple[str, float]]:
    assert resolved.candidates is not None
    rows = [r for r in resolved.candidates if r not in resolved.excluded]
    if not rows:
        return []
    scores = model.index.score(user, rows)  # (C,)
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]))[:k]
    vocab = model.checkpoint.vocab
    return [(vocab.item_id(rows[i]), float(scores[i])) for i in order]


def collect_hits(
    model: MarketModel, scores: np.ndarray, rows: np.ndarray, resolved: Resolved, k: int
) -> list[tuple[str, float]]:
    """Search hits (k') of one user, minus FAISS's -1 misses and excluded rows, cut to k."""
    vocab = model.checkpoint.vocab
    out: list[tuple[str, float]] = []
    for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
        if row < 0 or row in resolved.excluded:
            continue
        out.append((vocab.item_id(row), float(score)))
        if len(out) == k:
            break
    return out


def recommend_many(model: MarketModel, queries: list[Query]) -> list[Recommendation]:
    """Answer several queries of one market with one encoder call and one index search, then
    the market's ranker (where it has one) over each query's candidates."""
    resolved = [resolve(model, q) for q in queries]
    results: list[list[tuple[str, float]] | None] = [None] * len(queries)
    seconds: list[float | None] = [None] * len(queries)
    encoded = [i for i, r in enumerate(resolved) if r.rows]
    if encoded:
        users = model.encoder.encode([resolved[i].rows for i in encoded])  # (B, D)
        if model.ranker is not None:
            _rank_two_stage(model, queries, resolved, encoded, users, results, seconds)
        else:
            _rank_by_model(model, queries, resolved, encoded, users, results)
    return [
        Recommendation(
            items=hits if hits is not None else popular_items(model, r, q.k),
            unknown_items=r.unknown,
            fallback=None if hits is not None else POPULAR,
            model_version=model.model_version,
            index_version=model.index_version,
            rerank_seconds=spent,
        )
        for q, r, hits, spent in zip(queries, resolved, results, seconds, strict=True)
    ]


def _rank_by_model(model: MarketModel, queries: list[Query], resolved: list[Resolved],
                   encoded: list[int], users: np.ndarray | torch.Tensor,
                   results: list[list[tuple[str, float]] | None]) -> None:
    """The model's exact inner-product ranking (a market without a ranker)."""
    searched = [j for j, i in enumerate(encoded) if resolved[i].candidates is None]
    if searched:
        # Excluded rows can only take that many places, so k + |excluded| hits suffice.
        depth = max(queries[encoded[j]].k + len(resolved[encoded[j]].excluded)
                    for j in searched)
        scores, rows = model.index.search.search(users[searched], min(depth, model.n_items))
        for b, j in enumerate(searched):
            i = encoded[j]
            results[i] = collect_hits(model, scores[b], rows[b], resolved[i], queries[i].k)
    user_np = as_numpy(users)  # (B, D)
    for j, i in enumerate(encoded):
        if resolved[i].candidates is not None:
            results[i] = rank_candidates(model, user_np[j], resolved[i], queries[i].k)


def _rank_two_stage(model: MarketModel, queries: list[Query], resolved: list[Resolved],
                    encoded: list[int], users: np.ndarray | torch.Tensor,
                    results: list[list[tuple[str, float]] | None],
                    seconds: list[float | None]) -> None:
    """The served ranking: the index's top `retrieve` plus co-occurring items, re-scored by
    the market's ranker (`training.ranker.rank_session`, the harness's `served` row). Each
    query's `seconds`: its share of the deeper search plus its own re-ranking."""
    ranker = model.ranker
    assert ranker is not None
    searched = [j for j, i in enumerate(encoded) if resolved[i].candidates is None]
    hits = None
    search_share = 0.0
    if searched:
        started = time.perf_counter()
        _, hits = model.index.search.search(users[searched], min(ranker.spec.retrieve,
                                                                 model.n_items))
        search_share = (time.perf_counter() - started) / len(searched)
    user_np = as_numpy(users)  # (B, D)
    vocab = model.checkpoint.vocab
    b = 0
    for j, i in enumerate(encoded):
        query, found = queries[i], resolved[i]
        started = time.perf_counter()
        if found.candidates is None:
            assert hits is not None
            ranked = rank_session(ranker, found.rows, user_np[j], hits[b], None,
                                  found.excluded, query.k)
            b += 1
        else:
            ranked = rank_session(ranker, found.rows, user_np[j], None, found.candidates,
                                  found.excluded, query.k)
        results[i] = [(vocab.item_id(row), score) for row, score in ranked]
        seconds[i] = time.perf_counter() - started + (
            search_share if found.candidates is None else 0.0)
