"""The served ranking's second stage: what `POST /markets/{m}/recommend` returns and what the
harness scores as `served`, computed by the one function `rank_session`.

Candidates are the model's inner-product top-N (the market's index) together with the items
that co-occur most with the session (recency-weighted), minus the session's own items. Each
candidate gets features: the model score, recency-weighted sums of item-to-item statistics
(cosine co-occurrence over all markets, in-order transitions, the market's own co-occurrence),
the market's and all markets' popularity, and the cosine of its vector with the newest session
items' vectors. A small scorer fitted on validation items only (`fit_scorer`) turns them into
the served score. numpy only: the service imports this module on hosts without torch (fitting
imports torch itself).
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from training.checkpoint import file_sha256
from training.item_table import SoldVectors

# Item-to-item statistics stored per neighbour pair (i in the session, j a candidate):
# "cooc"  |users with i and j| / sqrt(|users with i| |users with j|), all markets;
# "next"  |users with j within NEXT_WINDOW items after i| / sqrt(..), all markets;
# "local" the cosine co-occurrence of the market alone.
PAIR_STATS = ("cooc", "next", "local")
NEXT_WINDOW = 3


@dataclass(frozen=True)
class Aggregate:
    """A session-level sum over the session's items t of decay**age_t * stat(item_t, j);
    `decay` 0 keeps the newest item only. `pop_shift` > 0 multiplies each term by
    (n_j / n_i) ** pop_shift (global counts): it favours the more popular of two neighbours."""

    stat: str
    decay: float
    pop_shift: float = 0.0

    @property
    def name(self) -> str:
        shift = f"~p{self.pop_shift:g}" if self.pop_shift else ""
        return f"{self.stat}@{self.decay:g}{shift}"


@dataclass(frozen=True)
class RankerSpec:
    """What the ranker computes: its candidates and its features (in order)."""

    aggregates: tuple[Aggregate, ...] = (
        Aggregate("cooc", 1.0),
        Aggregate("cooc", 0.6),
        Aggregate("cooc", 0.3),
        Aggregate("cooc", 0.0),
        Aggregate("cooc", 0.6, 0.2),
        Aggregate("next", 0.6),
        Aggregate("local", 0.6),
    )
    retrieve: int = 100  # the model's candidates (inner-product top-N)
    expand: int = 100  # co-occurrence candidates, by the `expand_by` aggregate
    expand_by: int = 1  # index into `aggregates`
    neighbours: int = 50  # most similar items kept per item (by "cooc")
    # > 0: three more features, the cosine of the candidate's vector v_m(j) with the newest
    # session item's, and its largest and mean cosine with the `similar` newest items' (0
    # where the session has none the market sells)
    similar: int = 0

    @cached_property  # read on every request: built once (the dataclass is frozen)
    def feature_names(self) -> tuple[str, ...]:
        names = ["model", "log_pop", "log_global_pop"]
        for aggregate in self.aggregates:
            names += [aggregate.name, f"log({aggregate.name})"]
        if self.similar:
            names += ["cos_newest", f"cos_max@{self.similar}", f"cos_mean@{self.similar}"]
        return tuple(names)


@dataclass(frozen=True)
class Neighbours:
    """Each item row's most co-occurring items sold in one market, as CSR arrays: the
    neighbours of row i are cols[indptr[i]:indptr[i+1]] (item rows) with their PAIR_STATS in
    values. This is the stored form; `bind` turns it into positions of a market's index."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    cols: np.ndarray  # (nnz,) int64 item rows
    values: np.ndarray  # (nnz, len(PAIR_STATS)) float32


@dataclass(frozen=True)
class Scorer:
    """A fitted scorer over standardised features: a linear model, or one hidden tanh layer
    when `hidden` weights are present. score = w2 . tanh(W1 z + b1) (+ b2, irrelevant to order)
    or w . z, with z = (features - mean) / scale."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F,) linear, or (H,) output weights with a hidden layer
    hidden_weights: np.ndarray | None = None  # (H, F)
    hidden_bias: np.ndarray | None = None  # (H,)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(C, F) -> (C,) float64."""
        if self.hidden_weights is None or self.hidden_bias is None:
            weights, offset = self._linear
            return features @ weights - offset
        z = (features - self.mean) / self.scale
        return np.tanh(z @ self.hidden_weights.T + self.hidden_bias) @ self.weights

    @cached_property
    def _linear(self) -> tuple[np.ndarray, float]:
        """A linear scorer folded into one product: w . (f - mean) / scale = (w / scale) . f
        - w . mean / scale (no standardised copy of the features per request)."""
        weights = self.weights / self.scale
        return weights, float(self.mean @ weights)


@dataclass(frozen=True)
class MarketRanker:
    """What one market's second stage needs besides the model's vectors, as stored: the
    neighbour table and popularity by item row, the spec and the fitted scorers.

    `scorer` orders the retrieved pool (the model's hits and co-occurring items: the hardest
    competitors); `slate_scorer` orders an explicit candidate list, whose items are mostly
    not the session's neighbours, so popularity and the model's score weigh differently
    there. It is fitted on validation targets among items drawn at random from the market
    (`training.served`); a ranker without one orders slates with `scorer`."""

    spec: RankerSpec
    neighbours: Neighbours
    pop: np.ndarray  # (n_rows,) float32: the market's training interactions per item
    global_pop: np.ndarray  # (n_rows,) float32: users of the item in all markets' training
    scorer: Scorer
    slate_scorer: Scorer | None = None

    def scorer_for(self, slate: bool) -> Scorer:
        return self.slate_scorer if slate and self.slate_scorer is not None else self.scorer


@dataclass(frozen=True)
class ItemVectors:
    """The market's items and their vectors v_m(i), as the index holds them."""

    rows: np.ndarray  # (N,) item rows sold in the market
    # (N, D) float32; served, `SoldVectors` computes them on demand from the shared table
    vectors: np.ndarray | SoldVectors
    position: np.ndarray  # (n_rows,) index of each row in `rows`, -1 where not sold


@dataclass(frozen=True)
class SessionTerms:
    """What `features` reads of a session besides its candidates: the `aggregate` keys and
    sums, and the index positions of its newest sold items, newest first (at most
    `RankerSpec.similar`)."""

    keys: np.ndarray  # (U,) distinct positions (in no particular order)
    sums: np.ndarray  # (U, A)
    recent: np.ndarray  # (R,) positions


@dataclass(frozen=True)
class BoundRanker:
    """A MarketRanker joined to a market's ItemVectors: candidates are index positions
    (0..N), and the neighbour table names its items by those positions."""

    ranker: MarketRanker
    items: ItemVectors
    cols: np.ndarray  # (nnz,) int64 positions of the neighbours in `items`
    # (nnz, A) float64: each neighbour entry's statistic as each aggregate sums it, its
    # pop_shift factor (n_j / n_i) ** shift already applied (computed once, at bind); one row
    # per entry, so a request gathers its entries' rows whole.
    terms: np.ndarray
    weights: np.ndarray  # (max_len, A) float64: decay ** age of each aggregate
    log_pop: np.ndarray  # (N,) float64 by position
    log_global_pop: np.ndarray  # (N,) float64 by position
    # (N,) float32: each item vector's length, where the vectors are held as one array (else
    # computed per request for the few vectors read)
    norms: np.ndarray | None = None

    @property
    def spec(self) -> RankerSpec:
        return self.ranker.spec


def bind(ranker: MarketRanker, items: ItemVectors, max_len: int) -> BoundRanker:
    """Join a ranker to the index it serves with; every neighbour must be sold there."""
    cols = items.position[ranker.neighbours.cols]
    if len(cols) and cols.min() < 0:
        raise ValueError("the neighbour table names items the market's index does not hold")
    spec = ranker.spec
    table = ranker.neighbours
    decays = np.asarray([a.decay for a in spec.aggregates], dtype=np.float64)
    stat_of = [PAIR_STATS.index(a.stat) for a in spec.aggregates]
    terms = table.values[:, stat_of].astype(np.float64)  # (nnz, A)
    shifted = [k for k, a in enumerate(spec.aggregates) if a.pop_shift]
    if shifted:  # (n_j / n_i) ** shift, as exp(shift * (log n_j - log n_i)), global counts
        log_users = np.log(np.maximum(ranker.global_pop.astype(np.float64), 1.0))
        owner = np.repeat(np.arange(len(table.indptr) - 1), np.diff(table.indptr))  # (nnz,)
        gap = log_users[table.cols] - log_users[owner]
        shifts = np.asarray([spec.aggregates[k].pop_shift for k in shifted])
        terms[:, shifted] *= np.exp(gap[:, None] * shifts[None, :])
    return BoundRanker(
        ranker, items, cols.astype(np.int64), np.ascontiguousarray(terms),
        decays[None, :] ** np.arange(max_len, dtype=np.float64)[:, None],  # 0 ** 0 = 1
        np.log1p(ranker.pop[items.rows].astype(np.float64)),
        np.log1p(ranker.global_pop[items.rows].astype(np.float64)),
        np.linalg.norm(items.vectors, axis=1) if isinstance(items.vectors, np.ndarray)
        else None,
    )


def session_arrays(session: Sequence[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The session's last `max_len` distinct rows (newest occurrence kept) and their ages
    (0 = newest)."""
    seen: dict[int, int] = {}
    tail = list(session)[-max_len:]
    for age, row in enumerate(reversed(tail)):
        seen.setdefault(row, age)
    rows = np.fromiter(seen.keys(), dtype=np.int64, count=len(seen))
    ages = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
    return rows, ages


_SCRATCH = threading.local()


def _slots(n: int) -> np.ndarray:
    """This thread's scratch array of at least `n` ints, left as the last use left it: a
    caller writes every slot it reads, so no request costs O(market size)."""
    slots: np.ndarray | None = getattr(_SCRATCH, "slots", None)
    if slots is None or len(slots) < n:
        slots = _SCRATCH.slots = np.empty(max(n, 1024), dtype=np.intp)
    return slots


def aggregate(bound: BoundRanker, rows: np.ndarray, ages: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Every market item co-occurring with the session: (U,) distinct positions and (U, A) the
    aggregates' sums. Sparse on purpose: a request touches a few hundred neighbours, so its
    cost follows them, not the market's size. The entries of one item are summed in session
    order (a bincount over entry groups: no sort of the entries)."""
    table = bound.ranker.neighbours
    starts = table.indptr[rows]
    lengths = table.indptr[rows + 1] - starts  # (T,)
    total = int(lengths.sum())
    n_aggregates = bound.terms.shape[1]
    if not total:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_aggregates), dtype=np.float64)
    entries = np.arange(total, dtype=np.int64) + np.repeat(
        starts - np.cumsum(lengths) + lengths, lengths)  # (E,)
    cols = bound.cols[entries]  # (E,) candidate positions, repeated across session items
    # Group entries by position: each position's slot names one of its entries (the last
    # written); entries naming themselves are the groups' representatives, in entry order.
    slots = _slots(len(bound.items.rows))
    serial = np.arange(total)
    slots[cols] = serial
    representative = slots[cols]  # (E,)
    first = representative == serial
    group = (np.cumsum(first) - 1)[representative]  # (E,) in 0..U-1
    keys = cols[first]  # (U,) positions, in order of their last entry
    contribution = bound.terms[entries] * np.repeat(bound.weights[ages], lengths, axis=0)
    flat = (group[:, None] * n_aggregates + np.arange(n_aggregates)).ravel()
    sums = np.bincount(flat, weights=contribution.ravel(),
                       minlength=len(keys) * n_aggregates).reshape(len(keys), n_aggregates)
    return keys, sums


def features(bound: BoundRanker, user: np.ndarray, pool: np.ndarray, terms: SessionTerms
             ) -> np.ndarray:
    """(C, F) features of candidate positions, in RankerSpec.feature_names order."""
    keys, sums = terms.keys, terms.sums
    n_aggregated = 3 + 2 * sums.shape[1]
    out = np.zeros((len(pool), len(bound.spec.feature_names)), dtype=np.float64)
    if len(keys):
        # each key's index through the scratch slots (stale slots are caught by the check)
        slots = _slots(len(bound.items.rows))
        slots[keys] = np.arange(len(keys))
        at = slots[pool]
        found = np.flatnonzero((at >= 0) & (at < len(keys)))
        found = found[keys[at[found]] == pool[found]]
        agg = sums[at[found]]  # (C', A)
        out[found, 3:n_aggregated:2] = agg
        out[found, 4:n_aggregated:2] = np.log1p(10.0 * agg)
    vectors = bound.items.vectors[pool]  # (C, D)
    out[:, 0] = vectors @ user.astype(np.float32)
    out[:, 1] = bound.log_pop[pool]
    out[:, 2] = bound.log_global_pop[pool]
    if bound.spec.similar and len(terms.recent) and len(pool):
        recent = bound.items.vectors[terms.recent]  # (R, D)
        if bound.norms is not None:
            lengths, recent_lengths = bound.norms[pool], bound.norms[terms.recent]
        else:
            lengths = np.linalg.norm(vectors, axis=1)
            recent_lengths = np.linalg.norm(recent, axis=1)
        # (R, C): the reductions over the session's items run along the outer axis
        cosine = recent @ vectors.T
        cosine /= np.maximum(recent_lengths[:, None] * lengths[None, :], 1e-12)
        out[:, n_aggregated] = cosine[0]
        out[:, n_aggregated + 1] = cosine.max(axis=0)
        out[:, n_aggregated + 2] = cosine.sum(axis=0) / len(cosine)
    return out


def _members(positions: np.ndarray, of: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(P,) bool: which `positions` are among the positions `of` (both >= 0)."""
    slots[positions] = 0
    slots[of] = 1
    return slots[positions] == 1


def _distinct(positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The distinct `positions` (>= 0), sorted."""
    serial = np.arange(len(positions))
    slots[positions] = serial
    return np.sort(positions[slots[positions] == serial])


def _sold(position: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of the `rows` sold in the market (unsold rows, position -1, dropped)."""
    found = position[rows]
    return found[found >= 0]


def candidate_pool(bound: BoundRanker, hits: np.ndarray, keys: np.ndarray, sums: np.ndarray,
                   excluded: np.ndarray) -> np.ndarray:
    """Sorted positions: the model's hits (item rows; FAISS misses -1 dropped) and the
    `expand` items co-occurring most with the session, minus `excluded` rows. Costs what
    the candidates number, not the market's size."""
    spec = bound.spec
    slots = _slots(len(bound.items.rows))
    dropped = _sold(bound.items.position, excluded)
    keep = ~_members(keys, dropped, slots)  # the session's own items take no co-occurrence slot
    linked, by = keys[keep], sums[keep, spec.expand_by]
    if len(linked) > spec.expand:
        linked = linked[np.argpartition(-by, spec.expand - 1)[: spec.expand]]
    pool = _distinct(np.concatenate((_sold(bound.items.position, hits[hits >= 0]), linked)),
                     slots)
    return pool[~_members(pool, dropped, slots)]


def session_candidates(bound: BoundRanker, session: Sequence[int], hits: np.ndarray | None,
                       candidates: Sequence[int] | None, excluded: Iterable[int]
                       ) -> tuple[np.ndarray, SessionTerms]:
    """One session's candidate positions (sorted) with what `features` reads of the session:
    the pool `rank_session` scores, and the one the ranker is fitted on. `hits`,
    `candidates` and `excluded` as in `rank_session`."""
    rows, ages = session_arrays(session, len(bound.weights))
    keys, sums = aggregate(bound, rows, ages)
    recent = np.zeros(0, dtype=np.int64)
    if bound.spec.similar:
        positions = bound.items.position[rows[np.argsort(ages)]]
        recent = positions[positions >= 0][: bound.spec.similar]
    terms = SessionTerms(keys, sums, recent)
    excluded_rows = np.fromiter(excluded, dtype=np.int64)
    if candidates is not None:
        return candidate_list(bound, candidates, excluded_rows), terms
    assert hits is not None
    return candidate_pool(bound, np.asarray(hits, dtype=np.int64), keys, sums,
                          excluded_rows), terms


def candidate_list(bound: BoundRanker, candidates: Iterable[int], excluded: np.ndarray
                   ) -> np.ndarray:
    """Sorted positions of explicit candidate rows, minus `excluded` rows and rows the
    market does not sell."""
    slots = _slots(len(bound.items.rows))
    found = _distinct(_sold(bound.items.position, np.fromiter(candidates, dtype=np.int64)),
                      slots)
    return found[~_members(found, _sold(bound.items.position, excluded), slots)]


def rank_session(bound: BoundRanker, session: Sequence[int], user: np.ndarray,
                 hits: np.ndarray | None, candidates: Sequence[int] | None,
                 excluded: Iterable[int], k: int) -> list[tuple[int, float]]:
    """The served top-k (item row, score) of one session, best first.

    `hits` are the model's retrieved rows (the index's top `spec.retrieve`, -1 for misses);
    with explicit `candidates` (rows sold in the market) only those are ranked and `hits` is
    not used (and the ranker's slate scorer orders them). `excluded` rows are never returned.
    Equal scores are ordered by row."""
    pool, terms = session_candidates(bound, session, hits, candidates, excluded)
    if not len(pool):
        return []
    scorer = bound.ranker.scorer_for(slate=candidates is not None)
    scores = scorer.score(features(bound, user, pool, terms))  # (C,)
    found = bound.items.rows[pool]
    if len(scores) > k:  # only the candidates scoring at least the k-th best can be returned
        kept = np.flatnonzero(scores >= -np.partition(-scores, k - 1)[k - 1])
        order = kept[np.lexsort((found[kept], -scores[kept]))[:k]]
    else:
        order = np.lexsort((found, -scores))[:k]
    return [(int(found[i]), float(scores[i])) for i in order.tolist()]


@dataclass(frozen=True)
class PairCounts:
    """Users per item pair, as sorted keys (i * n_rows + j, i != j), and users per item."""

    keys: np.ndarray  # (P,) int64, sorted
    users: np.ndarray  # (P,) float64
    item_users: np.ndarray  # (n_rows,) int64

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Users of each pair key (0 where the pair never occurs)."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.float64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, self.users[at], 0.0)

    def cosine(self, keys: np.ndarray | None = None) -> np.ndarray:
        """Cosine co-occurrence of each pair key (by default every counted pair):
        |users with i and j| / sqrt(|users with i| |users with j|), 0 where never together."""
        n_rows = len(self.item_users)
        if keys is None:
            keys, together = self.keys, self.users
        else:
            together = self.lookup(keys)
        i, j = keys // n_rows, keys % n_rows
        return together / np.sqrt(np.maximum(self.item_users[i], 1)
                                  * np.maximum(self.item_users[j], 1))


def count_pairs(sequences: Sequence[Sequence[int]], n_rows: int, ordered: bool) -> PairCounts:
    """Users per item pair: any two items of a session, or with `ordered` j within
    NEXT_WINDOW items after i. A user counts once per pair."""
    item_users = np.zeros(n_rows, dtype=np.int64)
    chunks: list[np.ndarray] = []
    for seq in sequences:
        s = np.asarray(seq, dtype=np.int64)
        item_users[np.unique(s)] += 1
        if len(s) < 2:
            continue
        a, b = np.meshgrid(np.arange(len(s)), np.arange(len(s)), indexing="ij")
        pair = ((b > a) & (b - a <= NEXT_WINDOW)) if ordered else (a != b)
        keys = np.unique(s[a[pair]] * n_rows + s[b[pair]])
        chunks.append(keys[keys // n_rows != keys % n_rows])
    if not chunks:
        return PairCounts(np.zeros(0, dtype=np.int64), np.zeros(0), item_users)
    keys, users = np.unique(np.concatenate(chunks), return_counts=True)
    return PairCounts(keys, users.astype(np.float64), item_users)


def strongest_per_row(i: np.ndarray, j: np.ndarray, strength: np.ndarray, keep: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each row i's `keep` strongest pairs (ties: lower j first): the positions of the kept
    pairs, ordered by row then strength, and each one's rank within its row."""
    order = np.lexsort((j, -strength, i))
    row = i[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    kept = rank < keep
    return order[kept], rank[kept]


def build_neighbours(cooc: PairCounts, ordered: PairCounts, local: PairCounts,
                     market_items: np.ndarray, n_rows: int, keep: int) -> Neighbours:
    """The market's neighbour table: for each item row, its `keep` most co-occurring items
    (by "cooc", all markets) among `market_items`, with the PAIR_STATS ("next" from the
    `ordered` counts of all markets, "local" from the market's own counts)."""
    sold = np.zeros(n_rows, dtype=bool)
    sold[market_items] = True
    keys = cooc.keys[sold[cooc.keys % n_rows]]  # sorted: by i, then j
    values = np.stack([cooc.cosine(keys), ordered.cosine(keys), local.cosine(keys)],
                      axis=1).astype(np.float32)  # (P, S)
    i, j = keys // n_rows, keys % n_rows
    kept, _ = strongest_per_row(i, j, values[:, 0], keep)  # each row's best by cooc
    i, j, values = i[kept], j[kept], values[kept]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, i + 1, 1)
    return Neighbours(np.cumsum(indptr), j.astype(np.int64), values)


def fit_scorer(examples: Sequence[tuple[np.ndarray, int]], hidden: int = 0, l2: float = 1e-3,
               steps: int = 100, seed: int = 0, start: Scorer | None = None,
               pull: float = 0.0) -> Scorer:
    """Fit a scorer by softmax cross-entropy of each example's target among its candidates
    (full-batch L-BFGS; an L2 penalty on the weights).

    `examples` are (features (C, F), index of the target among the C candidates); an example
    whose target was not retrieved cannot teach the order and is left out by the caller.
    With `start` (a scorer of the same form) the fit starts from its weights, keeps its
    standardisation, and the penalty is `pull` times the squared distance from its weights
    instead: a few examples then move a shared scorer only as far as they can support."""
    import torch  # fitting only: serving scores with numpy

    if not examples:
        raise ValueError("no examples to fit the ranker on (no validation targets retrieved)")
    stacked = np.concatenate([f for f, _ in examples]).astype(np.float32)  # (total, F)
    if start is not None:
        if (start.hidden_weights is None) != (hidden == 0) or (
                start.hidden_weights is not None and start.hidden_weights.shape[0] != hidden):
            raise ValueError("`start` must have the form being fitted")
        mean, scale = start.mean, start.scale
    else:
        mean = stacked.mean(0, dtype=np.float64)
        scale = np.maximum(stacked.std(0, dtype=np.float64), 1e-6)
    x = torch.from_numpy(((stacked - mean) / scale).astype(np.float32))
    sizes = torch.as_tensor([len(f) for f, _ in examples])
    segment = torch.repeat_interleave(torch.arange(len(examples)), sizes)  # (total,)
    starts = torch.cumsum(sizes, 0) - sizes
    target = starts + torch.as_tensor([t for _, t in examples])  # (E,) rows of the targets
    generator = torch.Generator().manual_seed(seed)
    n_features = x.shape[1]
    first = (torch.randn(hidden, n_features, generator=generator)
             / math.sqrt(n_features)).requires_grad_() if hidden else None
    bias = torch.zeros(hidden, requires_grad=True) if hidden else None
    out = torch.zeros(hidden or n_features, requires_grad=True)
    if start is not None:
        with torch.no_grad():
            out.copy_(torch.from_numpy(start.weights))
            if first is not None and bias is not None:
                assert start.hidden_weights is not None and start.hidden_bias is not None
                first.copy_(torch.from_numpy(start.hidden_weights))
                bias.copy_(torch.from_numpy(start.hidden_bias))
    params = [p for p in (first, bias, out) if p is not None]
    anchors = [p.detach().clone() for p in params]

    def loss_fn() -> torch.Tensor:
        z = torch.tanh(x @ first.T + bias) if first is not None and bias is not None else x
        scores = z @ out  # (total,)
        top = torch.full((len(examples),), -math.inf, dtype=scores.dtype).scatter_reduce(
            0, segment, scores, "amax")
        total = torch.zeros(len(examples), dtype=scores.dtype).index_add(
            0, segment, torch.exp(scores - top[segment]))
        nll = (torch.log(total) + top - scores[target]).mean()
        if start is not None:
            return nll + pull * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors,
                                                                        strict=True))
        return nll + l2 * sum((p ** 2).sum() for p in params if p is not bias)

    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Scorer(
        mean=mean, scale=scale, weights=out.detach().double().numpy(),
        hidden_weights=None if first is None else first.detach().double().numpy(),
        hidden_bias=None if bias is None else bias.detach().double().numpy(),
    )


# ---- files: `ranker.json` (the spec, the fitted scorer, what it is tied to) and
# `neighbours-<sha12>.npz` (the market's neighbour table and popularity), both written by
# `xmr train` into the market's checkpoint directory.

RANKER_MANIFEST = "ranker.json"
SCHEMA_VERSION = 1


class RankerError(ValueError):
    """A ranker file that is missing, corrupt or not made for the checkpoint beside it; the
    message names the file."""


def _spec_json(spec: RankerSpec) -> dict[str, Any]:
    return {
        "aggregates": [
            {"stat": a.stat, "decay": a.decay, "pop_shift": a.pop_shift} for a in spec.aggregates
        ],
        "retrieve": spec.retrieve, "expand": spec.expand, "expand_by": spec.expand_by,
        "neighbours": spec.neighbours, "similar": spec.similar,
    }


def _spec_from_json(data: dict[str, Any]) -> RankerSpec:
    aggregates = tuple(Aggregate(str(a["stat"]), float(a["decay"]), float(a["pop_shift"]))
                       for a in data["aggregates"])
    unknown = [a.stat for a in aggregates if a.stat not in PAIR_STATS]
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown}; known {list(PAIR_STATS)}")
    spec = RankerSpec(aggregates, int(data["retrieve"]), int(data["expand"]),
                      int(data["expand_by"]), int(data["neighbours"]),
                      int(data.get("similar", 0)))  # absent in rankers written before it
    if not 0 <= spec.expand_by < len(aggregates):
        raise ValueError(f"expand_by {spec.expand_by} is not an aggregate's index")
    if spec.similar < 0:
        raise ValueError(f"similar {spec.similar} is negative")
    return spec


def _scorer_json(scorer: Scorer) -> dict[str, Any]:
    return {
        "mean": scorer.mean.tolist(), "scale": scorer.scale.tolist(),
        "weights": scorer.weights.tolist(),
        "hidden_weights": None if scorer.hidden_weights is None
        else scorer.hidden_weights.tolist(),
        "hidden_bias": None if scorer.hidden_bias is None else scorer.hidden_bias.tolist(),
    }


def _scorer_from_json(data: dict[str, Any], n_features: int) -> Scorer:
    def array(value: Any) -> np.ndarray:
        return np.asarray(value, dtype=np.float64)

    def optional(value: Any) -> np.ndarray | None:
        return None if value is None else array(value)

    scorer = Scorer(array(data["mean"]), array(data["scale"]), array(data["weights"]),
                    optional(data["hidden_weights"]), optional(data["hidden_bias"]))
    hidden = scorer.hidden_weights
    expected_out = n_features if hidden is None else hidden.shape[0]
    if (scorer.mean.shape != (n_features,) or scorer.scale.shape != (n_features,)
            or scorer.weights.shape != (expected_out,)
            or (hidden is not None and (hidden.shape[1] != n_features or scorer.hidden_bias is None
                                        or scorer.hidden_bias.shape != (expected_out,)))):
        raise ValueError(f"scorer shapes do not fit {n_features} features")
    if not all(np.isfinite(a).all() for a in (scorer.mean, scorer.scale, scorer.weights)):
        raise ValueError("scorer holds non-finite numbers")
    return scorer


def save_ranker(market_dir: Path, ranker: MarketRanker, weights_sha256: str,
                fitted: dict[str, Any]) -> Path:
    """Write `neighbours-<sha12>.npz`, then atomically `ranker.json` naming it and the market
    checkpoint's weights; files of earlier rankers go."""
    tmp = market_dir / f".neighbours-{uuid.uuid4().hex[:8]}.tmp.npz"
    try:
        with tmp.open("wb") as f:
            np.savez(f, indptr=ranker.neighbours.indptr, cols=ranker.neighbours.cols,
                     values=ranker.neighbours.values, pop=ranker.pop,
                     global_pop=ranker.global_pop)
        sha = file_sha256(tmp)
        name = f"neighbours-{sha[:12]}.npz"
        os.replace(tmp, market_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {
        "schema_version": SCHEMA_VERSION, "weights_sha256": weights_sha256,
        "neighbours_file": name, "neighbours_sha256": sha, "n_rows": len(ranker.pop),
        "spec": _spec_json(ranker.spec), "features": list(ranker.spec.feature_names),
        "scorer": _scorer_json(ranker.scorer),
        "slate_scorer": None if ranker.slate_scorer is None
        else _scorer_json(ranker.slate_scorer),
        "fitted": fitted,
    }
    tmp_manifest = market_dir / f".{RANKER_MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp_manifest, market_dir / RANKER_MANIFEST)
    finally:
        tmp_manifest.unlink(missing_ok=True)
    for old in market_dir.glob("neighbours-*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return market_dir / RANKER_MANIFEST


def load_ranker(market_dir: Path, weights_sha256: str, n_rows: int) -> MarketRanker | None:
    """The market's ranker, checked against the checkpoint's weights and vocabulary; None
    where the directory holds no `ranker.json` (the model's own ranking then serves)."""
    path = market_dir / RANKER_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RankerError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise RankerError(f"{path}: schema_version {version!r}, this reader knows "
                          f"{SCHEMA_VERSION}; retrain with `xmr train`")
    if data.get("weights_sha256") != weights_sha256:
        raise RankerError(f"{path}: fitted for weights {str(data.get('weights_sha256'))[:12]}, "
                          f"but the checkpoint holds {weights_sha256[:12]}; retrain with "
                          "`xmr train`")
    try:
        spec = _spec_from_json(data["spec"])
        scorer = _scorer_from_json(data["scorer"], len(spec.feature_names))
        slate = data.get("slate_scorer")  # absent in rankers written before it existed
        slate_scorer = (None if slate is None
                        else _scorer_from_json(slate, len(spec.feature_names)))
        name = str(data["neighbours_file"])
        sha = str(data["neighbours_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise RankerError(f"{path}: invalid ranker manifest ({e!r})") from e
    file = market_dir / name
    if file.parent != market_dir or not (name.startswith("neighbours-")
                                         and name.endswith(".npz")):
        raise RankerError(f"{path}: bad neighbours_file {name!r}")
    if not file.is_file():
        raise RankerError(f"{file}: missing (named by {RANKER_MANIFEST})")
    if file_sha256(file) != sha:
        raise RankerError(f"{file}: sha256 does not match {RANKER_MANIFEST} (corrupt file)")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            table = {key: arrays[key] for key in ("indptr", "cols", "values", "pop",
                                                  "global_pop")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise RankerError(f"{file}: unreadable neighbour table ({e!r})") from e
    indptr, cols, values = table["indptr"], table["cols"], table["values"]
    if (indptr.shape != (n_rows + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or cols.ndim != 1 or indptr[-1] != len(cols)
            or values.shape != (len(cols), len(PAIR_STATS))
            or (len(cols) and (cols.min() < 1 or cols.max() >= n_rows))
            or table["pop"].shape != (n_rows,) or table["global_pop"].shape != (n_rows,)
            or not np.isfinite(values).all()):
        raise RankerError(f"{file}: neighbour table does not fit a vocabulary of {n_rows} rows")
    neighbours = Neighbours(indptr.astype(np.int64), cols.astype(np.int64),
                            values.astype(np.float32))
    return MarketRanker(spec, neighbours, table["pop"].astype(np.float32),
                        table["global_pop"].astype(np.float32), scorer, slate_scorer)
