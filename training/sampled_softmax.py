"""The sampled softmax: the training loss over a shared draw of negatives instead of the whole
catalogue, for catalogues where a (B, N) score matrix per step costs too much
(`FitConfig.softmax`; README, Configuration).

Each step draws `S` items with replacement from the market's items (all items when the softmax
is not per market), item j with probability q(j) proportional to (training count + 1) ** power.
A negative's logit is corrected by the log of its expected count (the "logQ" correction of
Bengio & Senecal 2008, Jean et al. 2015, Yi et al. 2019): s_j + log(c_j) - log(S q(j)), where
c_j is how often it was drawn. The sum of exp(corrected logit) over the draw is then an unbiased
estimate of the full softmax's sum over the allowed items. A hidden item keeps its own logit
and is taken out of the negatives (an accidental hit), so the estimate stands for the other
items, as in the full softmax; the session's own items are left out when `exclude_visible`.
With every allowed item drawn once at q = 1/n the loss is exactly the full softmax's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.distill import Teacher, sampled_distillation_loss
from training.split import MarketSplit
from training.vocab import PAD

# A finite stand-in for -inf where a log-sum-exp must keep a gradient (never a real logit).
FAR = -1e4


@dataclass(frozen=True)
class Negatives:
    """One step's draw: distinct rows (U,) sorted, and each one's logit correction
    log(c_j) - log(S q(j)) (U,)."""

    rows: torch.Tensor
    correction: torch.Tensor


@dataclass(frozen=True)
class NegativeSampler:
    """Per market row: the item rows it draws from and their cumulative weights."""

    rows: dict[int, np.ndarray]
    cumulative: dict[int, np.ndarray]
    n_draws: int

    @classmethod
    def from_splits(cls, splits: Sequence[tuple[MarketSplit, int]], n_rows: int, n_draws: int,
                    power: float, market_softmax: bool) -> NegativeSampler:
        """Draw from each market's training items (`market_softmax`) or from every item, by
        (training count + 1) ** `power`: 0 is uniform, 1 follows popularity."""
        counts = {row: split.train_counts(n_rows) for split, row in splits}
        total = sum(counts.values())
        rows, cumulative = {}, {}
        for split, market_row in splits:
            if market_softmax:
                items = split.catalogue()
                weights = (counts[market_row][items] + 1.0) ** power
            else:
                items = np.arange(1, n_rows, dtype=np.int64)
                weights = (np.asarray(total)[items] + 1.0) ** power
            rows[market_row] = items
            cumulative[market_row] = np.cumsum(weights, dtype=np.float64)
        return cls(rows, cumulative, n_draws)

    def draw(self, market_row: int, rng: np.random.Generator,
             device: torch.device | str = "cpu") -> Negatives:
        cumulative = self.cumulative[market_row]
        picked = np.searchsorted(cumulative, rng.random(self.n_draws) * cumulative[-1],
                                 side="right").clip(max=len(cumulative) - 1)
        position, count = np.unique(picked, return_counts=True)
        below = np.where(position > 0, cumulative[position - 1], 0.0)
        weight = cumulative[position] - below  # (U,) unnormalised q, O(U) not O(N)
        correction = np.log(count) - np.log(self.n_draws * weight / cumulative[-1])
        return Negatives(torch.as_tensor(self.rows[market_row][position], device=device),
                         torch.as_tensor(correction, dtype=torch.float32, device=device))


def contains(per_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, U): whether each of `rows` (U,) is among the rows of each example (B, L)."""
    ordered = per_row.sort(1).values  # (B, L)
    wanted = rows.expand(per_row.shape[0], -1).contiguous()  # (B, U)
    at = torch.searchsorted(ordered, wanted).clamp(max=ordered.shape[1] - 1)
    return ordered.gather(1, at) == wanted


def sampled_loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    market_row: int,
    negatives: Negatives,
    exclude_visible: bool,
    allowed: torch.Tensor | None = None,
    teacher: Teacher | None = None,
    owned: torch.Tensor | None = None,
    distill: float = 0.0,
    distill_top: int = 100,
) -> torch.Tensor:
    """Mean cross-entropy of the hidden items (B, M) against the shared `negatives`, plus
    `distill` times the KL from the teacher, exact on its `distill_top` best items of each
    example and estimated from the negatives on the rest
    (training.distill.sampled_distillation_loss); no (B, N) matrix is formed."""
    b = inputs.shape[0]
    example, positives = (targets != PAD).nonzero(as_tuple=True)  # (R,), (R,)
    positives = targets[example, positives]  # (R,) item rows
    top = None
    if teacher is not None and owned is not None and distill:
        with torch.no_grad():
            top = teacher.top(inputs, owned, allowed, exclude_visible, distill_top)
    wanted = [negatives.rows, positives] + ([top.rows.reshape(-1)] if top is not None else [])
    rows, inverse = torch.unique(torch.cat(wanted), return_inverse=True)  # (C,), (U+R+B*k,)
    market = torch.full((b,), market_row, dtype=torch.long, device=inputs.device)
    users, vectors = model(inputs, market, rows)  # (B, D), (C, D)
    n_neg, n_pos = len(negatives.rows), len(positives)
    raw = users @ vectors[inverse[:n_neg]].T  # (B, U)
    scores = raw + negatives.correction  # (B, U)
    if exclude_visible:
        scores = scores.masked_fill(contains(inputs, negatives.rows), float("-inf"))
    positive = (users[example] * vectors[inverse[n_neg:n_neg + n_pos]]).sum(-1)  # (R,)
    hits = negatives.rows[None, :] == positives[:, None]  # (R, U) accidental hits
    logits = torch.cat([positive[:, None], scores[example].masked_fill(hits, float("-inf"))], 1)
    nll = F.cross_entropy(logits, torch.zeros_like(positives))  # the positive is column 0
    if top is None:
        return nll
    top_vectors = vectors[inverse[n_neg + n_pos:]].reshape(b, -1, vectors.shape[1])  # (B, k, D)
    top_scores = torch.einsum("bd,bkd->bk", users, top_vectors)  # (B, k)
    top_scores = top_scores.masked_fill(top.rows == PAD, FAR)
    # The rest of each example's partition sum: its negatives outside its top items.
    outside = torch.isfinite(scores) & ~contains(top.rows, negatives.rows)  # (B, U)
    log_sum = torch.logaddexp(top_scores.logsumexp(1),
                              scores.masked_fill(~outside, FAR).logsumexp(1))  # (B,)
    kl = sampled_distillation_loss(
        top, top_scores, negatives.rows, torch.where(outside, raw, 0.0),
        torch.where(outside, negatives.correction.exp(), 0.0), log_sum)
    return nll + distill * kl
