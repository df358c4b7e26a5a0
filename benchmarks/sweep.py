"""Hyper-parameter sweep for Bert4XMR, scored on VALIDATION only (the test split is never read).

Each variant overrides fields of the default TrainConfig; variants run in parallel processes.
    python benchmarks/sweep.py --data DIR --split full --variants V.json --jobs 4
Prints one JSON line per variant: the global model's and the fine-tuned models' validation
NDCG@10 per market, their unweighted mean, epochs and seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.data import read_dataset
from training.evaluate import evaluate_split, model_scorer
from training.train import finetune, prepare, pretrain


def _config(variant: dict[str, Any], seed: int) -> TrainConfig:
    variant = dict(variant)
    variant.pop("name", None)
    base = TrainConfig(seed=seed)
    pre = replace(base.pretrain, **variant.pop("pretrain", {}))
    fine = replace(base.finetune, **variant.pop("finetune", {}))
    return replace(base, pretrain=pre, finetune=fine, **variant)


def run_variant(args: tuple[str, str, str, int, int, dict[str, Any]]) -> dict[str, Any]:
    data, split, device, seed, threads, variant = args
    torch.set_num_threads(threads)
    started = time.perf_counter()
    config = _config(variant, seed)
    prepared = prepare(read_dataset(Path(data)), split, seed)
    model, result = pretrain(prepared, config, device)
    out: dict[str, Any] = {"name": variant.get("name", "?"), "global": {}, "finetuned": {}}
    for row, market in enumerate(prepared.markets):
        split_ = prepared.splits[market]
        out["global"][market] = evaluate_split(split_, model_scorer(model, row, device), "valid")[
            "ndcg@10"
        ]
        _, fine = finetune(model, prepared, market, config, device)
        out["finetuned"][market] = fine.best_metric
    out["global_mean"] = float(np.mean(list(out["global"].values())))
    out["finetuned_mean"] = float(np.mean(list(out["finetuned"].values())))
    out["pretrain_epochs"] = result.best_epoch
    out["seconds"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="full")
    parser.add_argument("--variants", required=True, help="JSON file: a list of variants")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = json.loads(Path(args.variants).read_text())
    tasks = [(args.data, args.split, args.device, args.seed, args.threads, v) for v in variants]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(run_variant, tasks):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
