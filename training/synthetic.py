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
