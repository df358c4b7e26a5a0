"""The served ranking's second stage: pair counts, the neighbour table, the per-session sums,
candidates, ordering, the fitted scorer and the ranker's files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from training.ranker import (
    PAIR_STATS,
    Aggregate,
    ItemVectors,
    MarketRanker,
    RankerError,
    RankerSpec,
    Scorer,
    aggregate,
    bind,
    build_neighbours,
    count_pairs,
    fit_scorer,
    load_ranker,
    rank_session,
    save_ranker,
    session_arrays,
)

N_ROWS = 8  # rows 1..7 are items, 0 is padding
SESSIONS = [[1, 2, 3], [1, 2], [2, 4, 5, 1], [6, 7]]


def test_count_pairs_counts_each_user_once() -> None:
    pairs = count_pairs([[1, 2, 3], [1, 2], [2, 1, 2]], N_ROWS, ordered=False)
    lookup = dict(zip(pairs.keys.tolist(), pairs.users.tolist(), strict=True))
    assert lookup[1 * N_ROWS + 2] == 3 and lookup[2 * N_ROWS + 1] == 3
    assert lookup[1 * N_ROWS + 3] == 1 and 2 * N_ROWS + 2 not in lookup
    assert pairs.item_users.tolist() == [0, 3, 3, 1, 0, 0, 0, 0]


def test_ordered_pairs_look_forward_within_the_window() -> None:
    pairs = count_pairs([[1, 2, 3, 4, 5]], N_ROWS, ordered=True)
    keys = {(int(k) // N_ROWS, int(k) % N_ROWS) for k in pairs.keys}
    assert (1, 2) in keys and (1, 4) in keys and (2, 1) not in keys
    assert (1, 5) not in keys  # 4 items after: beyond the window of 3


def neighbours_of(table, row: int) -> list[int]:  # type: ignore[no-untyped-def]
    return table.cols[table.indptr[row]:table.indptr[row + 1]].tolist()


def test_neighbours_are_the_markets_items_best_first_and_capped() -> None:
    cooc = count_pairs(SESSIONS, N_ROWS, ordered=False)
    ordered = count_pairs(SESSIONS, N_ROWS, ordered=True)
    local = count_pairs(SESSIONS[:2], N_ROWS, ordered=False)
    sold = np.asarray([1, 2, 3, 5], dtype=np.int64)
    table = build_neighbours(cooc, ordered, local, sold, N_ROWS, keep=2)
    # item 1 co-occurs with 2 (3 users), 3, 4, 5 (1 each); 4 is not sold; keep the best 2
    assert neighbours_of(table, 1) == [2, 3]
    assert neighbours_of(table, 6) == []  # 7 is not sold
    at = table.indptr[1]
    cosine = 3 / np.sqrt(3 * 3)  # users of 1 and 2: 3 each
    assert table.values[at, PAIR_STATS.index("cooc")] == pytest.approx(cosine)
    # local counts: sessions [1, 2, 3], [1, 2]: users of 1 and 2 are 2 each, both share
    assert table.values[at, PAIR_STATS.index("local")] == pytest.approx(2 / 2)


def small_ranker(spec: RankerSpec | None = None) -> tuple[MarketRanker, ItemVectors]:
    cooc = count_pairs(SESSIONS, N_ROWS, ordered=False)
    ordered = count_pairs(SESSIONS, N_ROWS, ordered=True)
    sold = np.arange(1, N_ROWS, dtype=np.int64)
    table = build_neighbours(cooc, ordered, cooc, sold, N_ROWS, keep=10)
    spec = spec or RankerSpec(retrieve=3, expand=2)
    n_features = len(spec.feature_names)
    scorer = Scorer(np.zeros(n_features), np.ones(n_features),
                    np.linspace(1.0, 0.1, n_features))
    ranker = MarketRanker(spec, table, np.arange(N_ROWS, dtype=np.float32),
                          cooc.item_users.astype(np.float32), scorer)
    rng = np.random.default_rng(0)
    rows = np.asarray([3, 1, 7, 2, 6, 4, 5], dtype=np.int64)  # an index's own order
    position = np.full(N_ROWS, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    items = ItemVectors(rows, rng.normal(size=(len(rows), 4)).astype(np.float32), position)
    return ranker, items


def test_aggregate_sums_decayed_statistics_of_the_sessions_items() -> None:
    spec = RankerSpec(aggregates=(Aggregate("cooc", 0.5), Aggregate("cooc", 0.0),
                                  Aggregate("next", 1.0, 0.5)), retrieve=3, expand=2)
    ranker, items = small_ranker(spec)
    bound = bind(ranker, items, max_len=10)
    rows, ages = session_arrays([4, 2, 1], max_len=10)  # ages: 1 -> 0, 2 -> 1, 4 -> 2
    keys, sums = aggregate(bound, rows, ages)
    table = ranker.neighbours

    def stat(i: int, j: int, name: str) -> float:
        cols = neighbours_of(table, i)
        return float(table.values[table.indptr[i] + cols.index(j), PAIR_STATS.index(name)]) \
            if j in cols else 0.0

    users = np.maximum(ranker.global_pop, 1)
    for key, total in zip(keys.tolist(), sums, strict=True):
        j = int(items.rows[key])
        age = {1: 0, 2: 1, 4: 2}
        expected = [
            sum(0.5 ** a * stat(i, j, "cooc") for i, a in age.items()),
            stat(1, j, "cooc"),
            sum(stat(i, j, "next") * (users[j] / users[i]) ** 0.5 for i in age),
        ]
        assert total == pytest.approx(expected, rel=1e-5)
    assert sorted(items.rows[keys].tolist()) == [1, 2, 3, 4, 5]  # 6, 7 never co-occur


def test_rank_session_ranks_hits_and_neighbours_minus_the_session() -> None:
    ranker, items = small_ranker()
    bound = bind(ranker, items, max_len=10)
    user = np.ones(4, dtype=np.float32)
    ranked = rank_session(bound, [1, 2], user, np.asarray([6, 7, -1]), None, [1, 2], k=10)
    rows = [row for row, _ in ranked]
    assert set(rows) == {6, 7, 3, 4}  # hits 6, 7 and the top-2 neighbours 3, 4 (or 5)
    assert not {1, 2} & set(rows)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    # Explicit candidates: exactly those, minus the session and items not sold (0 = padding)
    explicit = rank_session(bound, [1, 2], user, None, [5, 2, 0, 7], [1, 2], k=10)
    assert {row for row, _ in explicit} == {5, 7}
    assert rank_session(bound, [1, 2], user, None, [1], [1, 2], k=10) == []


def test_rank_session_does_not_depend_on_earlier_calls_in_the_thread() -> None:
    # The candidate steps reuse a per-thread scratch array without clearing it: what a call
    # leaves there must never reach the next one.
    ranker, items = small_ranker()
    bound = bind(ranker, items, max_len=10)
    user = np.ones(4, dtype=np.float32)
    sessions = [[1, 2], [6], [4, 5, 3], [7, 1], [2, 2, 5]]

    def ranks(order: list[int]) -> dict[int, object]:
        return {i: (rank_session(bound, sessions[i], user, np.asarray([6, 7, 3]), None,
                                 sessions[i], k=10),
                    rank_session(bound, sessions[i], user, None, [5, 7, 3, 1], sessions[i], k=10))
                for i in order}

    fresh: dict[int, object] = {}
    for i in range(len(sessions)):  # each in a new thread: a new, empty scratch
        worker = threading.Thread(target=lambda i=i: fresh.update(ranks([i])))
        worker.start()
        worker.join()
    assert ranks([4, 0, 3, 1, 2]) == fresh


def test_excluded_rows_the_market_does_not_sell_exclude_nothing_else() -> None:
    ranker, items = small_ranker()
    bound = bind(ranker, items, max_len=10)
    # row 0 (padding) is not sold: position -1, which must not stand for the last position
    last = int(items.rows[-1])
    explicit = rank_session(bound, [1], np.ones(4, np.float32), None, [last, 7], [0], k=10)
    assert {row for row, _ in explicit} == {last, 7}
    pooled = rank_session(bound, [1], np.ones(4, np.float32), np.asarray([last]), None, [0],
                          k=10)
    assert last in {row for row, _ in pooled}


def test_rank_session_breaks_equal_scores_by_row() -> None:
    ranker, items = small_ranker()
    n_features = len(ranker.spec.feature_names)
    flat = MarketRanker(ranker.spec, ranker.neighbours, ranker.pop, ranker.global_pop,
                        Scorer(np.zeros(n_features), np.ones(n_features), np.zeros(n_features)))
    bound = bind(flat, items, max_len=10)
    ranked = rank_session(bound, [1], np.ones(4, np.float32), None, [7, 3, 5, 6], [1], k=3)
    assert [row for row, _ in ranked] == [3, 5, 6]


def test_explicit_candidates_are_ordered_by_the_slate_scorer_where_there_is_one() -> None:
    ranker, items = small_ranker()
    n_features = len(ranker.spec.feature_names)
    # the slate scorer orders by the market's popularity alone (pop = row number here)
    by_pop = np.zeros(n_features)
    by_pop[ranker.spec.feature_names.index("log_pop")] = 1.0
    slate = MarketRanker(ranker.spec, ranker.neighbours, ranker.pop, ranker.global_pop,
                         ranker.scorer, Scorer(np.zeros(n_features), np.ones(n_features), by_pop))
    user = np.ones(4, dtype=np.float32)
    explicit = rank_session(bind(slate, items, 10), [1, 2], user, None, [3, 7, 5, 6], [1, 2], 10)
    assert [row for row, _ in explicit] == [7, 6, 5, 3]
    # the retrieved pool keeps the pool's scorer: the same as without a slate scorer
    hits = np.asarray([6, 7, -1])
    assert rank_session(bind(slate, items, 10), [1, 2], user, hits, None, [1, 2], 10) == \
        rank_session(bind(ranker, items, 10), [1, 2], user, hits, None, [1, 2], 10)


def test_fit_scorer_learns_which_feature_points_at_the_target() -> None:
    rng = np.random.default_rng(1)
    examples = []
    for _ in range(200):
        features = rng.normal(size=(30, 3))
        target = int(rng.integers(30))
        features[target, 1] += 3.0  # feature 1 carries the signal, 0 and 2 are noise
        examples.append((features, target))
    scorer = fit_scorer(examples, steps=50)
    assert scorer.weights[1] > 5 * max(abs(scorer.weights[0]), abs(scorer.weights[2]))
    oracle = sum(int(np.argmax(f[:, 1]) == t) for f, t in examples)  # feature 1 alone
    assert sum(int(np.argmax(scorer.score(f)) == t) for f, t in examples) >= oracle - 2
    hidden = fit_scorer(examples, hidden=4, steps=50)
    assert sum(int(np.argmax(hidden.score(f)) == t) for f, t in examples) >= oracle - 10


def test_a_market_scorer_pulled_towards_the_shared_one_moves_as_far_as_its_data_supports(
) -> None:
    rng = np.random.default_rng(2)

    def examples(signal: int, n: int) -> list[tuple[np.ndarray, int]]:
        out = []
        for _ in range(n):
            features = rng.normal(size=(20, 3))
            target = int(rng.integers(20))
            features[target, signal] += 2.0
            out.append((features, target))
        return out

    shared = fit_scorer(examples(1, 300), steps=50)  # the shared data: feature 1 matters
    local = examples(2, 300)  # this market: feature 2 matters
    held = fit_scorer(local, steps=50, start=shared, pull=1e4)
    assert held.weights == pytest.approx(shared.weights, abs=1e-3)
    assert np.array_equal(held.mean, shared.mean) and np.array_equal(held.scale, shared.scale)
    free = fit_scorer(local, steps=50, start=shared, pull=1e-4)
    assert free.weights[2] > 5 * abs(shared.weights[2])
    with pytest.raises(ValueError, match="form"):
        fit_scorer(local, hidden=4, start=shared, pull=1.0)


def test_ranker_files_round_trip_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    ranker, items = small_ranker()
    save_ranker(tmp_path, ranker, "a" * 64, {"valid_users": 3})
    loaded = load_ranker(tmp_path, "a" * 64, N_ROWS)
    assert loaded is not None
    user = np.ones(4, dtype=np.float32)
    before = rank_session(bind(ranker, items, 10), [1, 2], user, np.asarray([6]), None, [], 5)
    after = rank_session(bind(loaded, items, 10), [1, 2], user, np.asarray([6]), None, [], 5)
    assert before == after
    assert loaded.slate_scorer is None  # none saved: slates fall back to the pool's scorer
    n_features = len(ranker.spec.feature_names)
    slate = Scorer(np.ones(n_features), np.full(n_features, 2.0), np.arange(n_features) - 3.0)
    save_ranker(tmp_path, MarketRanker(ranker.spec, ranker.neighbours, ranker.pop,
                                       ranker.global_pop, ranker.scorer, slate),
                "a" * 64, {"valid_users": 3})
    loaded = load_ranker(tmp_path, "a" * 64, N_ROWS)
    assert loaded is not None and loaded.slate_scorer is not None
    assert np.array_equal(loaded.slate_scorer.weights, slate.weights)
    assert np.array_equal(loaded.slate_scorer.scale, slate.scale)
    assert load_ranker(tmp_path / "nothing", "a" * 64, N_ROWS) is None
    with pytest.raises(RankerError, match="fitted for weights aaaaaaaaaaaa"):
        load_ranker(tmp_path, "b" * 64, N_ROWS)
    with pytest.raises(RankerError, match="does not fit a vocabulary of 9 rows"):
        load_ranker(tmp_path, "a" * 64, N_ROWS + 1)
    table = next(tmp_path.glob("neighbours-*.npz"))
    table.write_bytes(table.read_bytes()[:-10])
    with pytest.raises(RankerError, match=f"{table.name}: sha256 does not match"):
        load_ranker(tmp_path, "a" * 64, N_ROWS)
    manifest = tmp_path / "ranker.json"
    data = json.loads(manifest.read_text())
    data["neighbours_file"] = "../elsewhere.npz"
    manifest.write_text(json.dumps(data))
    with pytest.raises(RankerError, match="bad neighbours_file"):
        load_ranker(tmp_path, "a" * 64, N_ROWS)
    manifest.write_text("{not json")
    with pytest.raises(RankerError, match="ranker.json: unreadable"):
        load_ranker(tmp_path, "a" * 64, N_ROWS)


def test_bind_refuses_a_table_naming_items_the_index_lacks() -> None:
    ranker, items = small_ranker()
    fewer = ItemVectors(items.rows[:3], items.vectors[:3],
                        np.where(items.position < 3, items.position, -1))
    with pytest.raises(ValueError, match="does not hold"):
        bind(ranker, fewer, max_len=10)


def test_slate_rows_put_the_target_first_beside_distinct_sold_rows_outside_the_session() -> None:
    from training.served import slate_rows

    sold = np.arange(10, 1010, dtype=np.int64)
    session = [10, 11, 12, 500]
    rng = np.random.default_rng(0)
    draws = [slate_rows(rng, sold, session, 13, 99) for _ in range(50)]
    for rows in draws:
        assert rows[0] == 13 and len(rows) == 100 and len(set(rows.tolist())) == 100
        assert not set(rows[1:].tolist()) & {10, 11, 12, 500, 13}
        assert np.isin(rows, sold).all()
    # uniform over the other rows: every one of the 995 turns up across 50 draws of 99
    seen = set(np.concatenate([rows[1:] for rows in draws]).tolist())
    assert len(seen) > 900
    # a market with fewer items than asked gives all it has, once each
    small = slate_rows(rng, np.arange(1, 8, dtype=np.int64), [1, 2], 3, 99)
    assert small[0] == 3 and sorted(small[1:].tolist()) == [4, 5, 6, 7]


def test_similar_features_are_cosines_with_the_newest_sold_session_items() -> None:
    from training.ranker import features, session_candidates

    spec = RankerSpec(retrieve=3, expand=2, similar=2)
    assert spec.feature_names[-3:] == ("cos_newest", "cos_max@2", "cos_mean@2")
    ranker, items = small_ranker(spec)
    bound = bind(ranker, items, max_len=10)
    user = np.ones(4, dtype=np.float32)
    vectors = np.asarray(items.vectors, dtype=np.float64)

    def unit(row: int) -> np.ndarray:
        v = vectors[items.position[row]]
        return v / np.linalg.norm(v)

    # the newest distinct items, newest first: 5 (twice, newest kept), then 2; 4 is older
    pool, terms = session_candidates(bound, [4, 5, 2, 5], np.asarray([6, 7, 3]), None, [])
    assert items.rows[terms.recent].tolist() == [5, 2]
    table = features(bound, user, pool, terms)
    for c, position in enumerate(pool.tolist()):
        candidate = unit(int(items.rows[position]))
        cosines = [float(candidate @ unit(5)), float(candidate @ unit(2))]
        assert table[c, -3] == pytest.approx(cosines[0], abs=1e-5)
        assert table[c, -2] == pytest.approx(max(cosines), abs=1e-5)
        assert table[c, -1] == pytest.approx(np.mean(cosines), abs=1e-5)
    # a session of items the market does not sell has no newest item: the features are 0
    cooc = count_pairs(SESSIONS, N_ROWS, ordered=False)
    sold = np.arange(1, N_ROWS - 1, dtype=np.int64)  # not 7
    table6 = build_neighbours(cooc, cooc, cooc, sold, N_ROWS, keep=10)
    fewer = ItemVectors(sold, vectors[items.position[sold]].astype(np.float32),
                        np.where(np.arange(N_ROWS) < N_ROWS - 1, np.arange(N_ROWS) - 1, -1))
    fewer.position[0] = -1
    bound6 = bind(MarketRanker(spec, table6, ranker.pop, ranker.global_pop, ranker.scorer),
                  fewer, max_len=10)
    pool, terms = session_candidates(bound6, [7], np.asarray([1, 2]), None, [])
    assert len(terms.recent) == 0 and fewer.rows[pool].tolist() == [1, 2, 6]  # 6: 7's neighbour
    assert not features(bound6, user, pool, terms)[:, -3:].any()


def test_the_similar_count_round_trips_and_older_rankers_read_as_without_it(
        tmp_path: Path) -> None:
    ranker, items = small_ranker(RankerSpec(retrieve=3, expand=2, similar=2))
    save_ranker(tmp_path, ranker, "a" * 64, {})
    loaded = load_ranker(tmp_path, "a" * 64, N_ROWS)
    assert loaded is not None and loaded.spec == ranker.spec
    user = np.ones(4, dtype=np.float32)
    assert rank_session(bind(loaded, items, 10), [1, 2], user, np.asarray([6]), None, [], 5) \
        == rank_session(bind(ranker, items, 10), [1, 2], user, np.asarray([6]), None, [], 5)
    plain, _ = small_ranker()
    save_ranker(tmp_path, plain, "a" * 64, {})
    manifest = tmp_path / "ranker.json"
    data = json.loads(manifest.read_text())
    del data["spec"]["similar"]  # as written before the field existed
    manifest.write_text(json.dumps(data))
    older = load_ranker(tmp_path, "a" * 64, N_ROWS)
    assert older is not None and older.spec == plain.spec and older.spec.similar == 0
