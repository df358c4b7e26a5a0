"""The served ranking's second stage, compared across variants on VALIDATION only (the test
items are never read), from models kept by `xmr experiment --cache DIR`: no training.

    python benchmarks/ranker_sweep.py --data DIR --cache DIR --split full --seed 0 \
        --variants V.json

Each variant overrides fields of the default RankerConfig (`retrieve`, `expand`,
`neighbours`, `hidden`, `l2`, `market_l2`, `slate_negatives`, `similar`). Its examples are
the validation users' candidates exactly as the service builds them; the scorer is fitted on
one half of the users of every market and scored on the other half, then the halves swap
(2-fold cross-validation, so no user's NDCG comes from a scorer fitted on that user). Users
whose validation item was not among the candidates count as 0. Prints one JSON line per
variant: cross-validated NDCG@10 per market and the unweighted mean, for the retrieved pool
and (with slates) for explicit candidate lists, plus the seconds spent.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import RankerConfig, load_config
from training.data import read_dataset
from training.evaluate import encode_sessions
from training.metrics import ndcg
from training.model_cache import ModelCache, cache_key
from training.ranker import bind, rank_session
from training.served import RankerFitting, fit_scorers, item_vectors, ranker_spec, retrieve
from training.train import new_model, prepare

Examples = list[tuple[np.ndarray, int]]


def cross_validated(per_market: dict[str, tuple[Examples, int]], hidden: int, l2: float,
                    market_l2: float, seed: int) -> dict[str, float]:
    """NDCG@10 per market, each example scored by the scorer fitted on the other fold."""
    rng = np.random.default_rng(seed)
    folds = {m: rng.permutation(len(ex)) % 2 for m, (ex, _) in per_market.items()}
    gains = {m: 0.0 for m in per_market}
    for fold in (0, 1):
        train = {m: [e for e, f in zip(ex, folds[m], strict=True) if f != fold]
                 for m, (ex, _) in per_market.items()}
        scorers = fit_scorers(train, hidden, l2, market_l2, seed)
        for m, (ex, _) in per_market.items():
            for (feats, target), f in zip(ex, folds[m], strict=True):
                if f == fold:
                    scores = scorers[m].score(feats)
                    rank = int((scores >= scores[target]).sum()) - 1
                    gains[m] += float(ndcg(np.asarray([rank]), 10))
    return {m: gains[m] / max(n, 1) for m, (_, n) in per_market.items()}


def rank_session_cost(fitting: RankerFitting, models: dict[str, Any], prepared: Any,
                      ranker_config: RankerConfig, seed: int, sessions: int = 300) -> float:
    """Median microseconds of one `rank_session` call (the service's second stage) over the
    first `sessions` validation sessions of every market, with the variant's scorer fitted on
    all its examples; encoding and retrieval are done beforehand and not counted."""
    train = {m: fitting.examples[m].examples for m in fitting.markets}
    scorers = fit_scorers(train, ranker_config.hidden, ranker_config.l2,
                          ranker_config.market_l2, seed)
    timings: list[float] = []
    for row, market in enumerate(fitting.markets):
        ranker = replace(fitting.rankers[market], scorer=scorers[market])
        model = models[market]
        items = item_vectors(model, row, fitting.sold[market])
        bound = bind(ranker, items, model.config.max_len)
        batch = prepared.splits[market].history("valid")[:sessions]
        users = encode_sessions(model, batch, row).float().numpy()
        hits = retrieve(items, users, ranker.spec.retrieve)
        for b, session in enumerate(batch):
            started = time.perf_counter()
            rank_session(bound, session, users[b], hits[b], None, session, 10)
            timings.append(time.perf_counter() - started)
    return round(float(np.median(timings)) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True, help="the `xmr experiment --cache` directory")
    parser.add_argument("--split", default="full", choices=["full", "acmr"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="the experiment's TOML config")
    parser.add_argument("--variants", required=True, help="JSON file: a list of variants")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = read_dataset(Path(args.data))
    config = load_config(Path(args.config) if args.config else None).with_overrides(
        seed=args.seed)
    prepared = prepare(dataset, args.split, args.seed)
    markets = prepared.markets
    key = cache_key(dataset.fingerprint, args.split, args.seed, config, markets,
                    prepared.vocab.n_rows - 1)
    cached = ModelCache(Path(args.cache)).load(key, new_model(prepared, config), markets)
    if cached is None:
        raise SystemExit(f"no cached models for split {args.split} seed {args.seed} under "
                         f"{args.cache} (key {key[:12]}): run `xmr experiment --cache` first")
    sold = ({m: prepared.splits[m].catalogue() for m in markets} if args.split == "acmr"
            else None)
    known = {f.name for f in fields(RankerConfig)} | {"name"}
    built: dict[tuple[Any, ...], RankerFitting] = {}  # examples depend on the candidates only
    for variant in json.loads(Path(args.variants).read_text()):
        unknown = set(variant) - known
        if unknown:
            raise SystemExit(f"variant {variant.get('name')}: unknown keys {sorted(unknown)}")
        started = time.perf_counter()
        ranker_config = replace(config.ranker, **{k: v for k, v in variant.items()
                                                  if k != "name"})
        candidates = (ranker_config.retrieve, ranker_config.expand, ranker_config.neighbours,
                      ranker_config.max_users, ranker_config.slate_negatives,
                      ranker_config.similar)
        if candidates not in built:
            fitting = RankerFitting(prepared.splits, markets, prepared.vocab.n_rows,
                                    ranker_spec(ranker_config), ranker_config.max_users,
                                    args.seed, sold, ranker_config.slate_negatives)
            for market in markets:
                fitting.add(market, cached.tuned[market])
            built[candidates] = fitting
        fitting = built[candidates]
        out: dict[str, Any] = {"name": variant.get("name", "?"), "split": args.split,
                               "seed": args.seed}
        pools = {m: (fitting.examples[m].examples, fitting.examples[m].n_users)
                 for m in markets}
        out["pool"] = cross_validated(pools, ranker_config.hidden, ranker_config.l2,
                                      ranker_config.market_l2, args.seed)
        out["pool_mean"] = float(np.mean(list(out["pool"].values())))
        out["recall"] = {m: fitting.examples[m].recall for m in markets}
        if ranker_config.slate_negatives:
            slates = {m: (fitting.examples[m].slates, len(fitting.examples[m].slates))
                      for m in markets}
            out["slate"] = cross_validated(slates, ranker_config.hidden, ranker_config.l2,
                                           ranker_config.market_l2, args.seed)
            out["slate_mean"] = float(np.mean(list(out["slate"].values())))
        out["rank_session_us"] = rank_session_cost(fitting, cached.tuned, prepared,
                                                   ranker_config, args.seed)
        out["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
