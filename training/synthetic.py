"""A deterministic synthetic multi-market data set: the embedded default for the demo and tests.

Items belong to latent topics; each market sells a subset of the catalogue and prefers some
topics; each user draws items from one or two topics of their market. So there is co-occurrence
to learn, shared across markets, with local taste on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SyntheticSpec:
    markets: tuple[str, ...] = ("aa", "bb", "cc")
    n_items: int = 300
    n_topics: int = 12
    users: tuple[int, ...] = (300, 150, 60)  # per market
    min_items: int = 5
    max_items: int = 12
    seed: int = 0


def generate(spec: SyntheticSpec) -> dict[str, list[tuple[str, str, float, str]]]:
    """Rows (userId, itemId, rate, date) per market."""
    if len(spec.users) != len(spec.markets):
        raise ValueError("need one user count per market")
    rng = np.random.default_rng(spec.seed)
    topic_of = rng.integers(spec.n_topics, size=spec.n_items)
    item_ids = [f"I{n:05d}" for n in range(spec.n_items)]
    out: dict[str, list[tuple[str, str, float, str]]] = {}
    start = date(2020, 1, 1)
    for m, (market, n_users) in enumerate(zip(spec.markets, spec.users, strict=True)):
        sold = np.flatnonzero(rng.random(spec.n_items) < 0.8)
        topic_pref = rng.dirichlet(np.full(spec.n_topics, 0.5))
        rows: list[tuple[str, str, float, str]] = []
        for u in range(n_users):
            topics = rng.choice(spec.n_topics, size=2, p=topic_pref)
            pool = sold[np.isin(topic_of[sold], topics)]
            if len(pool) < spec.max_items:
                pool = sold
            n = int(rng.integers(spec.min_items, spec.max_items + 1))
            weights = 1.0 / (1.0 + np.arange(len(pool)))  # a popularity skew inside the pool
            picked = rng.choice(pool, size=n, replace=False, p=weights / weights.sum())
            day = start + timedelta(days=int(rng.integers(0, 400)))
            for item in picked:
                day += timedelta(days=int(rng.integers(0, 20)))
                rate = float(rng.integers(1, 6))
                rows.append((f"U{m}{u:05d}", item_ids[item], rate, day.isoformat()))
        out[market] = rows
    return out


def write_synthetic(out_dir: Path, spec: SyntheticSpec | None = None) -> list[Path]:
    """Write `<market>_5core.txt` files in the XMarket format; returns their paths."""
    spec = spec or SyntheticSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for market, rows in generate(spec).items():
        path = out_dir / f"{market}_5core.txt"
        tmp = path.with_suffix(".tmp")
        lines = ["userId itemId rate date"] + [f"{u} {i} {r:.1f} {d}" for u, i, r, d in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths


# --- the scale workload: catalogue-sized, many markets, vectorised -----------------------------


@dataclass(frozen=True)
class ScaleSpec:
    """A catalogue-scale workload (`xmr synthetic --items N --markets M --users U`).

    Items have a global popularity that follows a power law (`popularity_exponent`: the item of
    popularity rank r is drawn with weight r^-a) and belong to latent topics of about
    `topic_size` items. Every market sells the shared part of the catalogue (`overlap`) plus a
    random share of the rest (`coverage`, from the smallest to the largest market); market sizes
    in users follow a power law too (`market_exponent`). A user draws most of their items
    (`topic_share`) from one or two topics, popular items of a topic first, the rest from the
    market's overall popularity: items of a topic co-occur, in every market that sells them.
    Every item appears at least once. Rows are written user by user, in time order.
    """

    n_items: int = 100_000
    n_markets: int = 7
    n_users: int = 50_000
    seed: int = 0
    popularity_exponent: float = 1.0
    market_exponent: float = 1.0
    overlap: float = 0.3
    coverage: tuple[float, float] = (0.1, 0.6)
    topic_size: int = 50
    topic_share: float = 0.8
    min_items: int = 5
    max_items: int = 15

    def __post_init__(self) -> None:
        problems = []
        if self.n_items < 1 or self.n_markets < 1:
            problems.append("need at least one item and one market")
        if self.n_users < self.n_markets:
            problems.append(f"n_users={self.n_users} below n_markets={self.n_markets} "
                            "(each market needs a user)")
        if not 0.0 <= self.overlap <= 1.0 or not 0.0 <= self.topic_share <= 1.0:
            problems.append("overlap and topic_share must lie in [0, 1]")
        low, high = self.coverage
        if not 0.0 <= low <= high <= 1.0:
            problems.append(f"coverage {self.coverage} must be 0 <= low <= high <= 1")
        if not 1 <= self.min_items <= self.max_items:
            problems.append(f"session items {self.min_items}..{self.max_items}: need "
                            "1 <= min <= max")
        if self.topic_size < 1 or self.popularity_exponent < 0 or self.market_exponent < 0:
            problems.append("topic_size must be >= 1 and the exponents >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def market_codes(self) -> list[str]:
        width = max(2, len(str(self.n_markets - 1)))
        return [f"m{m:0{width}d}" for m in range(self.n_markets)]


@dataclass(frozen=True)
class MarketRows:
    """One market's interactions as columns: global user number, item number, rate, day."""

    market: str
    users: np.ndarray  # (R,) int64
    items: np.ndarray  # (R,) int64, 0..n_items-1
    rates: np.ndarray  # (R,) int64, 1..5
    days: np.ndarray  # (R,) int64, days since 2020-01-01, non-decreasing per user


def _power_law(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) weights rank^-exponent, the ranks shuffled."""
    return (1.0 + rng.permutation(n)) ** -exponent


def _draw(cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions drawn in proportion to weight inside [lo, hi) of the cumulative weights."""
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    target = base + u * (cum[hi - 1] - base)
    return np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)


def generate_scale(spec: ScaleSpec) -> list[MarketRows]:
    """The scale workload's interactions, one `MarketRows` per market (vectorised numpy)."""
    rng = np.random.default_rng(spec.seed)
    n_items, n_markets = spec.n_items, spec.n_markets
    n_topics = max(1, n_items // spec.topic_size)
    topic_of = rng.integers(n_topics, size=n_items)
    weight = _power_law(n_items, spec.popularity_exponent, rng)
    shared = rng.random(n_items) < spec.overlap
    coverage = np.linspace(spec.coverage[1], spec.coverage[0], n_markets)  # largest first
    user_share = (1.0 + np.arange(n_markets)) ** -spec.market_exponent
    n_users = np.maximum(1, np.floor(spec.n_users * user_share / user_share.sum())).astype(int)
    n_users[0] += spec.n_users - n_users.sum()
    first_user = np.r_[0, np.cumsum(n_users)[:-1]]
    topic_weight = _power_law(n_topics, 1.0, rng)

    sold = np.stack([shared | (rng.random(n_items) < c) for c in coverage])  # (M, N)
    nowhere = np.flatnonzero(~sold.any(0))
    sold[rng.integers(n_markets, size=len(nowhere)), nowhere] = True
    by_topic = np.argsort(topic_of, kind="stable")  # (N,) every item, grouped by topic

    out: list[MarketRows] = []
    user_topics: list[np.ndarray] = []
    for m, market in enumerate(spec.market_codes):
        order = by_topic[sold[m][by_topic]]  # (S,) the market's items, grouped by topic
        cum = np.cumsum(weight[order])
        starts = np.searchsorted(topic_of[order], np.arange(n_topics + 1))  # (T+1,)
        taste = rng.dirichlet(np.full(n_topics, 0.5)) + topic_weight / topic_weight.sum()
        taste = np.where(starts[1:] > starts[:-1], taste, 0.0)  # topics the market sells
        taste /= taste.sum()

        lengths = rng.integers(spec.min_items, spec.max_items + 1, size=n_users[m])
        topics = rng.choice(n_topics, size=(n_users[m], 2), p=taste)  # each user's two topics
        row_user = np.repeat(np.arange(n_users[m]), lengths)  # (R,)
        n_rows = len(row_user)
        topic = topics[row_user, (rng.random(n_rows) < 0.5).astype(int)]
        pos = _draw(cum, starts[topic], starts[topic + 1], rng.random(n_rows))
        noise = rng.random(n_rows) >= spec.topic_share
        pos[noise] = _draw(cum, np.zeros(noise.sum(), dtype=np.int64),
                           np.full(noise.sum(), len(cum)), rng.random(noise.sum()))
        start_day = rng.integers(0, 1000, size=n_users[m])
        step = rng.integers(0, 20, size=n_rows)
        step[np.r_[0, np.cumsum(lengths)[:-1]]] = 0
        day = start_day[row_user] + _cumsum_per_group(step, lengths)
        out.append(MarketRows(market, first_user[m] + row_user, order[pos],
                              rng.integers(1, 6, n_rows), day))
        user_topics.append(topics)
    _cover_every_item(out, user_topics, first_user, sold, topic_of, rng)
    return [_dedupe(rows) for rows in out]


def _cumsum_per_group(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each group of `lengths` consecutive values."""
    total = np.cumsum(values)
    ends = np.cumsum(lengths)
    offsets = np.r_[0, total[ends[:-1] - 1]]
    return total - np.repeat(offsets, lengths)


def _cover_every_item(out: list[MarketRows], user_topics: list[np.ndarray],
                      first_user: np.ndarray, sold: np.ndarray, topic_of: np.ndarray,
                      rng: np.random.Generator) -> None:
    """Give each item that no user drew one interaction, after the last one of a user of a
    market that sells it, a user with the item's topic where the market has one."""
    drawn = np.zeros(sold.shape[1], dtype=bool)
    for rows in out:
        drawn[rows.items] = True
    missing = np.flatnonzero(~drawn)
    # a random market among those selling each missing item
    market_of = np.argmax(sold[:, missing] * rng.random((len(out), len(missing)),
                                                        dtype=np.float32), axis=0)
    for m, rows in enumerate(out):
        extra = missing[market_of == m]
        if not len(extra):
            continue
        topics = user_topics[m]  # (U, 2)
        order = np.argsort(topics.ravel(), kind="stable")  # (2U,) (user, topic) pairs by topic
        pair_topic = topics.ravel()[order]
        lo = np.searchsorted(pair_topic, topic_of[extra], side="left")
        hi = np.searchsorted(pair_topic, topic_of[extra], side="right")
        pick = np.minimum(lo + (rng.random(len(extra)) * (hi - lo)).astype(np.int64),
                          len(order) - 1)
        user = np.where(hi > lo, order[pick] // 2, rng.integers(len(topics), size=len(extra)))
        last_day = np.zeros(len(topics), dtype=np.int64)
        last_day[rows.users - first_user[m]] = rows.days  # rows are in time order per user
        users = np.r_[rows.users, first_user[m] + user]
        days = np.r_[rows.days, last_day[user] + rng.integers(0, 20, size=len(extra))]
        order = np.lexsort((days, users))
        out[m] = MarketRows(rows.market, users[order], np.r_[rows.items, extra][order],
                            np.r_[rows.rates, rng.integers(1, 6, len(extra))][order],
                            days[order])


def _dedupe(rows: MarketRows) -> MarketRows:
    """Each (user, item) once, at its first row (the loader would drop repeats anyway)."""
    key = rows.users * (int(rows.items.max()) + 1) + rows.items
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    return MarketRows(rows.market, rows.users[keep], rows.items[keep], rows.rates[keep],
                      rows.days[keep])


def write_scale(out_dir: Path, spec: ScaleSpec) -> list[tuple[Path, int, int]]:
    """Write the scale workload as `<market>_5core.txt` files; (path, users, rows) per market."""
    out_dir.mkdir(parents=True, exist_ok=True)
    item_width = max(5, len(str(spec.n_items - 1)))
    item_ids = [f"I{n:0{item_width}d}" for n in range(spec.n_items)]
    user_width = max(6, len(str(spec.n_users - 1)))
    first_day = np.datetime64("2020-01-01")
    written = []
    for rows in generate_scale(spec):
        days, day_at = np.unique(rows.days, return_inverse=True)
        day_text = np.datetime_as_string(first_day + days, unit="D").tolist()
        users, user_at = np.unique(rows.users, return_inverse=True)
        user_ids = [f"U{u:0{user_width}d}" for u in users.tolist()]
        lines = [f"{user_ids[u]} {item_ids[i]} {r}.0 {day_text[d]}" for u, i, r, d in
                 zip(user_at.tolist(), rows.items.tolist(), rows.rates.tolist(),
                     day_at.tolist(), strict=True)]
        path = out_dir / f"{rows.market}_5core.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("userId itemId rate date\n" + "\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
        written.append((path, len(users), len(lines)))
    return written
