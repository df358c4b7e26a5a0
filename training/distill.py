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
