"""Scoring sessions and ranking held-out items under a split's protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from training.metrics import rank_of_target, summarize
from training.model import Bert4XMR
from training.split import MarketSplit
from training.vocab import pad_rows

# Full-ranking users per batch are capped so that a batch holds at most this many scores.
SCORES_PER_BATCH = 1 << 23
# Scores of every item row (B, N) for a batch of sessions (lists of item rows) in one market.
Scorer = Callable[[list[list[int]]], torch.Tensor]


def pad_sessions(sessions: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Right-pad sessions with PAD into (B, T), keeping each session's last `max_len` items."""
    return torch.from_numpy(pad_rows(sessions, max_len))  # one buffer, one tensor


def encode_sessions(
    model: Bert4XMR, sessions: Sequence[Sequence[int]], market_row: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """User vectors (B, D) on `device` for sessions of item rows in one market."""
    items = pad_sessions(sessions, model.config.max_len).to(device)  # (B, T)
    market = torch.full((len(sessions),), market_row, dtype=torch.long, device=device)  # (B,)
    with torch.inference_mode():
        return model.encode(items, market)


def model_scorer(model: Bert4XMR, market_row: int, device: torch.device | str = "cpu") -> Scorer:
    """Scores of a model in eval mode; the market's item vectors are computed once."""
    model.eval()
    with torch.no_grad():
        vectors = model.item_vectors(market_row).to(device)  # (N, D)

    def score(sessions: list[list[int]]) -> torch.Tensor:
        users = encode_sessions(model, sessions, market_row, device)  # (B, D)
        return (users @ vectors.T).float().cpu()  # (B, N)

    return score


def restrict(scorer: Scorer, catalogue: np.ndarray) -> Scorer:
    """Scores outside `catalogue` (item rows) set to -inf: a market ranks only what it sells,
    as the service's per-market index does."""
    outside: torch.Tensor | None = None

    def score(sessions: list[list[int]]) -> torch.Tensor:
        nonlocal outside
        scores = scorer(sessions)  # (B, N)
        if outside is None:
            outside = torch.ones(scores.shape[1], dtype=torch.bool)
            outside[torch.as_tensor(catalogue, dtype=torch.long)] = False
        return scores.masked_fill(outside, float("-inf"))

    return score


def rank_split(split: MarketSplit, scorer: Scorer, stage: str, batch_size: int = 512) -> np.ndarray:
    """0-based rank of each evaluated user's held-out item under the split's protocol.

    Users are scored in order of session length, so that a batch pads to similar lengths.
    """
    histories = split.history(stage)
    targets = split.targets(stage)
    negatives = split.negatives(stage)
    order = np.argsort([len(h) for h in histories], kind="stable")
    ranks = np.zeros(len(histories), dtype=np.int64)
    market_mask: torch.Tensor | None = None
    # Full ranking scores (B, N): at a million items, 512 users would be 2 GiB of scores.
    step = max(1, min(batch_size, SCORES_PER_BATCH // (int(split.market_items.max()) + 1)))
    start = 0
    while start < len(order):
        rows = order[start : start + step]
        start += len(rows)
        sessions = [histories[i] for i in rows]
        target = torch.as_tensor(targets[rows])
        if negatives is None:  # full ranking over the market's items minus the history
            scores = scorer(sessions)  # (B, N)
            step = max(1, min(batch_size, SCORES_PER_BATCH // scores.shape[1]))
            if market_mask is None:
                market_mask = torch.zeros(scores.shape[1], dtype=torch.bool)
                market_mask[torch.as_tensor(split.market_items)] = True
            candidates = market_mask.expand(len(sessions), -1).clone()
            history = pad_sessions(sessions, max(len(s) for s in sessions))  # (B, T)
            candidates.scatter_(1, history, False)  # padding hits row 0, never a candidate
            candidates[torch.arange(len(sessions)), target] = True
            ranks[rows] = rank_of_target(scores, target, candidates).numpy()
        else:
            cols = torch.cat([target[:, None], torch.as_tensor(negatives[rows])], 1)  # (B, 100)
            # A scorer that ranks given candidates itself (the served ranking, as a request's
            # `candidates`) scores just these; others score every item.
            score_candidates = getattr(scorer, "score_candidates", None)
            if score_candidates is not None:
                picked = score_candidates(sessions, cols.numpy())
            else:
                picked = scorer(sessions).gather(1, cols)
            ones = torch.ones_like(picked, dtype=torch.bool)
            ranks[rows] = rank_of_target(picked, torch.zeros_like(target), ones).numpy()
    return ranks


def evaluate_split(split: MarketSplit, scorer: Scorer, stage: str) -> dict[str, float]:
    return summarize(rank_split(split, scorer, stage))
