"""Ranking metrics against hand-computed rankings, and rank_split under each candidate rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.evaluate import rank_split
from training.metrics import METRIC_NAMES, hit_rate, ndcg, rank_of_target, summarize
from training.split import MarketSplit


def test_rank_counts_higher_scored_candidates() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([2, 3])
    everything = torch.ones_like(scores, dtype=torch.bool)
    assert rank_of_target(scores, target, everything).tolist() == [1, 0]


def test_rank_ignores_items_that_are_not_candidates() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1]])
    candidates = torch.tensor([[False, True, True, True]])
    assert rank_of_target(scores, torch.tensor([2]), candidates).tolist() == [0]


def test_ties_count_against_the_target() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.2]])
    everything = torch.ones_like(scores, dtype=torch.bool)
    assert rank_of_target(scores, torch.tensor([0]), everything).tolist() == [2]
    assert rank_of_target(scores, torch.tensor([3]), everything).tolist() == [3]


def test_hit_rate_and_ndcg_by_hand() -> None:
    ranks = np.array([0, 1, 4, 9, 10, 25])
    assert hit_rate(ranks, 5) == pytest.approx(3 / 6)
    assert hit_rate(ranks, 10) == pytest.approx(4 / 6)
    assert hit_rate(ranks, 20) == pytest.approx(5 / 6)
    expected5 = (1.0 + 1 / math.log2(3) + 1 / math.log2(6)) / 6
    expected10 = expected5 + (1 / math.log2(11)) / 6
    expected20 = expected10 + (1 / math.log2(12)) / 6
    assert ndcg(ranks, 5) == pytest.approx(expected5)
    assert ndcg(ranks, 10) == pytest.approx(expected10)
    assert ndcg(ranks, 20) == pytest.approx(expected20)


def test_summarize_names_every_metric_and_handles_no_users() -> None:
    summary = summarize(np.array([0]))
    assert tuple(summary) == METRIC_NAMES
    assert all(value == 1.0 for value in summary.values())
    assert all(value == 0.0 for value in summarize(np.zeros(0, dtype=np.int64)).values())


def _split(negatives: np.ndarray | None) -> MarketSplit:
    """One market of items 1..6; user 0 trained on [1], valid 2, test 3."""
    return MarketSplit(
        market="aa", protocol="forec" if negatives is not None else "full", seed=0,
        users=["u0"], train=[[1]], eval_users=np.array([0]), valid=np.array([2]),
        test=np.array([3]), market_items=np.arange(1, 7),
        valid_negatives=negatives, test_negatives=negatives,
    )


def _fixed_scorer(row_scores: list[float]):  # type: ignore[no-untyped-def]
    scores = torch.tensor(row_scores)

    def score(sessions: list[list[int]]) -> torch.Tensor:
        return scores.expand(len(sessions), -1)

    return score


def test_full_ranking_excludes_history_and_items_not_sold() -> None:
    # rows:        pad  1    2    3    4    5    6    7 (not sold in the market)
    row_scores = [9.0, 8.0, 7.0, 5.0, 6.0, 1.0, 0.5, 10.0]
    scorer = _fixed_scorer(row_scores)
    # test: history [1, 2] is excluded, row 7 and the padding row are not candidates,
    # so only row 4 (6.0) is above the target 3 (5.0)
    assert rank_split(_split(None), scorer, "test").tolist() == [1]
    # valid: target 2 (7.0); history [1] excluded; nothing above it
    assert rank_split(_split(None), scorer, "valid").tolist() == [0]


def test_sampled_ranking_uses_only_the_given_negatives() -> None:
    row_scores = [9.0, 8.0, 7.0, 5.0, 6.0, 1.0, 0.5, 10.0]
    negatives = np.array([[5, 6, 7]])  # 7 scores above the target, 5 and 6 below
    ranks = rank_split(_split(negatives), _fixed_scorer(row_scores), "test")
    assert ranks.tolist() == [1]
