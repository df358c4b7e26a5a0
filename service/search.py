"""Exact inner-product top-K in torch (CPU or GPU): the `torch` search backend.

Both backends answer `search(users (B, D), k) -> (scores (B, k), rows (B, k))` with row -1 and
score -inf where fewer than k items exist, so the recommender treats them alike. User vectors
come from the encoder as a numpy array (ONNX Runtime) or a torch tensor (the torch encoders);
torch is imported only by the torch backend, so serving with FAISS and ONNX Runtime needs none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch



class Search(Protocol):
    kind: str

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        ...


def as_numpy(users: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B, D) float32 user vectors on the host, contiguous (FAISS's input)."""
    if not isinstance(users, np.ndarray):
        users = users.detach().float().cpu().numpy()
    return np.ascontiguousarray(users, dtype=np.float32)


class TorchSearch:
    """Scores every item of the market with one matmul and keeps the k best (exact)."""

    kind = "torch"

    def __init__(self, rows: np.ndarray, vectors: np.ndarray, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)  # (N,)
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32, device=self.device)  # (N, D)

    def search(self, users: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        users = torch.as_tensor(users).to(self.device, torch.float32)  # (B, D)
        n = self.vectors.shape[0]
        with torch.inference_mode():
            scores = users @ self.vectors.T  # (B, N)
            top, pos = torch.topk(scores, min(k, n), dim=1)  # (B, k')
            rows = self.rows[pos]
        top_np = top.cpu().numpy()
        rows_np = rows.cpu().numpy()
        if k > n:  # pad like FAISS does
            pad = k - n
            top_np = np.pad(top_np, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows_np = np.pad(rows_np, ((0, 0), (0, pad)), constant_values=-1)
        return top_np, rows_np
