"""Leave-one-out splits of the three protocols, their sampled negatives and their persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import Dataset, MarketLog, read_dataset
from training.negatives import NegativesError, NegativeStore
from training.split import N_NEGATIVES, MarketSplit, split_market
from training.vocab import Vocab


@pytest.fixture(scope="module")
def dataset(synthetic_data_dir: Path) -> Dataset:
    return read_dataset(synthetic_data_dir)


@pytest.fixture(scope="module")
def vocab(dataset: Dataset) -> Vocab:
    return Vocab.from_items(dataset.item_ids)


def _split(dataset: Dataset, vocab: Vocab, market: str, protocol: str, seed: int) -> MarketSplit:
    all_items = np.arange(1, vocab.n_rows, dtype=np.int64)
    return split_market(dataset.markets[market], vocab, protocol, seed, all_items=all_items)


def _user_items(dataset: Dataset, vocab: Vocab, split: MarketSplit, b: int) -> set[int]:
    user = split.users[int(split.eval_users[b])]
    return set(vocab.indices(dataset.markets[split.market].sequences[user]))


def test_full_holds_out_the_time_last_items() -> None:
    log = MarketLog("aa", {"u1": ["a", "b", "c", "d"], "u2": ["a", "c"]}, n_rows=6)
    vocab = Vocab.from_items(["a", "b", "c", "d"])
    split = split_market(log, vocab, "full")
    assert split.users == ["u1", "u2"]
    assert split.eval_users.tolist() == [0]  # u2 has too few items to evaluate: it only trains
    assert split.train == [vocab.indices(["a", "b"]), vocab.indices(["a", "c"])]
    assert split.valid.tolist() == [vocab.index("c")]
    assert split.test.tolist() == [vocab.index("d")]
    assert split.history("test") == [vocab.indices(["a", "b", "c"])]
    assert split.valid_negatives is None and split.test_negatives is None


@pytest.mark.parametrize("protocol", ["full", "forec", "acmr"])
def test_held_out_items_are_never_training_items(
    dataset: Dataset, vocab: Vocab, protocol: str
) -> None:
    for market in dataset.market_codes:
        split = _split(dataset, vocab, market, protocol, seed=3)
        assert len(split.eval_users) > 0
        for b, u in enumerate(split.eval_users.tolist()):
            assert int(split.test[b]) not in split.train[u]
            assert int(split.valid[b]) not in split.train[u]
            assert split.valid[b] != split.test[b]
            assert set(split.train[u]) | {int(split.valid[b]), int(split.test[b])} == (
                _user_items(dataset, vocab, split, b)
            )


def test_full_and_forec_share_the_split_and_do_not_depend_on_the_seed(
    dataset: Dataset, vocab: Vocab
) -> None:
    full = _split(dataset, vocab, "aa", "full", seed=0)
    for seed in (0, 1):
        forec = _split(dataset, vocab, "aa", "forec", seed=seed)
        assert forec.train == full.train
        assert np.array_equal(forec.valid, full.valid) and np.array_equal(forec.test, full.test)


def test_acmr_split_is_shuffled_by_the_seed(dataset: Dataset, vocab: Vocab) -> None:
    first = _split(dataset, vocab, "aa", "acmr", seed=0)
    again = _split(dataset, vocab, "aa", "acmr", seed=0)
    other = _split(dataset, vocab, "aa", "acmr", seed=1)
    assert first.train == again.train and np.array_equal(first.test, again.test)
    assert not np.array_equal(first.test, other.test)
    full = _split(dataset, vocab, "aa", "full", seed=0)
    assert not np.array_equal(first.test, full.test)


@pytest.mark.parametrize("protocol", ["forec", "acmr"])
def test_negatives_exclude_the_users_items_and_are_distinct(
    dataset: Dataset, vocab: Vocab, protocol: str
) -> None:
    for market in dataset.market_codes:
        split = _split(dataset, vocab, market, protocol, seed=0)
        for stage in ("valid", "test"):
            negatives = split.negatives(stage)
            assert negatives is not None
            assert negatives.shape == (len(split.eval_users), N_NEGATIVES)
            for b in range(len(split.eval_users)):
                row = negatives[b].tolist()
                assert len(set(row)) == N_NEGATIVES
                assert not set(row) & _user_items(dataset, vocab, split, b)
                assert 0 not in row


def test_forec_negatives_are_sold_in_the_market_and_acmr_ones_come_from_all_markets(
    dataset: Dataset, vocab: Vocab
) -> None:
    forec = _split(dataset, vocab, "cc", "forec", seed=0)
    acmr = _split(dataset, vocab, "cc", "acmr", seed=0)
    sold = set(forec.market_items.tolist())
    assert forec.test_negatives is not None and acmr.test_negatives is not None
    assert set(forec.test_negatives.ravel().tolist()) <= sold
    assert set(acmr.test_negatives.ravel().tolist()) - sold  # some are never sold in cc


@pytest.mark.parametrize("protocol", ["forec", "acmr"])
def test_negatives_are_a_function_of_the_seed(
    dataset: Dataset, vocab: Vocab, protocol: str
) -> None:
    first = _split(dataset, vocab, "bb", protocol, seed=7)
    again = _split(dataset, vocab, "bb", protocol, seed=7)
    other = _split(dataset, vocab, "bb", protocol, seed=8)
    assert np.array_equal(first.test_negatives, again.test_negatives)  # type: ignore[arg-type]
    assert np.array_equal(first.valid_negatives, again.valid_negatives)  # type: ignore[arg-type]
    assert not np.array_equal(first.test_negatives, other.test_negatives)  # type: ignore[arg-type]


def test_split_none_trains_on_everything_but_a_small_holdout(
    dataset: Dataset, vocab: Vocab
) -> None:
    split = _split(dataset, vocab, "aa", "none", seed=0)
    held = set(split.eval_users.tolist())
    assert 0 < len(held) < len(split.users) // 5
    for u, user in enumerate(split.users):
        n_items = len(dataset.markets["aa"].sequences[user])
        assert len(split.train[u]) == (n_items - 1 if u in held else n_items)


def test_persisted_negatives_are_reused_on_rerun(
    dataset: Dataset, vocab: Vocab, tmp_path: Path
) -> None:
    store = NegativeStore(tmp_path / "negatives")
    first = _split(dataset, vocab, "aa", "forec", seed=2)
    store.sync(first, dataset.fingerprint)
    path = store.path("aa", 2)
    assert path.is_file()
    written = path.read_bytes()
    rerun = _split(dataset, vocab, "aa", "forec", seed=2)
    rerun.test_negatives = rerun.valid_negatives = None  # whatever a rerun drew, the file wins
    store.sync(rerun, dataset.fingerprint)
    assert np.array_equal(rerun.test_negatives, first.test_negatives)  # type: ignore[arg-type]
    assert np.array_equal(rerun.valid_negatives, first.valid_negatives)  # type: ignore[arg-type]
    assert path.read_bytes() == written


def test_persisted_negatives_for_other_data_are_refused(
    dataset: Dataset, vocab: Vocab, tmp_path: Path
) -> None:
    store = NegativeStore(tmp_path)
    store.sync(_split(dataset, vocab, "aa", "forec", seed=0), dataset.fingerprint)
    with pytest.raises(NegativesError, match="other data"):
        store.sync(_split(dataset, vocab, "aa", "forec", seed=0), "another-fingerprint")


def test_persisted_negatives_with_a_users_own_item_are_refused(
    dataset: Dataset, vocab: Vocab, tmp_path: Path
) -> None:
    store = NegativeStore(tmp_path)
    split = _split(dataset, vocab, "aa", "forec", seed=0)
    assert split.test_negatives is not None
    split.test_negatives = split.test_negatives.copy()
    split.test_negatives[0, 0] = split.test[0]  # the held-out item itself as a "negative"
    store.save(split, dataset.fingerprint)
    with pytest.raises(NegativesError, match="own item"):
        store.sync(_split(dataset, vocab, "aa", "forec", seed=0), dataset.fingerprint)


def test_truncated_negatives_file_is_refused(
    dataset: Dataset, vocab: Vocab, tmp_path: Path
) -> None:
    store = NegativeStore(tmp_path)
    split = _split(dataset, vocab, "aa", "acmr", seed=0)
    path = store.save(split, dataset.fingerprint)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(NegativesError, match=str(path)):
        store.sync(split, dataset.fingerprint)


def test_an_evaluation_subset_keeps_each_users_rows_together_and_is_fixed(
    dataset: Dataset, vocab: Vocab
) -> None:
    split = _split(dataset, vocab, dataset.market_codes[0], "forec", seed=0)
    n = len(split.eval_users)
    assert n > 4
    assert split.evaluating(n) is split  # nothing to cut
    subset = split.evaluating(n // 2)
    assert len(subset.eval_users) == n // 2
    assert subset.eval_users.tolist() == sorted(subset.eval_users.tolist())  # original order
    at = {int(u): b for b, u in enumerate(split.eval_users)}
    assert split.valid_negatives is not None and subset.valid_negatives is not None
    assert split.test_negatives is not None and subset.test_negatives is not None
    for b, user in enumerate(subset.eval_users.tolist()):  # a user's target and negatives
        assert subset.valid[b] == split.valid[at[user]]
        assert subset.test[b] == split.test[at[user]]
        assert (subset.valid_negatives[b] == split.valid_negatives[at[user]]).all()
        assert (subset.test_negatives[b] == split.test_negatives[at[user]]).all()
    assert subset.history("test") == [split.history("test")[at[u]] for u in subset.eval_users]
    assert split.evaluating(n // 2).eval_users.tolist() == subset.eval_users.tolist()
