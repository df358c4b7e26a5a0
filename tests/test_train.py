"""Training on tiny synthetic data: the loss falls, a seed fixes the result, checkpoints load."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import FitConfig, TrainConfig
from training.data import Dataset, read_dataset
from training.evaluate import evaluate_split, model_scorer
from training.train import fit, new_model, prepare, pretrain, train_markets


@pytest.fixture(scope="module")
def dataset(synthetic_data_dir: Path) -> Dataset:
    return read_dataset(synthetic_data_dir)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_loss_decreases_on_tiny_data(dataset: Dataset, tiny_train_config: TrainConfig) -> None:
    prepared = prepare(dataset, "full", seed=0)
    model = new_model(prepared, tiny_train_config)
    splits = [(prepared.splits[m], row) for row, m in enumerate(prepared.markets)]
    config = FitConfig(lr=3e-3, batch_size=32, max_epochs=4, patience=10)
    result = fit(model, splits, config, seed=0, name="test")
    losses = [epoch["loss"] for epoch in result.history]
    assert result.epochs_run == 4
    assert losses[-1] < 0.9 * losses[0]
    assert losses == sorted(losses, reverse=True)


def test_fit_keeps_the_best_validation_epoch(
    dataset: Dataset, tiny_train_config: TrainConfig
) -> None:
    prepared = prepare(dataset, "full", seed=0)
    model = new_model(prepared, tiny_train_config)
    splits = [(prepared.splits["aa"], 0)]
    result = fit(model, splits, FitConfig(batch_size=32, max_epochs=3, patience=5), 0, "test")
    valid = [epoch["mean"] for epoch in result.history]
    assert result.best_metric == max(valid)
    assert result.best_epoch == valid.index(max(valid)) + 1
    restored = evaluate_split(prepared.splits["aa"], model_scorer(model, 0), "valid")["ndcg@10"]
    assert restored == pytest.approx(result.best_metric)


def test_validation_is_capped_by_the_scores_it_may_compute(
    dataset: Dataset, tiny_train_config: TrainConfig
) -> None:
    prepared = prepare(dataset, "full", seed=0)
    model = new_model(prepared, tiny_train_config)
    split = prepared.splits["aa"]
    n_items = model.config.n_rows - 1
    assert len(split.eval_users) > 3
    config = FitConfig(batch_size=32, max_epochs=2, patience=5, valid_scores=3 * n_items)
    assert config.valid_users_for(n_items) == 3
    assert FitConfig().valid_users_for(n_items) >= len(split.eval_users)  # the default: all
    result = fit(model, [(split, 0)], config, 0, "test")
    subset = split.evaluating(3)
    restored = evaluate_split(subset, model_scorer(model, 0), "valid")["ndcg@10"]
    assert restored == pytest.approx(result.best_metric)  # early stopping scored the subset
    with pytest.raises(ValueError, match="valid_scores"):
        FitConfig(valid_scores=0)


def _test_metrics(dataset: Dataset, config: TrainConfig, seed: int) -> dict[str, float]:
    prepared = prepare(dataset, "acmr", seed)
    model, _ = pretrain(prepared, replace(config, seed=seed))
    row = prepared.markets.index("bb")
    return evaluate_split(prepared.splits["bb"], model_scorer(model, row), "test")


def test_same_seed_gives_the_same_metrics(
    dataset: Dataset, tiny_train_config: TrainConfig
) -> None:
    first = _test_metrics(dataset, tiny_train_config, seed=1)
    assert _test_metrics(dataset, tiny_train_config, seed=1) == first
    assert _test_metrics(dataset, tiny_train_config, seed=2) != first


def test_train_markets_writes_loadable_checkpoints(
    dataset: Dataset, tiny_train_config: TrainConfig, tmp_path: Path
) -> None:
    results = train_markets(dataset, tmp_path, tiny_train_config, split="none")
    assert set(results) == {"global", *dataset.market_codes}
    parent = load_checkpoint(tmp_path / "global")
    assert parent.manifest.kind == "global"
    assert parent.manifest.data_fingerprint == dataset.fingerprint
    for market in dataset.market_codes:
        checkpoint = load_checkpoint(tmp_path / "markets" / market)
        assert checkpoint.manifest.market == market
        assert checkpoint.manifest.parent is not None
        assert checkpoint.manifest.parent["weights_sha256"] == parent.manifest.weights_sha256
        sold = dataset.markets[market].items
        assert checkpoint.market_items is not None and set(checkpoint.market_items) == sold
        assert checkpoint.manifest.metrics["valid_ndcg@10"] == results[market].best_metric


def test_fit_without_validation_users_reports_no_metric_and_keeps_finetune_start() -> None:
    from training.model import Bert4XMR, ModelConfig
    from training.split import MarketSplit

    # two users with two items each: trainable, but nobody has a valid and a test item
    split = MarketSplit(
        "zz", "full", 0, ["u1", "u2"], [[1, 2], [2, 3]], np.zeros(0, np.int64),
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.asarray([1, 2, 3]),
    )
    model = Bert4XMR(ModelConfig(n_rows=4, n_markets=1, d_model=8, n_heads=2, d_ff=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = fit(model, [(split, 0)], FitConfig(max_epochs=3, validate_start=True), 0, "t")
    assert tuned.best_metric is None and tuned.epochs_run == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scratch = fit(model, [(split, 0)], FitConfig(max_epochs=2, batch_size=2), 0, "s")
    assert scratch.best_metric is None and scratch.epochs_run == 2
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
