"""Non-neural baselines of the evaluation harness: most-popular and item-to-item ItemKNN.

Both return a `Scorer` (sessions -> (B, N) scores), so they are ranked by the same
`rank_split` path, on the same candidates, as Bert4XMR.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from training.evaluate import Scorer, evaluate_split
from training.ranker import count_pairs
from training.split import MarketSplit


def popularity(split: MarketSplit, n_rows: int) -> torch.Tensor:
    """Training interactions per item row in the split's market: (N,) float64."""
    return torch.as_tensor(split.train_counts(n_rows), dtype=torch.float64)


def pop_scorer(split: MarketSplit, n_rows: int) -> Scorer:
    """The market's most-popular list, the same for every session.

    Equal counts are broken by a fixed order (lower row first), added as a fraction below 1 so
    it never reorders different counts. Without it every tied item would count against the
    target (metrics are pessimistic about ties); with it the target gets one fixed, arbitrary
    place among its equals, as a served most-popular list would.
    """
    rows = torch.arange(n_rows, dtype=torch.float64)
    scores = popularity(split, n_rows) + (n_rows - rows) / (2.0 * n_rows)  # (N,)

    def score(sessions: list[list[int]]) -> torch.Tensor:
        return scores.expand(len(sessions), -1)  # (B, N)

    return score


def cooccurrence_similarity(sequences: Sequence[Sequence[int]], n_rows: int) -> torch.Tensor:
    """Cosine item-item similarity of item occurrence over users, as a sparse COO (N, N).

    sim(i, j) = |users with i and j| / sqrt(|users with i| * |users with j|), diagonal zero.
    """
    pairs = count_pairs(sequences, n_rows, ordered=False)
    i, j = pairs.keys // n_rows, pairs.keys % n_rows
    return torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([i, j])), torch.as_tensor(pairs.cosine(), dtype=torch.float32),
        (n_rows, n_rows), is_coalesced=True, check_invariants=True,
    )


def itemknn_scorer(similarity: torch.Tensor, decay: float = 1.0) -> Scorer:
    """Score of item i = sum over the session's items t of decay**age_t * sim(t, i), age 0
    the newest item (decay 1: the plain sum).

    Items similar to none of the session's items all score 0; they tie, and ties count against
    the target, so ItemKNN gets no credit for an item it cannot place.
    """
    n_rows = similarity.shape[0]

    def score(sessions: list[list[int]]) -> torch.Tensor:
        present = torch.zeros(n_rows, len(sessions), dtype=torch.float32)  # (N, B)
        for b, session in enumerate(sessions):
            if session:
                rows = torch.as_tensor(session, dtype=torch.long)
                ages = torch.arange(len(session) - 1, -1, -1, dtype=torch.float32)
                # a repeated item keeps its newest weight (index_put keeps the last write)
                present[rows, b] = decay ** ages
        return torch.sparse.mm(similarity, present).T.contiguous()  # (B, N); sim is symmetric

    return score


RECENCY_DECAYS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


def choose_decay(split: MarketSplit, similarity: torch.Tensor,
                 decays: Sequence[float] = RECENCY_DECAYS) -> float:
    """The recency decay of `itemknn_scorer` with the best validation NDCG@10 in this market
    (validation items only; the first of equals)."""
    scores = [evaluate_split(split, itemknn_scorer(similarity, d), "valid")["ndcg@10"]
              for d in decays]
    return decays[int(np.argmax(scores))]
