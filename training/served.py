"""The served ranking on the training side: each market's ranker built from the training
sessions and fitted on validation items only (`RankerFitting`, run by `xmr train` and by the
harness), and `ServedScorer`, the harness's view of what `POST /markets/{m}/recommend`
returns. Both rank through `training.ranker.rank_session`, the function the service calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from training.config import RankerConfig
from training.evaluate import encode_sessions
from training.metrics import ndcg
from training.model import Bert4XMR
from training.ranker import (
    BoundRanker,
    ItemVectors,
    MarketRanker,
    PairCounts,
    RankerSpec,
    Scorer,
    bind,
    build_neighbours,
    candidate_list,
    count_pairs,
    features,
    fit_scorer,
    rank_session,
    session_candidates,
)
from training.split import MarketSplit

logger = logging.getLogger(__name__)

UNFITTED = Scorer(np.zeros(0), np.ones(0), np.zeros(0))  # a placeholder until fitted


def ranker_spec(config: RankerConfig) -> RankerSpec:
    return RankerSpec(retrieve=config.retrieve, expand=config.expand,
                      neighbours=config.neighbours, similar=config.similar)


def item_vectors(model: Bert4XMR, market_row: int, market_items: np.ndarray) -> ItemVectors:
    """The market's items and their vectors v_m(i), exactly as `xmr index build` indexes them."""
    with torch.inference_mode():
        vectors = model.item_vectors(market_row).float().cpu().numpy()  # (n_rows, D)
    rows = np.asarray(market_items, dtype=np.int64)
    position = np.full(model.config.n_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    return ItemVectors(rows, np.ascontiguousarray(vectors[rows], dtype=np.float32), position)


def retrieve(items: ItemVectors, users: np.ndarray, depth: int) -> np.ndarray:
    """The rows of each user's exact inner-product top-`depth` (B, depth), as the market's
    flat index returns them (in no particular order; the ranker uses the set)."""
    scores = users.astype(np.float32) @ np.asarray(items.vectors).T  # (B, N)
    if depth >= scores.shape[1]:
        return np.broadcast_to(items.rows, scores.shape).copy()
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]  # (B, depth)
    return items.rows[top]


@dataclass(frozen=True)
class AllMarkets:
    """Item-pair counts over every market's training sessions (what the rankers share)."""

    cooc: PairCounts
    ordered: PairCounts

    @classmethod
    def count(cls, splits: Sequence[MarketSplit], n_rows: int) -> AllMarkets:
        sequences = [seq for split in splits for seq in split.train]
        return cls(count_pairs(sequences, n_rows, ordered=False),
                   count_pairs(sequences, n_rows, ordered=True))


def market_ranker(split: MarketSplit, shared: AllMarkets, n_rows: int, spec: RankerSpec,
                  scorer: Scorer = UNFITTED, sold: np.ndarray | None = None) -> MarketRanker:
    """The market's ranker over the items its index holds (`sold`, by default the split's
    market items)."""
    local = count_pairs(split.train, n_rows, ordered=False)
    items = split.market_items if sold is None else sold
    neighbours = build_neighbours(shared.cooc, shared.ordered, local, items, n_rows,
                                  spec.neighbours)
    return MarketRanker(spec, neighbours, split.train_counts(n_rows).astype(np.float32),
                        shared.cooc.item_users.astype(np.float32), scorer)


@dataclass(frozen=True)
class Examples:
    """One market's fitting examples: features of each validation user's candidates and the
    target's index among them (users whose target was not retrieved are counted, not kept),
    and the same users' slates: the target among `slate_negatives` items drawn at random from
    the market (what an explicit candidate list looks like when nothing is known of it)."""

    examples: list[tuple[np.ndarray, int]]
    n_users: int
    slates: list[tuple[np.ndarray, int]] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return len(self.examples) / self.n_users if self.n_users else 0.0


def slate_rows(rng: np.random.Generator, sold: np.ndarray, session: Sequence[int], target: int,
               size: int) -> np.ndarray:
    """The target and up to `size` other rows of `sold` drawn uniformly without replacement,
    none of them in the session."""
    taken = set(session) | {target}
    # a draw of as many as could be taken plus `size` (O(draw), not O(sold): a million-item
    # market would otherwise permute all of its rows for every validation user)
    draw = sold[rng.choice(len(sold), size=min(len(sold), size + len(taken)), replace=False)]
    others = [int(r) for r in draw if int(r) not in taken][:size]
    return np.asarray([target, *others], dtype=np.int64)


def validation_examples(bound: BoundRanker, model: Bert4XMR, split: MarketSplit,
                        market_row: int, device: str = "cpu", max_users: int | None = None,
                        seed: int = 0, slate_negatives: int = 0) -> Examples:
    """Candidates and features of each validation user (at most `max_users`, a seeded
    sample), as the service would compute them; with `slate_negatives` also each user's
    slate of that many random market items beside the target."""
    sessions = split.history("valid")
    targets = split.targets("valid")
    chosen = np.arange(len(sessions))
    if max_users is not None and len(sessions) > max_users:
        rng = np.random.default_rng([seed, len(sessions)])
        chosen = np.sort(rng.choice(len(sessions), size=max_users, replace=False))
    slate_rng = np.random.default_rng([seed, len(sessions), 1])
    out: list[tuple[np.ndarray, int]] = []
    slates: list[tuple[np.ndarray, int]] = []
    for start in range(0, len(chosen), 512):
        picked = chosen[start : start + 512]
        batch = [sessions[i] for i in picked]
        users = encode_sessions(model, batch, market_row, device).float().cpu().numpy()
        hits = retrieve(bound.items, users, bound.spec.retrieve)
        for b, session in enumerate(batch):
            target = int(targets[picked[b]])
            pool, terms = session_candidates(bound, session, hits[b], None, session)
            at = int(np.searchsorted(pool, bound.items.position[target]))
            if at < len(pool) and bound.items.rows[pool[at]] == target:
                out.append((features(bound, users[b], pool, terms).astype(np.float32), at))
            if slate_negatives and bound.items.position[target] >= 0:
                rows = slate_rows(slate_rng, bound.items.rows, session, target, slate_negatives)
                # the pool's sums are the session's: only the candidates differ
                slate = candidate_list(bound, rows, np.asarray(session, dtype=np.int64))
                at = int(np.searchsorted(slate, bound.items.position[target]))
                slates.append((features(bound, users[b], slate, terms).astype(np.float32),
                               at))
    return Examples(out, len(chosen), slates)


@dataclass(frozen=True)
class FittedRankers:
    rankers: dict[str, MarketRanker]
    fitted: dict[str, dict[str, float | int]]  # per market: users, recall, in-sample NDCG@10
    seconds: float


class RankerFitting:
    """Builds each market's ranker as its fine-tuned model arrives (`add`), keeping only the
    ranker and its validation examples, then fits the scorers (`fit`).

    One scorer is fitted on all markets, and each market's own only as a pull towards it
    (`fit_scorers`): a small market has too few validation users to fit one alone. At most
    `max_users` validation users per market are kept (a seeded sample). `sold` gives the items
    each market's index holds where it is not the split's market items."""

    def __init__(self, splits: dict[str, MarketSplit], markets: list[str], n_rows: int,
                 spec: RankerSpec | None = None, max_users: int = 2000, seed: int = 0,
                 sold: dict[str, np.ndarray] | None = None, slate_negatives: int = 0) -> None:
        self.started = time.perf_counter()
        self.splits, self.markets, self.n_rows = splits, markets, n_rows
        self.sold = {m: (sold or {}).get(m, splits[m].market_items) for m in markets}
        self.spec = spec or RankerSpec()
        self.max_users, self.seed = max_users, seed
        self.slate_negatives = slate_negatives
        self.shared = AllMarkets.count([splits[m] for m in markets], n_rows)
        self.rankers: dict[str, MarketRanker] = {}
        self.examples: dict[str, Examples] = {}

    def add(self, market: str, model: Bert4XMR, device: str = "cpu") -> None:
        split = self.splits[market]
        row = self.markets.index(market)
        ranker = market_ranker(split, self.shared, self.n_rows, self.spec,
                               sold=self.sold[market])
        items = item_vectors(model, row, self.sold[market])
        self.rankers[market] = ranker
        self.examples[market] = validation_examples(
            bind(ranker, items, model.config.max_len), model, split, row, device,
            self.max_users, self.seed, self.slate_negatives)

    def fit(self, hidden: int = 0, l2: float = 1e-3, market_l2: float = 0.0) -> FittedRankers:
        """One scorer fitted on every market's examples; with `market_l2` > 0 each market's
        own, started from it and pulled towards it with that weight (a market with few
        validation users then stays near the shared scorer)."""
        scorers = fit_scorers({m: self.examples[m].examples for m in self.rankers}, hidden,
                              l2, market_l2, self.seed)
        slate_scorers: dict[str, Scorer | None] = dict.fromkeys(self.rankers)
        if any(self.examples[m].slates for m in self.rankers):
            slate_scorers.update(fit_scorers({m: self.examples[m].slates for m in self.rankers},
                                             hidden, l2, market_l2, self.seed))
        fitted: dict[str, dict[str, float | int]] = {}
        rankers: dict[str, MarketRanker] = {}
        for market, ranker in self.rankers.items():
            found = self.examples[market]
            scorer, slate_scorer = scorers[market], slate_scorers[market]
            rankers[market] = replace(ranker, scorer=scorer, slate_scorer=slate_scorer)
            fitted[market] = {
                "valid_users": found.n_users,
                "valid_recall": round(found.recall, 6),
                "valid_ndcg@10_in_sample": _ndcg(scorer, found.examples, found.n_users),
            }
            if slate_scorer is not None:
                # both scorers on the slates: what the slate scorer buys there
                fitted[market]["valid_slate_ndcg@10_in_sample"] = _ndcg(
                    slate_scorer, found.slates, len(found.slates))
                fitted[market]["valid_slate_ndcg@10_pool_scorer"] = _ndcg(
                    scorer, found.slates, len(found.slates))
            logger.info("ranker market=%s %s", market,
                        " ".join(f"{k}={v}" for k, v in fitted[market].items()))
        return FittedRankers(rankers, fitted, time.perf_counter() - self.started)


def fit_scorers(examples: dict[str, list[tuple[np.ndarray, int]]], hidden: int, l2: float,
                market_l2: float, seed: int) -> dict[str, Scorer]:
    """Each market's scorer: the one fitted on every market's examples, or with `market_l2` > 0
    that one refitted on the market's own examples, pulled towards it with that weight."""
    shared = fit_scorer([e for found in examples.values() for e in found], hidden=hidden,
                        l2=l2, seed=seed)
    if not market_l2:
        return dict.fromkeys(examples, shared)
    return {m: fit_scorer(found, hidden=hidden, l2=l2, seed=seed, start=shared, pull=market_l2)
            if found else shared for m, found in examples.items()}


def _ndcg(scorer: Scorer, examples: list[tuple[np.ndarray, int]], n_users: int) -> float:
    """Mean NDCG@10 of the examples' targets over `n_users` (users without an example: 0)."""
    gain = sum(float(ndcg(np.asarray([_rank(scorer.score(f), t)]), 10)) for f, t in examples)
    return round(gain / max(n_users, 1), 6)


def _rank(scores: np.ndarray, target: int) -> int:
    """0-based rank of the target; ties count against it (as `metrics.rank_of_target`)."""
    return int((scores >= scores[target]).sum()) - 1


class ServedScorer:
    """What the service returns for a session, as harness scores (B, n_rows): the served top
    `depth` items get their served scores, every other item -inf (never recommended).

    For sampled protocols (`score_candidates`) every candidate is scored, as the service
    scores a request's explicit `candidates`."""

    def __init__(self, ranker: MarketRanker, items: ItemVectors, model: Bert4XMR,
                 market_row: int, device: str = "cpu", depth: int = 100) -> None:
        self.bound = bind(ranker, items, model.config.max_len)
        self.model, self.market_row, self.device, self.depth = model, market_row, device, depth
        self.n_rows = model.config.n_rows

    def _users(self, sessions: list[list[int]]) -> np.ndarray:
        return encode_sessions(self.model, sessions, self.market_row,
                               self.device).float().cpu().numpy()

    def __call__(self, sessions: list[list[int]]) -> torch.Tensor:
        users = self._users(sessions)
        hits = retrieve(self.bound.items, users, self.bound.spec.retrieve)
        out = torch.full((len(sessions), self.n_rows), float("-inf"), dtype=torch.float64)
        for b, session in enumerate(sessions):
            served = rank_session(self.bound, session, users[b], hits[b], None, session,
                                  self.depth)
            for row, score in served:
                out[b, row] = score
        return out

    def score_candidates(self, sessions: list[list[int]], candidates: np.ndarray
                         ) -> torch.Tensor:
        """(B, C) served scores of each session's candidate rows; rows the market does not
        sell get -inf (the service reports them as unknown and ranks the rest)."""
        users = self._users(sessions)
        out = torch.full(candidates.shape, float("-inf"), dtype=torch.float64)
        for b, session in enumerate(sessions):
            given = candidates[b].tolist()
            served = dict(rank_session(self.bound, session, users[b], None, given, session,
                                       len(given)))
            for c, row in enumerate(given):
                if row in served:
                    out[b, c] = served[row]
        return out
