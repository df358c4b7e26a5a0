"""The evaluation harness: baselines by hand, one experiment run end to end, the report."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.baselines import (
    choose_ease,
    cooccurrence_similarity,
    ease_scorer,
    ease_weights,
    item_gram,
    itemknn_scorer,
    pop_scorer,
    popularity,
)
from training.config import TrainConfig
from training.data import Dataset, read_dataset
from training.experiment import (
    MODELS,
    ExperimentError,
    ProtocolResult,
    market_cosine,
    parse_protocols,
    run_experiment,
)
from training.metrics import METRIC_NAMES
from training.model import Bert4XMR, ModelConfig
from training.ranker import count_pairs
from training.report import PEERS, output_dirs, render_report, write_outputs
from training.split import MarketSplit


def _split(train: list[list[int]], market_items: list[int]) -> MarketSplit:
    return MarketSplit("aa", "full", 0, [f"u{u}" for u in range(len(train))], train,
                       np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                       np.asarray(market_items))


def test_pop_counts_training_interactions_and_breaks_ties_by_row() -> None:
    split = _split([[3, 1], [3, 2], [3, 4, 2]], [1, 2, 3, 4, 5])
    assert popularity(split, 6).tolist() == [0, 1, 2, 3, 1, 0]
    scores = pop_scorer(split, 6)([[1], []])
    assert scores.shape == (2, 6)
    order = torch.argsort(scores[0], descending=True).tolist()
    assert order == [3, 2, 1, 4, 0, 5]  # by count; equal counts (1 and 4; 0 and 5) lower row first
    assert torch.equal(scores[0], scores[1])


def test_itemknn_is_cosine_cooccurrence_summed_over_the_session() -> None:
    # users: {1,2,3}, {2,3}, {4}: |1|=1 |2|=2 |3|=2; co(1,2)=1 co(1,3)=1 co(2,3)=2
    similarity = cooccurrence_similarity(count_pairs([[1, 2, 3], [3, 2, 2], [4]], 6,
                                                     ordered=False))
    dense = similarity.to_dense()
    assert dense[1, 2].item() == pytest.approx(1 / np.sqrt(2))
    assert dense[2, 3].item() == pytest.approx(1.0)
    assert torch.equal(dense, dense.T)
    assert torch.count_nonzero(torch.diagonal(dense)) == 0
    assert torch.count_nonzero(dense[4]) == 0
    scores = itemknn_scorer(similarity)([[1, 2], [4], []])
    assert scores[0].tolist() == pytest.approx([0, 1 / np.sqrt(2), 1 / np.sqrt(2),
                                                1 / np.sqrt(2) + 1.0, 0, 0])
    assert torch.count_nonzero(scores[1:]) == 0


def test_ease_is_the_closed_form_ridge_regression_with_a_zero_diagonal() -> None:
    sessions = [[1, 2, 3], [3, 2, 2], [4], [1, 3, 5], [2, 5]]
    n_rows, l2 = 6, 0.5
    x = np.zeros((len(sessions), n_rows))
    for u, seq in enumerate(sessions):
        x[u, seq] = 1.0  # a repeated item counts once
    gram = item_gram(count_pairs(sessions, n_rows, ordered=False))
    assert gram.numpy() == pytest.approx(x.T @ x)
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(n_rows))
    expected = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(expected, 0.0)
    weights = ease_weights(gram, l2)
    assert weights.numpy() == pytest.approx(expected, abs=1e-5)
    # the ridge regression of each column on the others: the gradient of
    # |X - XB|^2 + l2 |B|^2 vanishes off the (fixed) zero diagonal
    b = weights.double().numpy()
    gradient = -2 * x.T @ (x - x @ b) + 2 * l2 * b
    np.fill_diagonal(gradient, 0.0)
    assert np.abs(gradient).max() < 1e-4
    scores = ease_scorer(weights)([[1, 2, 2], []])
    assert scores[0].numpy() == pytest.approx(b[1] + b[2], abs=1e-6)
    assert torch.count_nonzero(scores[1]) == 0
    assert gram.diagonal().tolist() == [0, 2, 3, 3, 1, 2]  # ease_weights left it as it was


def test_ease_l2_is_chosen_on_validation_items(dataset: Dataset) -> None:
    from training.evaluate import evaluate_split
    from training.train import prepare

    prepared = prepare(dataset, "full", 0)
    splits = [prepared.splits[m] for m in prepared.markets]
    gram = item_gram(count_pairs([seq for s in splits for seq in s.train],
                                 prepared.vocab.n_rows, ordered=False))

    def valid(l2: float) -> float:
        scorer = ease_scorer(ease_weights(gram, l2))
        return float(np.mean([evaluate_split(s, scorer, "valid")["ndcg@10"] for s in splits]))

    l2s = (1.0, 1e4)
    chosen, weights = choose_ease(splits, gram, l2s)
    assert chosen == max(l2s, key=valid)
    assert torch.equal(weights, ease_weights(gram, chosen))


def test_ease_is_left_out_of_the_default_models_above_its_catalogue_limit() -> None:
    from training.baselines import EASE_MAX_ITEMS
    from training.experiment import MODELS, ExperimentError, models_for

    assert models_for(None, EASE_MAX_ITEMS) == MODELS
    assert models_for(None, EASE_MAX_ITEMS + 1) == tuple(m for m in MODELS if m != "ease")
    assert "ease" in models_for(["bert4xmr,ease"], 100)
    too_many = EASE_MAX_ITEMS + 1
    with pytest.raises(ExperimentError, match=f"ease needs a dense {too_many} x {too_many}"):
        models_for(["bert4xmr,ease"], EASE_MAX_ITEMS + 1)


def test_market_cosine_of_the_embedding_rows() -> None:
    model = Bert4XMR(ModelConfig(n_rows=5, n_markets=3, d_model=4, n_layers=1, n_heads=1,
                                 d_ff=8))
    with torch.no_grad():
        model.market_emb.weight.copy_(torch.tensor(
            [[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, -1.0, 1.0]]))
    cosine = market_cosine(model)
    assert cosine == pytest.approx(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]), abs=1e-6)


def test_protocols_from_repeated_and_comma_options() -> None:
    assert parse_protocols(["acmr", "forec,full"]) == ["full", "forec", "acmr"]
    assert parse_protocols(["forec", "forec"]) == ["forec"]
    with pytest.raises(ExperimentError, match="random"):
        parse_protocols(["full,random"])
    with pytest.raises(ExperimentError):
        parse_protocols([])


def test_outputs_go_to_out_for_one_protocol_and_to_subfolders_for_several(tmp_path: Path) -> None:
    assert output_dirs(tmp_path, ["acmr"]) == {"acmr": tmp_path}
    assert output_dirs(tmp_path, ["full", "forec"]) == {
        "full": tmp_path / "full", "forec": tmp_path / "forec"}


@pytest.fixture(scope="module")
def dataset(synthetic_data_dir: Path) -> Dataset:
    return read_dataset(synthetic_data_dir)


def _run(dataset: Dataset, config: TrainConfig, out: Path) -> dict[str, ProtocolResult]:
    torch.set_num_threads(1)
    protocols = ["full", "forec"]
    dirs = output_dirs(out, protocols)
    return run_experiment(dataset, protocols, [0], config,
                          {p: d / "negatives" for p, d in dirs.items()})


@pytest.fixture(scope="module")
def experiment(
    dataset: Dataset, tiny_train_config: TrainConfig, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, ProtocolResult], Path, TrainConfig]:
    """One seed of `full` + `forec` on the synthetic markets, shared by the tests below."""
    out = tmp_path_factory.mktemp("experiment")
    return _run(dataset, tiny_train_config, out), out, tiny_train_config


def test_experiment_scores_every_model_on_every_market_and_reruns_identically(
    dataset: Dataset, experiment: tuple[dict[str, ProtocolResult], Path, TrainConfig]
) -> None:
    results, tmp_path, config = experiment
    assert list(results) == ["full", "forec"]
    assert results["full"].shared_with == ["forec"]
    assert results["full"].train_seconds == results["forec"].train_seconds > 0
    for protocol, result in results.items():
        assert result.seeds == [0]
        assert set(result.runs[0]) == set(dataset.market_codes)
        for by_model in result.runs[0].values():
            assert list(by_model) == list(MODELS)
            for metrics in by_model.values():
                assert list(metrics) == list(METRIC_NAMES)
                assert all(0.0 <= v <= 1.0 for v in metrics.values())
                assert metrics["hr@5"] <= metrics["hr@10"] <= metrics["hr@20"]
        assert result.similarity().shape == (3, 3)
        if protocol == "forec":
            for market in dataset.market_codes:
                assert (tmp_path / "forec" / "negatives" / f"{market}-seed0.npz").is_file()
    # sampling 99 of a market's items is an easier task than ranking all of them
    full = results["full"].market_mean()["itemknn"]["ndcg@10"]["mean"]
    forec = results["forec"].market_mean()["itemknn"]["ndcg@10"]["mean"]
    assert forec > full

    negatives = tmp_path / "forec" / "negatives" / "aa-seed0.npz"
    stamp = negatives.stat().st_mtime_ns
    rerun = _run(dataset, config, tmp_path)
    assert negatives.stat().st_mtime_ns == stamp  # reused, not rewritten
    for protocol in results:
        assert rerun[protocol].runs == results[protocol].runs


def test_written_outputs_hold_the_promised_schema(
    dataset: Dataset,
    experiment: tuple[dict[str, ProtocolResult], Path, TrainConfig],
    tmp_path: Path,
) -> None:
    result = experiment[0]["forec"]
    paths = write_outputs(result, tmp_path / "forec")
    assert sorted(p.name for p in paths) == [
        "market_similarity.png", "ndcg10.png", "report.md", "results.json"]
    data = json.loads((tmp_path / "forec" / "results.json").read_text())
    assert data["protocol"] == "forec" and data["seeds"] == [0]
    assert data["train_seconds"] > 0
    assert set(data["markets"]) == set(dataset.market_codes)
    cell = data["markets"]["aa"]["bert4xmr"]
    assert set(cell) == set(METRIC_NAMES)
    # results.json rounds to 6 decimals
    assert cell["ndcg@10"]["mean"] == round(result.runs[0]["aa"]["bert4xmr"]["ndcg@10"], 6)
    assert cell["ndcg@10"]["std"] == 0.0
    assert set(data["market_mean"]) == set(MODELS)
    for name in ("ndcg10.png", "market_similarity.png"):
        assert (tmp_path / "forec" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_result(protocol: str, markets: list[str], seeds: list[int]) -> ProtocolResult:
    """A result with made-up metrics (seed- and model-dependent) for the report's arithmetic."""
    result = ProtocolResult(protocol, markets, seeds=seeds)
    for s in seeds:
        result.runs[s] = {
            m: {model: {k: 0.1 + 0.05 * j + 0.01 * s + 0.001 * i for k in METRIC_NAMES}
                for j, model in enumerate(MODELS)}
            for i, m in enumerate(markets)
        }
    result.market_similarity = [np.eye(len(markets)) for _ in seeds]
    return result


def test_report_states_the_protocol_discipline_and_compares_with_the_acmr_log() -> None:
    result = _fake_result("acmr", ["de", "jp"], [0, 1])
    text = render_report(result)
    assert "early stopping, the served ranker's scorer, ItemKNN's recency decay and EASE's L2 " \
        "weight use the validation items only" in text
    assert "scored once" in text
    assert PEERS["acmr"].source in text
    ours = float(np.mean([result.runs[s]["de"]["bert4xmr"]["ndcg@10"] for s in (0, 1)]))
    published = next(p for p in PEERS["acmr"].peers if p.ours == "bert4xmr")
    theirs = published.metrics["ndcg@10"]["de"]
    expected = 100.0 * (ours - theirs) / theirs
    row = next(line for line in text.splitlines()
               if line.startswith("| bert4xmr vs ACMR log, fine-tuned | ndcg@10 |"))
    assert row.split(" | ")[2] == f"{expected:+.1f}%"
    std = float(np.std([result.runs[s]["de"]["bert4xmr"]["ndcg@10"] for s in (0, 1)], ddof=1))
    assert f"{ours:.4f} ± {std:.4f}" in text


def test_full_report_says_there_are_no_published_peers() -> None:
    text = render_report(_fake_result("full", ["de", "jp"], [0]))
    assert "No published method" in text
    assert "| bert4xmr vs pop | ndcg@10 |" in text
    assert "ACMR" not in text and "FOREC" not in text


def test_worker_processes_give_the_same_metrics_as_one_process(
    dataset: Dataset, experiment: tuple[dict[str, ProtocolResult], Path, TrainConfig],
    tmp_path: Path,
) -> None:
    results, _, config = experiment
    dirs = output_dirs(tmp_path, ["full", "forec"])
    parallel = run_experiment(dataset, ["full", "forec"], [0], config,
                              {p: d / "negatives" for p, d in dirs.items()}, jobs=2)
    for protocol in results:
        assert parallel[protocol].runs == results[protocol].runs


def test_a_subset_of_models_trains_only_those(dataset: Dataset, tiny_train_config: TrainConfig,
                                              tmp_path: Path) -> None:
    dirs = output_dirs(tmp_path, ["acmr"])
    results = run_experiment(dataset, ["acmr"], [0], tiny_train_config,
                             {p: d / "negatives" for p, d in dirs.items()},
                             models=["bert4xmr", "itemknn"])
    result = results["acmr"]
    assert result.models == ["bert4xmr", "global_only", "pop", "itemknn"]
    assert set(result.runs[0]["aa"]) == set(result.models)
    assert set(result.train_seconds_by_model) == {"bert4xmr", "itemknn"}
    assert set(result.market_mean()) == set(result.models)
    with pytest.raises(ExperimentError, match="unknown model"):
        run_experiment(dataset, ["acmr"], [0], tiny_train_config,
                       {p: d / "negatives" for p, d in dirs.items()}, models=["bert5xmr"])


def test_outputs_without_matplotlib_keep_the_numbers_and_skip_the_figures(
    experiment: tuple[dict[str, ProtocolResult], Path, TrainConfig],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The serving image has no matplotlib (the `report` extra); experiments there still
    write their numbers."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    monkeypatch.delitem(sys.modules, "training.figures", raising=False)
    with caplog.at_level(logging.WARNING, logger="training.report"):
        paths = write_outputs(experiment[0]["forec"], tmp_path)
    assert sorted(p.name for p in paths) == ["report.md", "results.json"]
    assert not list(tmp_path.glob("*.png"))
    assert "xmr[report]" in caplog.text


def test_a_cached_run_rescores_the_same_models_without_training_them(
    dataset: Dataset, experiment: tuple[dict[str, ProtocolResult], Path, TrainConfig],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    results, _, config = experiment
    cache = tmp_path / "cache"
    dirs = output_dirs(tmp_path, ["full", "forec"])
    negatives = {p: d / "negatives" for p, d in dirs.items()}
    first = run_experiment(dataset, ["full", "forec"], [0], config, negatives, cache_dir=cache)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 3  # bert4xmr, bert4xmr_paper, no_market_emb: one entry each
    for protocol in results:
        assert first[protocol].runs == results[protocol].runs

    import training.experiment as harness

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(harness, "pretrain", no_training)
    monkeypatch.setattr(harness, "finetune", no_training)
    again = run_experiment(dataset, ["full", "forec"], [0], config, negatives, cache_dir=cache)
    for protocol in results:
        assert again[protocol].runs == results[protocol].runs
        # the training time reported is the one measured when the models were trained
        assert again[protocol].train_seconds_by_model["bert4xmr"] == pytest.approx(
            first[protocol].train_seconds_by_model["bert4xmr"])

    # a different training config misses the cache; a corrupt entry is retrained, not used
    other = config.with_overrides(dropout=config.dropout + 0.05)
    with pytest.raises(AssertionError, match="trained again"):
        run_experiment(dataset, ["full"], [0], other, negatives, cache_dir=cache)
    monkeypatch.undo()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ExperimentError, match=r"--cache .*file: not a usable directory"):
        run_experiment(dataset, ["full"], [0], config, negatives, cache_dir=not_a_dir)
    for entry in entries:
        (entry / "global.pt").write_bytes(b"not a checkpoint")
    repaired = run_experiment(dataset, ["full", "forec"], [0], config, negatives,
                              cache_dir=cache)
    for protocol in results:
        assert repaired[protocol].runs == results[protocol].runs
