"""The evaluation harness behind `xmr experiment`: train Bert4XMR and the baselines per seed,
score every model once on each market's test items, and aggregate over seeds.

`full` and `forec` share one time-ordered split, so their models are trained once per seed and
scored under both; `acmr` has its own (seeded, shuffled) split.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.baselines import (
    EASE_MAX_ITEMS,
    choose_decay,
    choose_ease,
    cooccurrence_similarity,
    ease_scorer,
    item_gram,
    itemknn_scorer,
    pop_scorer,
)
from training.config import TrainConfig, paper_form
from training.data import Dataset
from training.evaluate import Scorer, model_scorer, rank_split, restrict
from training.metrics import METRIC_NAMES, summarize
from training.model import Bert4XMR
from training.model_cache import CachedModels, ModelCache, cache_key
from training.negatives import NegativeStore
from training.ranker import PairCounts, count_pairs
from training.served import RankerFitting, ServedScorer, item_vectors, ranker_spec
from training.split import PROTOCOLS, MarketSplit, split_market
from training.train import Prepared, finetune, fit, new_model, prepare, pretrain

logger = logging.getLogger(__name__)

MODELS = ("served", "bert4xmr", "bert4xmr_paper", "global_only", "no_market_emb", "target_only",
          "pop", "itemknn", "itemknn_recency", "ease")
TRAIN_SPLIT = {"full": "full", "forec": "full", "acmr": "acmr"}  # protocol -> split trained on

Metrics = dict[str, float]


class ExperimentError(ValueError):
    """An experiment that cannot run as asked (bad protocol list, stale negatives, ...)."""


@dataclass
class ProtocolResult:
    """Everything measured for one protocol: test metrics per seed, market and model."""

    protocol: str
    markets: list[str]
    models: list[str] = field(default_factory=lambda: list(MODELS))
    seeds: list[int] = field(default_factory=list)
    runs: dict[int, dict[str, dict[str, Metrics]]] = field(default_factory=dict)
    n_users: dict[str, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_seconds_by_model: dict[str, float] = field(default_factory=dict)
    shared_with: list[str] = field(default_factory=list)  # protocols scored on the same models
    market_similarity: list[np.ndarray] = field(default_factory=list)  # one per seed
    config: dict[str, object] = field(default_factory=dict)
    device: str = "cpu"

    def aggregate(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """market -> model -> metric -> {mean, std} over seeds (std: sample, 0 for one seed)."""
        return {
            market: {
                model: _mean_std([self.runs[s][market][model] for s in self.seeds])
                for model in self.models
            }
            for market in self.markets
        }

    def market_mean(self) -> dict[str, dict[str, dict[str, float]]]:
        """model -> metric -> {mean, std} over seeds of the unweighted mean over markets."""
        out = {}
        for model in self.models:
            per_seed = [
                {k: float(np.mean([self.runs[s][m][model][k] for m in self.markets]))
                 for k in METRIC_NAMES}
                for s in self.seeds
            ]
            out[model] = _mean_std(per_seed)
        return out

    def similarity(self) -> np.ndarray:
        """Cosine similarity of the global model's market embeddings, averaged over seeds."""
        return np.mean(np.stack(self.market_similarity), axis=0)

    def to_json(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "seeds": self.seeds,
            "train_seconds": round(self.train_seconds, 3),
            "markets": self.aggregate(),
            "market_mean": self.market_mean(),
            "n_test_users": self.n_users,
            "train_seconds_by_model": {
                k: round(v, 3) for k, v in self.train_seconds_by_model.items()
            },
            "train_shared_with": self.shared_with,
            "market_similarity": {
                "markets": self.markets,
                "cosine": np.round(self.similarity(), 4).tolist(),
            },
            "per_seed": {str(s): self.runs[s] for s in self.seeds},
            "config": self.config,
            "device": self.device,
        }


def _mean_std(runs: list[Metrics]) -> dict[str, dict[str, float]]:
    out = {}
    for key in METRIC_NAMES:
        values = np.asarray([run[key] for run in runs], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": round(float(values.mean()), 6), "std": round(std, 6)}
    return out


def parse_protocols(values: list[str]) -> list[str]:
    """Protocol names from repeated and/or comma-separated options, in the canonical order."""
    names = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(PROTOCOLS))
    if unknown or not names:
        raise ExperimentError(f"unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}")
    return [p for p in PROTOCOLS if p in names]


def parse_models(values: list[str] | None) -> tuple[str, ...]:
    """Model names from comma lists, in the canonical order; all models by default.

    `global_only` and `pop` come with every run (the pre-trained model is always trained).
    """
    if not values:
        return MODELS
    names = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(MODELS))
    if unknown:
        raise ExperimentError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    names |= {"global_only", "pop"}
    return tuple(m for m in MODELS if m in names)


def models_for(values: list[str] | None, n_items: int) -> tuple[str, ...]:
    """`parse_models` for a catalogue of `n_items`: `ease` (a dense n_items^2 matrix) is left
    out of the default set above EASE_MAX_ITEMS items, and refused there when asked for."""
    chosen = parse_models(values)
    if "ease" not in chosen or n_items <= EASE_MAX_ITEMS:
        return chosen
    if values:
        raise ExperimentError(
            f"model ease needs a dense {n_items} x {n_items} matrix; the harness runs it up to "
            f"{EASE_MAX_ITEMS} items: leave it out of --models")
    logger.warning("experiment: no ease baseline over %d items (at most %d)", n_items,
                   EASE_MAX_ITEMS)
    return tuple(m for m in chosen if m != "ease")


def market_cosine(model: Bert4XMR) -> np.ndarray:
    """Cosine similarity (M, M) of the rows of a model's market embedding."""
    rows = model.market_emb.weight.detach().float().cpu()  # (M, D)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (unit @ unit.T).numpy()


def _eval_splits(prepared: Prepared, protocol: str, seed: int) -> dict[str, MarketSplit]:
    """The splits scored under `protocol`: the training splits, or `forec` candidates on them."""
    if prepared.splits[prepared.markets[0]].protocol == protocol:
        return prepared.splits
    all_items = np.arange(1, prepared.vocab.n_rows, dtype=np.int64)
    return {
        m: split_market(prepared.dataset.markets[m], prepared.vocab, protocol, seed, all_items)
        for m in prepared.markets
    }


@dataclass
class Stopwatch:
    """Wall-clock seconds of training, summed per model name."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def run_seed(
    dataset: Dataset,
    protocols: list[str],
    seed: int,
    config: TrainConfig,
    stores: dict[str, NegativeStore],
    device: str = "cpu",
    models: tuple[str, ...] = MODELS,
    cache: ModelCache | None = None,
) -> tuple[dict[str, dict[str, dict[str, Metrics]]], dict[str, float], np.ndarray, dict[str, int]]:
    """Train every model on one split and seed; score each on the test items of `protocols`.
    With a `cache`, the Bert4XMR variants' trained models are taken from it where present and
    stored in it where trained.

    Returns protocol -> market -> model -> metrics, training seconds per model, the global
    model's market cosine similarity, and the number of test users per market.
    """
    split_name = TRAIN_SPLIT[protocols[0]]
    assert all(TRAIN_SPLIT[p] == split_name for p in protocols)
    config = config.with_overrides(seed=seed)
    prepared = prepare(dataset, split_name, seed)
    evals = {p: _eval_splits(prepared, p, seed) for p in protocols}
    for protocol, splits in evals.items():
        if protocol in stores:  # sampled candidates: persist, or reuse and verify, per market
            for split in splits.values():
                stores[protocol].sync(split, dataset.fingerprint)
    watch = Stopwatch()
    n_rows = prepared.vocab.n_rows
    markets = prepared.markets
    variants = {"bert4xmr": config}  # model name -> its config (pre-trained once each)
    if "bert4xmr_paper" in models:
        variants["bert4xmr_paper"] = paper_form(config)
    if "no_market_emb" in models:
        variants["no_market_emb"] = config.with_overrides(market_embedding=False)
    globals_: dict[str, Bert4XMR] = {}
    tuned: dict[str, dict[str, Bert4XMR]] = {name: {} for name in variants}
    keys = {name: cache_key(dataset.fingerprint, split_name, seed, variant, markets, n_rows - 1)
            for name, variant in variants.items()}
    cached: set[str] = set()  # variants whose models came from the cache
    for name, variant in variants.items():
        hit = cache.load(keys[name], new_model(prepared, variant), markets) if cache else None
        if hit is not None:
            globals_[name] = hit.global_model.to(device)
            tuned[name] = {m: model.to(device) for m, model in hit.tuned.items()}
            watch.seconds[name] = hit.seconds  # as measured when they were trained
            cached.add(name)
            continue
        with watch.time(name):
            globals_[name], _ = pretrain(prepared, variant, device)
    # Under `acmr` (negatives from all markets) every model ranks only the items the market
    # is known to sell before any held-out item is seen (its training items), as the
    # service's per-market index ranks only the market's items. `full` and `forec` draw
    # every candidate from the market already, and are scored as their protocols define.
    catalogues = {m: prepared.splits[m].catalogue() for m in markets}
    sold = catalogues if split_name == "acmr" else None
    knn: Scorer | None = None  # one ItemKNN over all markets' training sessions
    pairs: PairCounts | None = None  # their item pairs, counted once for ItemKNN and EASE

    def all_pairs() -> PairCounts:
        nonlocal pairs
        if pairs is None:
            pairs = count_pairs([seq for m in markets for seq in prepared.splits[m].train],
                                n_rows, ordered=False)
        return pairs

    if "itemknn" in models or "itemknn_recency" in models:
        with watch.time("itemknn"):
            similarity = cooccurrence_similarity(all_pairs())
            knn = itemknn_scorer(similarity)
    decays: dict[str, float] = {}
    if "itemknn_recency" in models:
        with watch.time("itemknn_recency"):
            decays = {m: choose_decay(prepared.splits[m], similarity) for m in markets}
            logger.info("itemknn_recency seed=%d decays %s", seed, decays)
    ease: Scorer | None = None  # one EASE over all markets' training sessions
    if "ease" in models:
        with watch.time("ease"):
            l2, weights = choose_ease([prepared.splits[m] for m in markets],
                                      item_gram(all_pairs()))
            ease = ease_scorer(weights)
            logger.info("ease seed=%d l2 %g", seed, l2)
    fitting = (RankerFitting(prepared.splits, markets, n_rows, ranker_spec(config.ranker),
                             config.ranker.max_users, seed, sold,
                             config.ranker.slate_negatives)
               if "served" in models else None)
    for market in markets:
        for name, variant in variants.items():
            if name in cached:
                continue
            with watch.time(name):
                tuned[name][market], _ = finetune(globals_[name], prepared, market, variant,
                                                  device)
        if fitting is not None:
            with watch.time("served"):
                fitting.add(market, tuned["bert4xmr"][market], device)
    if cache is not None:
        for name in set(variants) - cached:
            cache.store(keys[name], CachedModels(globals_[name], tuned[name],
                                                 watch.seconds.get(name, 0.0)),
                        {"variant": name, "split": split_name, "seed": seed})
    fitted = (fitting.fit(config.ranker.hidden, config.ranker.l2, config.ranker.market_l2)
              if fitting is not None else None)

    out: dict[str, dict[str, dict[str, Metrics]]] = {p: {} for p in protocols}
    for row, market in enumerate(markets):
        split = prepared.splits[market]
        unrestricted: dict[str, Scorer] = {
            "global_only": model_scorer(globals_["bert4xmr"], row, device),
            "pop": pop_scorer(split, n_rows),
        }
        for name in variants:
            unrestricted[name] = model_scorer(tuned[name][market], row, device)
        if "target_only" in models:
            with watch.time("target_only"):  # from scratch on the market alone: no pre-training
                target = new_model(prepared, config)
                fit(target, [(split, row)], config.pretrain, seed, f"target-{market}", device)
            unrestricted["target_only"] = model_scorer(target, row, device)
        if knn is not None:
            unrestricted["itemknn"] = knn
        if decays:
            unrestricted["itemknn_recency"] = itemknn_scorer(similarity, decays[market])
        if ease is not None:
            unrestricted["ease"] = ease
        restricted = {name: restrict(scorer, catalogues[market])
                      for name, scorer in unrestricted.items()}
        if fitted is not None:
            # The served ranking is the service's: its index (here the protocol's sold items)
            # bounds what it returns, so it needs no restriction on top.
            model = tuned["bert4xmr"][market]
            served = ServedScorer(
                fitted.rankers[market],
                item_vectors(model, row, (sold or {}).get(market, split.market_items)),
                model, row, device)
            unrestricted["served"] = restricted["served"] = served
        for protocol in protocols:
            eval_split = evals[protocol][market]
            scorers = restricted if protocol == "acmr" else unrestricted
            out[protocol][market] = {}
            for name in models:
                metrics = summarize(rank_split(eval_split, scorers[name], "test"))  # test: once
                out[protocol][market][name] = metrics
                logger.info(
                    "experiment protocol=%s seed=%d market=%s model=%s users=%d hr@10=%.4f "
                    "ndcg@10=%.4f", protocol, seed, market, name, len(eval_split.eval_users),
                    metrics["hr@10"], metrics["ndcg@10"],
                )
    n_users = {m: len(prepared.splits[m].eval_users) for m in prepared.markets}
    return out, watch.seconds, market_cosine(globals_["bert4xmr"]), n_users


SeedResult = tuple[dict[str, dict[str, dict[str, Metrics]]], dict[str, float], np.ndarray,
                   dict[str, int]]


def _run_task(
    dataset: Dataset, group: list[str], seed: int, config: TrainConfig,
    stores: dict[str, NegativeStore], device: str, models: tuple[str, ...],
    cache: ModelCache | None,
) -> SeedResult:
    torch.set_num_threads(max(1, config.threads))
    logger.info("experiment split=%s protocols=%s seed=%d", TRAIN_SPLIT[group[0]],
                ",".join(group), seed)
    return run_seed(dataset, group, seed, config, stores, device, models, cache)


def _init_worker(level: int) -> None:
    """Worker processes log like the parent (a spawned process starts unconfigured)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _run_tasks(
    dataset: Dataset, tasks: list[tuple[list[str], int]], config: TrainConfig,
    stores: dict[str, NegativeStore], device: str, jobs: int, models: tuple[str, ...],
    cache: ModelCache | None,
) -> Iterator[tuple[list[str], int, SeedResult]]:
    """Each (protocol group, seed) in turn, or in `jobs` worker processes (results in order)."""
    if jobs <= 1:
        for group, seed in tasks:
            yield group, seed, _run_task(dataset, group, seed, config, stores, device, models,
                                            cache)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch or CUDA state
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(level,)) as pool:
        futures = [
            pool.submit(_run_task, dataset, group, seed, config, stores, device, models, cache)
            for group, seed in tasks
        ]
        for (group, seed), future in zip(tasks, futures, strict=True):
            yield group, seed, future.result()


def run_experiment(
    dataset: Dataset,
    protocols: list[str],
    seeds: list[int],
    config: TrainConfig,
    negatives_dirs: dict[str, Path],
    device: str = "cpu",
    jobs: int = 1,
    models: list[str] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, ProtocolResult]:
    """Run every protocol over `seeds`; models are trained once per seed and split.

    With `jobs` > 1 the (split, seed) runs go to that many worker processes: worth it on a
    GPU machine or many cores, each worker using `config.threads` threads. With `cache_dir`
    the trained Bert4XMR models are kept there and reused by later runs (training.model_cache).
    """
    if not seeds:
        raise ExperimentError("need at least one seed")
    if cache_dir is not None:  # refused before any training, not when the first entry is stored
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExperimentError(f"--cache {cache_dir}: not a usable directory ({e})") from e
    protocols = parse_protocols(protocols)
    chosen = models_for(models, len(dataset.item_ids))
    stores = {p: NegativeStore(negatives_dirs[p]) for p in protocols if p != "full"}
    results = {
        p: ProtocolResult(p, dataset.market_codes, list(chosen), config=config.to_dict(),
                          device=device)
        for p in protocols
    }
    groups: dict[str, list[str]] = {}
    for protocol in protocols:
        groups.setdefault(TRAIN_SPLIT[protocol], []).append(protocol)
    tasks = [(group, seed) for group in groups.values() for seed in seeds]
    for group in groups.values():
        for protocol in group:
            results[protocol].shared_with = [p for p in group if p != protocol]
    for group, seed, (metrics, seconds, similarity, n_users) in _run_tasks(
        dataset, tasks, config, stores, device, jobs, chosen,
        ModelCache(cache_dir) if cache_dir is not None else None,
    ):
        for protocol in group:
            result = results[protocol]
            result.seeds.append(seed)
            result.runs[seed] = metrics[protocol]
            result.n_users = n_users
            result.market_similarity.append(similarity)
            result.train_seconds += sum(seconds.values())
            for name, value in seconds.items():
                result.train_seconds_by_model[name] = (
                    result.train_seconds_by_model.get(name, 0.0) + value
                )
    return results
