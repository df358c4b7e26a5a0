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

from training.model import ages_of
from training.ranker import count_pairs, strongest_per_row
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

    def _weights(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, T) decay ** age of each visible row (right-padded, newest last), 0 at PAD."""
        real = visible != PAD
        return (self.decay ** ages_of(real).float()) * real

    def scores(self, visible: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """(B, N) teacher scores for visible rows (B, T) (right-padded, newest last), with
        the user's own pairs (its items `owned`, (B, L)) taken out."""
        b = visible.shape[0]
        weights = self._weights(visible)  # (B, T)
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
        session's own when `exclude_visible`), in sparse form (`TeacherTop`: its `k` best items
        per example and every item it knows), without a (B, N) matrix: the sampled softmax's
        distillation target (see `sampled_distillation_loss`)."""
        b = visible.shape[0]
        n_rows = self.inverse_root_users.shape[0]
        weights = self._weights(visible)  # (B, T)
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
        keys, row, item = keys[kept], row[kept], item[kept]  # (E',) still sorted
        logits = scores[kept] / self.temperature  # (E',)
        n_support = torch.bincount(row, minlength=b)  # (B,)
        n_allowed = int(usable.sum()) - (
            torch.bincount(seen // n_rows, minlength=b) if exclude_visible else 0)
        # Items the teacher does not know have a score of 0: a logit of 0, weight 1 each.
        n_floor = (n_allowed - n_support).clamp(min=0).float()  # (B,)
        width = max(1, int(n_support.max()))
        column = torch.arange(len(row), device=row.device) - (n_support.cumsum(0) - n_support)[row]
        padded = torch.full((b, width), float("-inf"), device=row.device)
        padded[row, column] = logits  # (B, W), each example's known items
        items = torch.zeros(b, width, dtype=torch.long, device=row.device)
        items[row, column] = item
        log_total = torch.logaddexp(padded.logsumexp(1), n_floor.log())  # (B,)
        log_p = padded - log_total[:, None]  # (B, W)
        known = torch.where(torch.isfinite(log_p), log_p.exp() * log_p, 0.0).sum(1)
        unknown = n_floor * (-log_total).exp() * -log_total  # sum of p log p over the floor
        top_logits, where = padded.topk(min(k, width), dim=1)  # (B, k)
        valid = torch.isfinite(top_logits)
        informed = n_support > 0
        return TeacherTop(
            rows=torch.where(valid, items.gather(1, where), PAD),
            probs=torch.where(valid & informed[:, None], (top_logits - log_total[:, None]).exp(),
                              0.0),
            informed=informed,
            neg_entropy=torch.where(informed, known + unknown, 0.0),
            keys=keys, logits=logits, log_total=log_total, n_rows=n_rows,
        )


@dataclass(frozen=True)
class TeacherTop:
    """The teacher's distribution over the allowed items of each example, in the sparse form
    the sampled softmax uses: its `k` best rows (B, k) (PAD where an example knows fewer) and
    their probabilities (B, k) (0 at PAD), sum of p log p over all allowed items (B,), which
    examples it knows anything of (B,), and every known (example, item) pair as sorted keys
    example * n_rows + item (E,) with its logit (E,), beside the log of the sum (B,)."""

    rows: torch.Tensor
    probs: torch.Tensor
    informed: torch.Tensor
    neg_entropy: torch.Tensor
    keys: torch.Tensor
    logits: torch.Tensor
    log_total: torch.Tensor
    n_rows: int

    def probs_at(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, U): the teacher's probability of each of `rows` (U,) for each example (0 for
        examples it knows nothing of); only meaningful for the example's allowed items."""
        b = self.log_total.shape[0]
        wanted = torch.arange(b, device=rows.device)[:, None] * self.n_rows + rows  # (B, U)
        logit = torch.zeros(wanted.shape, device=rows.device)
        if len(self.keys):
            at = torch.searchsorted(self.keys, wanted).clamp(max=len(self.keys) - 1)
            logit = torch.where(self.keys[at] == wanted, self.logits[at], 0.0)
        probs = (logit - self.log_total[:, None]).exp()
        return torch.where(self.informed[:, None], probs, 0.0)


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
    cosine = pairs.cosine()
    kept, rank = strongest_per_row(i, j, cosine, k)
    neighbours = np.zeros((n_rows, k), dtype=np.int64)
    similarity = np.zeros((n_rows, k), dtype=np.float32)
    neighbours[i[kept], rank] = j[kept]
    similarity[i[kept], rank] = cosine[kept]
    users = np.maximum(pairs.item_users, 1).astype(np.float64)
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


def sampled_distillation_loss(top: TeacherTop, top_scores: torch.Tensor, rest_rows: torch.Tensor,
                              rest_scores: torch.Tensor, rest_weights: torch.Tensor,
                              log_sum: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) over the informed examples, from the model's scores of the
    teacher's top items (B, k) and of a weighted sample of the rest (B, U): rows `rest_rows`
    (U,), scores and weights (0 where a sampled row is not in the example's rest; else its
    logQ weight c / (S q)), and the log of the model's estimated partition sum (B,).

    KL = sum p log p - sum_j p(j) s_j + log Z over the allowed items: the first term is the
    teacher's own (exact), the second is exact on the top items and estimated without bias on
    the rest, so with every item drawn once this is the full softmax's term exactly."""
    if not bool(top.informed.any()):
        return top_scores.new_zeros(())
    rest = top.probs_at(rest_rows) * rest_weights  # (B, U)
    cross = (top.probs * top_scores).sum(1) + (rest * rest_scores).sum(1)  # (B,)
    return (top.neg_entropy - cross + log_sum)[top.informed].mean()
