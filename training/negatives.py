"""Persisted sampled negatives: every model of every rerun of a seed ranks the same candidates.

One `.npz` per market and seed (`<market>-seed<S>.npz`) holds the valid and test negatives, the
evaluated users and their held-out items, and the data fingerprint. A rerun reuses the stored
negatives after checking that they belong to the same data, users and held-out items, and that
no negative is one of the user's own items.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import DataError
from training.split import N_NEGATIVES, MarketSplit

logger = logging.getLogger(__name__)


class NegativesError(DataError):
    """Stored negatives that do not fit the split they are meant for; names the file."""


@dataclass(frozen=True)
class NegativeStore:
    """A directory of persisted negatives for one protocol."""

    directory: Path

    def path(self, market: str, seed: int) -> Path:
        return self.directory / f"{market}-seed{seed}.npz"

    def save(self, split: MarketSplit, fingerprint: str) -> Path:
        if split.valid_negatives is None or split.test_negatives is None:
            raise ValueError(f"split {split.market}/{split.protocol} has no sampled negatives")
        path = self.path(split.market, split.seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(
            tmp,
            valid=split.valid_negatives,
            test=split.test_negatives,
            users=np.asarray([split.users[u] for u in split.eval_users], dtype=str),
            valid_items=split.valid,
            test_items=split.test,
            protocol=np.asarray(split.protocol),
            fingerprint=np.asarray(fingerprint),
        )
        tmp.replace(path)
        return path

    def sync(self, split: MarketSplit, fingerprint: str) -> None:
        """Persist the split's negatives, or, if stored ones exist, verify and use those."""
        path = self.path(split.market, split.seed)
        if not path.exists():
            self.save(split, fingerprint)
            logger.info("negatives saved path=%s users=%d", path, len(split.eval_users))
            return
        valid, test = self._load_checked(path, split, fingerprint)
        if split.valid_negatives is not None and split.test_negatives is not None and not (
            np.array_equal(valid, split.valid_negatives)
            and np.array_equal(test, split.test_negatives)
        ):
            logger.warning("negatives path=%s differ from a fresh draw; using stored", path)
        split.valid_negatives, split.test_negatives = valid, test
        logger.info("negatives reused path=%s users=%d", path, len(split.eval_users))

    def _load_checked(
        self, path: Path, split: MarketSplit, fingerprint: str
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as stored:
                data = {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise NegativesError(f"{path}: unreadable negatives ({e})") from e
        needed = ("valid", "test", "users", "valid_items", "test_items", "protocol", "fingerprint")
        missing = [key for key in needed if key not in data]
        if missing:
            raise NegativesError(f"{path}: missing array(s) {missing}")
        stale = "delete it or use another --out"
        if str(data["fingerprint"]) != fingerprint or str(data["protocol"]) != split.protocol:
            raise NegativesError(f"{path}: drawn for other data or another protocol; {stale}")
        users = [split.users[u] for u in split.eval_users]
        if (
            data["users"].tolist() != users
            or not np.array_equal(data["valid_items"], split.valid)
            or not np.array_equal(data["test_items"], split.test)
        ):
            raise NegativesError(f"{path}: users or held-out items differ from the split; {stale}")
        for stage in ("valid", "test"):
            if data[stage].shape != (len(users), N_NEGATIVES):
                raise NegativesError(f"{path}: {stage} negatives have shape {data[stage].shape}")
        for b, u in enumerate(split.eval_users.tolist()):
            own = set(split.train[u]) | {int(split.valid[b]), int(split.test[b])}
            if own.intersection(data["valid"][b].tolist()) or own.intersection(
                data["test"][b].tolist()
            ):
                raise NegativesError(f"{path}: user {users[b]} has an own item among negatives")
        return data["valid"].astype(np.int64), data["test"].astype(np.int64)
