"""Non-neural baselines of the evaluation harness: most-popular, item-to-item ItemKNN and EASE.

Each returns a `Scorer` (sessions -> (B, N) scores), so they are ranked by the same
`rank_split` path, on the same candidates, as Bert4XMR. ItemKNN and EASE read one count of the
item pairs of all markets' training sessions (`training.ranker.count_pairs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from training.evaluate import Scorer, evaluate_split
from training.ranker import PairCounts
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


def cooccurrence_similarity(pairs: PairCounts) -> torch.Tensor:
    """Cosine item-item similarity of item occurrence over users, as a sparse COO (N, N), from
    the unordered pair counts of the sessions (`count_pairs(..., ordered=False)`).

    sim(i, j) = |users with i and j| / sqrt(|users with i| * |users with j|), diagonal zero.
    """
    n_rows = len(pairs.item_users)
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


def item_gram(pairs: PairCounts) -> torch.Tensor:
    """G = X^T X, (N, N) float32, X the users x items matrix with 1 where the user has the item
    (a user's repeated item counts once): users sharing each pair of items, users per item on
    the diagonal, from the unordered pair counts ItemKNN reads (no dense X)."""
    n_rows = len(pairs.item_users)
    gram = torch.zeros(n_rows, n_rows, dtype=torch.float32)
    gram.view(-1)[torch.as_tensor(pairs.keys)] = torch.as_tensor(pairs.users,
                                                                  dtype=torch.float32)
    gram.diagonal().copy_(torch.as_tensor(pairs.item_users, dtype=torch.float32))
    return gram


def ease_weights(gram: torch.Tensor, l2: float) -> torch.Tensor:
    """EASE's item-item weights (Steck, WWW 2019), (N, N) float32: with P = (G + l2 I)^-1,
    B_ij = -P_ij / P_jj and B_ii = 0, the ridge regression of each item's column of X on the
    other items' under the constraint of a zero diagonal. Dense: N^2 floats and an N^3
    inverse, a harness baseline for catalogues of some ten thousand items."""
    regularised = gram.clone()
    regularised.diagonal().add_(l2)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(regularised))
    del regularised
    weights = precision.div_(-precision.diagonal().clone()[None, :])
    weights.fill_diagonal_(0.0)
    return weights


def ease_scorer(weights: torch.Tensor) -> Scorer:
    """Score of item j = sum over the session's distinct items i of B_ij."""
    n_rows = weights.shape[0]

    def score(sessions: list[list[int]]) -> torch.Tensor:
        present = torch.zeros(len(sessions), n_rows, dtype=torch.float32)  # (B, N)
        for b, session in enumerate(sessions):
            if session:
                present[b, torch.as_tensor(session, dtype=torch.long)] = 1.0
        return (present @ weights).double()

    return score


# EASE's weights are a dense n_items^2 matrix inverted whole (two or three copies of it are
# alive at once): 20K items take about 1.6 GB a copy, so the harness runs it up to there.
EASE_MAX_ITEMS = 20_000
EASE_L2S = (300.0, 800.0)  # validation, seed 0: best of 50-5000 were 300 (full), 800 (acmr)


def choose_ease(splits: Sequence[MarketSplit], gram: torch.Tensor,
                l2s: Sequence[float] = EASE_L2S) -> tuple[float, torch.Tensor]:
    """EASE's L2 weight with the best mean validation NDCG@10 over `splits` (validation items
    only; the first of equals) and its weights: one matrix shared by every market, as the
    co-occurrence of ItemKNN is."""
    best: tuple[float, float, torch.Tensor] | None = None
    for l2 in l2s:
        weights = ease_weights(gram, l2)
        scorer = ease_scorer(weights)
        mean = float(np.mean([evaluate_split(s, scorer, "valid")["ndcg@10"] for s in splits]))
        if best is None or mean > best[0]:
            best = (mean, l2, weights)
    assert best is not None, "no L2 weights to choose from"
    return best[1], best[2]
