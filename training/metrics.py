"""Ranking metrics for leave-one-out evaluation: ranks of the held-out item, HR@k and NDCG@k."""

from __future__ import annotations

import numpy as np
import torch

KS = (5, 10, 20)
METRIC_NAMES = tuple(f"{name}@{k}" for k in KS for name in ("hr", "ndcg"))


def rank_of_target(
    scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """0-based rank of each row's target among its candidates; ties count against the target.

    scores (B, N), target (B,) column of the target, candidates (B, N) bool, target included.
    Counting ties as ranked above is the pessimistic convention: a model cannot gain by
    scoring many items equally.
    """
    target_score = scores.gather(1, target[:, None])  # (B, 1)
    at_least = (scores >= target_score) & candidates
    return at_least.sum(dim=1) - 1  # the target itself is counted once


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) if it is in the top k."""
    if not len(ranks):
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)
    return float(np.mean(gains))


def summarize(ranks: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in KS:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out
