"""Distillation from item-to-item co-occurrence: a teacher distribution over the catalogue for
each training example, which the model is pulled towards beside its own targets.

The teacher scores item j for a session's visible items V as sum over i in V of
decay**age_i * cos(i, j), the cosine co-occurrence of the training sessions (each item's `k`
strongest neighbours kept). A user's own pairs are taken out of its teacher (the teacher
would otherwise know the hidden items only because this user bought them together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.ranker import count_pairs
from training.vocab import PAD


@dataclass(frozen=True)
class Teacher:
    neighbours: torch.Tensor  # (N, K) item rows, PAD where a row has fewer neighbours
    similarity: torch.Tensor  # (N, K) cosine co-occurrence, 0 at PAD
    inverse_root_users: torch.Tensor  # (N,) 1 / sqrt(max(1, users of the item))
    decay: float
    temperature: float

    def to(self, device: str | torch.device) -> Teacher:
        return Teacher(self.neighbours.to(device), self.similarity.to(device),
                       self.inverse_root_users.to(device), self.decay, self.temperature)

    def scores(self, visible: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """(B, N) teacher scores for visible rows (B, T) (right-padded, newest last), with
        the user's own pairs (its items `owned`, (B, L)) taken out."""
        b, t = visible.shape
        real = visible != PAD
        lengths = real.sum(1, keepdim=True)  # (B, 1)
        ages = (lengths - 1 - torch.arange(t, device=visible.device)).clamp(min=0)
        weights = (self.decay ** ages.float()) * real  # (B, T)
        contribution = self.similarity[visible] * weights[..., None]  # (B, T, K)
        scores = torch.zeros(b, self.inverse_root_users.shape[0], device=visible.device)
        scores.scatter_add_(1, self.neighbours[visible].reshape(b, -1),
                            contribution.reshape(b, -1))
        # This user's share of cos(i, h) for its own items h: 1 / sqrt(n_i n_h) per pair.
        own = (weights * self.inverse_root_users[visible]).sum(1, keepdim=True)  # (B, 1)
        correction = own * self.inverse_root_users[owned] * (owned != PAD)  # (B, L)
        scores.scatter_add_(1, owned, -correction)
        scores[:, PAD] = 0.0
        return scores.clamp(min=0.0)


    def top(self, visible: torch.Tensor, owned: torch.Tensor, allowed: torch.Tensor | None,
            exclude_visible: bool, k: int) -> TeacherTop:
        """The teacher distribution of `scores` over the allowed items (the market's, minus the
        session's own when `exclude_visible`), kept as its `k` best items per example and one
        bucket for the rest of the catalogue, without a (B, N) matrix: the sampled softmax's
        distillation target (see `sampled_distillation_loss`)."""
        b, t = visible.shape
        n_rows = self.inverse_root_users.shape[0]
        real = visible != PAD
        lengths = real.sum(1, keepdim=True)  # (B, 1)
        ages = (lengths - 1 - torch.arange(t, device=visible.device)).clamp(min=0)
        weights = (self.decay ** ages.float()) * real  # (B, T)
        own = (weights * self.inverse_root_users[visible]).sum(1, keepdim=True)  # (B, 1)
        cols = torch.cat([self.neighbours[visible].reshape(b, -1), owned], 1)  # (B, T*K + L)
        values = torch.cat([(self.similarity[visible] * weights[..., None]).reshape(b, -1),
                            -own * self.inverse_root_users[owned] * (owned != PAD)], 1)
        base = torch.arange(b, device=visible.device)[:, None] * n_rows  # (B, 1)
        keys, inverse = torch.unique(base + cols, return_inverse=True)  # (E,) sorted by row
        scores = torch.zeros(len(keys), device=visible.device).scatter_add_(
            0, inverse.reshape(-1), values.reshape(-1))  # (E,) as `scores` before its clamp
        row, item = keys // n_rows, keys % n_rows
        usable = torch.ones(n_rows, dtype=torch.bool, device=visible.device)  # (N,)
        usable[PAD] = False
        if allowed is not None:
            usable &= allowed
        seen = torch.unique(base + visible)  # (≤ B*T,) sorted keys of (row, visible item)
        seen = seen[usable[seen % n_rows]]
        kept = (scores > 0) & usable[item]
        if exclude_visible:
            kept &= ~_contains(seen, keys)
        row, item, logits = row[kept], item[kept], scores[kept] / self.temperature  # (E',)
        n_support = torch.bincount(row, minlength=b)  # (B,)
        n_allowed = int(usable.sum()) - (
            torch.bincount(seen // n_rows, minlength=b) if exclude_visible else 0)
        # Scores of zero (items the teacher does not know) are logits of 0: weight 1 each.
        log_floor = (n_allowed - n_support).clamp(min=0).float().log()  # (B,), -inf if none
        width = max(1, int(n_support.max()))
        column = torch.arange(len(row), device=row.device) - (n_support.cumsum(0) - n_support)[row]
        padded = torch.full((b, width), float("-inf"), device=row.device)
        padded[row, column] = logits  # (B, W), each example's known items
        items = torch.zeros(b, width, dtype=torch.long, device=row.device)
        items[row, column] = item
        top_logits, where = padded.topk(min(k, width), dim=1)  # (B, k)
        rest = padded.scatter(1, where, float("-inf")).logsumexp(1)  # (B,)
        rest = torch.logaddexp(rest, log_floor)
        total = torch.logaddexp(top_logits.logsumexp(1), rest)  # (B,)
        valid = torch.isfinite(top_logits)
        return TeacherTop(
            rows=torch.where(valid, items.gather(1, where), PAD),
            log_probs=top_logits - total[:, None],
            log_rest=rest - total,
            informed=n_support > 0,
        )


@dataclass(frozen=True)
class TeacherTop:
    """The teacher's distribution as its best items per example and one bucket for the rest:
    rows (B, k) (PAD where an example knows fewer), their log-probabilities (B, k) (-inf at
    PAD), the rest's log-probability (B,), and which examples the teacher knows anything of."""

    rows: torch.Tensor
    log_probs: torch.Tensor
    log_rest: torch.Tensor
    informed: torch.Tensor


def _contains(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Whether each of `keys` is in the 1-D sorted `sorted_keys` (same shape as `keys`)."""
    if not len(sorted_keys):
        return torch.zeros_like(keys, dtype=torch.bool)
    at = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def build_teacher(sequences: Sequence[Sequence[int]], n_rows: int, k: int = 100,
                  decay: float = 0.6, temperature: float = 0.1) -> Teacher:
    """The teacher of the training `sequences`: each item's `k` strongest co-occurrences."""
    pairs = count_pairs(sequences, n_rows, ordered=False)
    i, j = pairs.keys // n_rows, pairs.keys % n_rows
    users = np.maximum(pairs.item_users, 1).astype(np.float64)
    cosine = pairs.users / np.sqrt(users[i] * users[j])
    order = np.lexsort((j, -cosine, i))
    i, j, cosine = i[order], j[order], cosine[order]
    rank = np.arange(len(i)) - np.searchsorted(i, i, side="left")
    kept = rank < k
    neighbours = np.zeros((n_rows, k), dtype=np.int64)
    similarity = np.zeros((n_rows, k), dtype=np.float32)
    neighbours[i[kept], rank[kept]] = j[kept]
    similarity[i[kept], rank[kept]] = cosine[kept]
    return Teacher(torch.from_numpy(neighbours), torch.from_numpy(similarity),
                   torch.from_numpy((1.0 / np.sqrt(users)).astype(np.float32)), decay,
                   temperature)


def distillation_loss(log_probs: torch.Tensor, teacher_scores: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Mean KL(teacher || model) over the rows where the teacher knows anything; the teacher
    distribution is softmax(scores / temperature) over the model's allowed (finite) items."""
    allowed = torch.isfinite(log_probs)
    informed = (teacher_scores * allowed).amax(1) > 0  # (B,)
    if not bool(informed.any()):
        return log_probs.new_zeros(())
    logits = (teacher_scores / temperature).masked_fill(~allowed, float("-inf"))[informed]
    target = F.softmax(logits, dim=-1)
    student = log_probs[informed].masked_fill(~allowed[informed], 0.0)
    return F.kl_div(student, target, reduction="batchmean")


def sampled_distillation_loss(top: TeacherTop, student_top: torch.Tensor,
                              student_rest: torch.Tensor, has_rest: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) over the informed examples, on the teacher's best items and
    one bucket for the rest of the catalogue: the full KL with the catalogue coarsened to
    those buckets (a lower bound of it; equal when the teacher knows every allowed item).

    student_top (B, k): the model's log-probabilities of `top.rows` (finite everywhere);
    student_rest (B,): its log-probability of everything else, estimated from the sampled
    negatives, where `has_rest` (B,) says an example had a negative outside its top items."""
    if not bool(top.informed.any()):
        return student_top.new_zeros(())
    valid = torch.isfinite(top.log_probs)
    gap = torch.where(valid, top.log_probs - student_top, 0.0)
    per_item = (top.log_probs.exp() * gap).sum(1)  # (B,); exp(-inf) = 0 at padding
    rest_known = torch.isfinite(top.log_rest) & has_rest
    rest_gap = torch.where(rest_known, top.log_rest - student_rest, 0.0)
    rest = torch.where(rest_known, top.log_rest, float("-inf")).exp() * rest_gap  # (B,)
    return (per_item + rest)[top.informed].mean()
