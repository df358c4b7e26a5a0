"""The item vocabulary: shop item ids (`item_id: str`) <-> embedding rows (`item_idx: int`).

Row 0 is padding; real items start at row 1. All markets share one vocabulary, so fine-tuning
never renumbers items.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0


class UnknownItemError(KeyError):
    """An item id that the vocabulary does not hold."""


class Vocab:
    """Bidirectional map between item ids and rows; row 0 is reserved for padding."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self._ids: list[str] = list(item_ids)
        self._rows: dict[str, int] = {}
        for row, item_id in enumerate(self._ids, start=1):
            if not item_id:
                raise ValueError(f"empty item id at row {row}")
            if item_id in self._rows:
                raise ValueError(f"duplicate item id {item_id!r} at row {row}")
            self._rows[item_id] = row

    @classmethod
    def from_items(cls, item_ids: Iterable[str]) -> Vocab:
        """A vocabulary of the distinct ids, sorted, so that it is independent of file order."""
        return cls(sorted(set(item_ids)))

    @property
    def item_ids(self) -> list[str]:
        """Item ids in row order, starting at row 1."""
        return list(self._ids)

    @property
    def n_rows(self) -> int:
        """Embedding rows, padding included."""
        return len(self._ids) + 1

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def index(self, item_id: str) -> int:
        try:
            return self._rows[item_id]
        except KeyError:
            raise UnknownItemError(item_id) from None

    def get(self, item_id: str) -> int | None:
        return self._rows.get(item_id)

    def indices(self, item_ids: Iterable[str]) -> list[int]:
        return [self.index(item_id) for item_id in item_ids]

    def item_id(self, item_idx: int) -> str:
        if not 1 <= item_idx <= len(self._ids):
            raise IndexError(f"item row {item_idx} outside 1..{len(self._ids)}")
        return self._ids[item_idx - 1]


def pad_rows(sessions: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Right-pad sessions of item rows with PAD into (B, T) int64, keeping each session's last
    `max_len` items (T is the longest kept session, at least 1)."""
    width = max(1, min(max_len, max((len(s) for s in sessions), default=1)))
    out = np.full((len(sessions), width), PAD, dtype=np.int64)  # (B, T)
    for b, session in enumerate(sessions):
        tail = list(session)[-max_len:]
        out[b, : len(tail)] = tail
    return out
