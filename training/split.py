"""Leave-one-out splits of each market for the three evaluation protocols, and their negatives.

`full` and `forec` hold out each user's time-last item for test and the second last for valid;
`acmr` shuffles each user's items with the seed first. `none` trains on everything but keeps a
small internal hold-out for early stopping. Sampled negatives are drawn once from the seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.data import DataError, MarketLog
from training.vocab import Vocab

PROTOCOLS = ("full", "forec", "acmr")
SPLITS = ("full", "acmr", "none")
N_NEGATIVES = 99
MIN_EVAL_ITEMS = 3  # a user needs a training item, a valid item and a test item


@dataclass
class MarketSplit:
    """One market's split. Users with fewer than 3 distinct items only train.

    `train[u]` holds user u's training rows (time order); `eval_users` indexes the evaluated
    users, aligned with `valid` and `test`. Negatives are (U, 99) or None for full ranking.
    """

    market: str
    protocol: str
    seed: int
    users: list[str]
    train: list[list[int]]
    eval_users: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    market_items: np.ndarray
    valid_negatives: np.ndarray | None = None
    test_negatives: np.ndarray | None = None

    def train_counts(self, n_rows: int) -> np.ndarray:
        """Training interactions per item row in this market: (n_rows,) int64."""
        rows = np.asarray([row for seq in self.train for row in seq], dtype=np.int64)
        return np.bincount(rows, minlength=n_rows)

    def catalogue(self) -> np.ndarray:
        """Rows of the items with a training interaction in this market (what it is known to
        sell before any held-out item is seen), sorted."""
        rows = [row for seq in self.train for row in seq]
        return np.unique(np.asarray(rows, dtype=np.int64))

    def history(self, stage: str) -> list[list[int]]:
        """Inputs of the evaluated users: training items, plus the valid item at test."""
        if stage == "valid":
            return [self.train[u] for u in self.eval_users]
        if stage == "test":
            return [
                self.train[u] + [int(v)] for u, v in zip(self.eval_users, self.valid, strict=True)
            ]
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def targets(self, stage: str) -> np.ndarray:
        return self.valid if stage == "valid" else self.test

    def negatives(self, stage: str) -> np.ndarray | None:
        return self.valid_negatives if stage == "valid" else self.test_negatives

    def evaluating(self, limit: int) -> MarketSplit:
        """This split with at most `limit` of its evaluated users: a random subset fixed by the
        split's seed and market, in their original order (itself when it has no more)."""
        if len(self.eval_users) <= limit:
            return self
        keep = np.sort(market_rng(self.seed, self.market, "eval-subset").choice(
            len(self.eval_users), size=limit, replace=False))
        return replace(
            self, eval_users=self.eval_users[keep], valid=self.valid[keep], test=self.test[keep],
            valid_negatives=None if self.valid_negatives is None else self.valid_negatives[keep],
            test_negatives=None if self.test_negatives is None else self.test_negatives[keep])

    def save_negatives(self, path: Path) -> None:
        if self.valid_negatives is None or self.test_negatives is None:
            raise ValueError("full ranking has no sampled negatives")
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, valid=self.valid_negatives, test=self.test_negatives, users=self.eval_users)
        tmp.replace(path)


def market_rng(seed: int, market: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{market}/{purpose}".encode())])


def _sample_negatives(
    rng: np.random.Generator, pool: np.ndarray, excluded: set[int], n: int, where: str
) -> np.ndarray:
    allowed = len(pool) - len(excluded.intersection(pool.tolist()))
    if allowed < n:
        raise DataError(f"{where}: only {allowed} items to sample {n} negatives from")
    chosen: list[int] = []
    taken = set(excluded)
    while len(chosen) < n:
        for row in rng.choice(pool, size=2 * (n - len(chosen)) + 8).tolist():
            if row not in taken:
                taken.add(row)
                chosen.append(row)
                if len(chosen) == n:
                    break
    return np.asarray(chosen, dtype=np.int64)


def split_market(
    log: MarketLog,
    vocab: Vocab,
    protocol: str,
    seed: int = 0,
    all_items: np.ndarray | None = None,
    holdout_frac: float = 0.05,
) -> MarketSplit:
    """Split one market for `protocol` (a protocol name, or the split `none`)."""
    if protocol not in (*PROTOCOLS, "none"):
        raise ValueError(f"unknown protocol {protocol!r}; choose from {[*PROTOCOLS, 'none']}")
    users = sorted(log.sequences)
    rng = market_rng(seed, log.market, "split")
    holdout = set()
    if protocol == "none":
        eligible = [i for i, u in enumerate(users) if len(log.sequences[u]) >= MIN_EVAL_ITEMS]
        n_hold = max(1, round(holdout_frac * len(eligible))) if eligible else 0
        holdout = (
            set(rng.choice(eligible, size=n_hold, replace=False).tolist()) if n_hold else set()
        )
    train: list[list[int]] = []
    eval_users: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for u, user in enumerate(users):
        rows = vocab.indices(log.sequences[user])
        if protocol == "acmr":
            rows = [rows[i] for i in rng.permutation(len(rows))]
        if protocol == "none":
            if u in holdout:
                train.append(rows[:-1])
                eval_users.append(u)
                valid.append(rows[-1])
                test.append(rows[-1])
            else:
                train.append(rows)
        elif len(rows) >= MIN_EVAL_ITEMS:
            train.append(rows[:-2])
            eval_users.append(u)
            valid.append(rows[-2])
            test.append(rows[-1])
        else:
            train.append(rows)
    market_items = np.asarray(sorted(vocab.indices(log.items)), dtype=np.int64)
    split = MarketSplit(
        log.market,
        protocol,
        seed,
        users,
        train,
        np.asarray(eval_users, dtype=np.int64),
        np.asarray(valid, dtype=np.int64),
        np.asarray(test, dtype=np.int64),
        market_items,
    )
    if protocol in ("forec", "acmr"):
        if protocol == "acmr" and all_items is None:
            raise ValueError("protocol 'acmr' samples negatives from all markets: pass all_items")
        pool = market_items if protocol == "forec" else np.asarray(all_items, dtype=np.int64)
        neg_rng = market_rng(seed, log.market, f"negatives/{protocol}")
        valid_negs, test_negs = [], []
        for u in split.eval_users.tolist():
            user_items = set(vocab.indices(log.sequences[users[u]]))
            where = f"market {log.market} user {users[u]}"
            valid_negs.append(_sample_negatives(neg_rng, pool, user_items, N_NEGATIVES, where))
            test_negs.append(_sample_negatives(neg_rng, pool, user_items, N_NEGATIVES, where))
        split.valid_negatives = (
            np.stack(valid_negs) if valid_negs else np.zeros((0, N_NEGATIVES), np.int64)
        )
        split.test_negatives = (
            np.stack(test_negs) if test_negs else np.zeros((0, N_NEGATIVES), np.int64)
        )
    return split
