"""Trained models kept between `xmr experiment` runs (`--cache DIR`), so that a change to
what is scored after training (the served ranking's second stage, a baseline, the report) is
rescored in minutes instead of retraining every seed.

An entry holds one model variant's global model and its fine-tuned model per market, for one
dataset (its fingerprint), split, seed and training configuration: the key is the sha256 of
those, so any change to them, or to the code's `CACHE_VERSION`, misses the cache and trains
afresh. What decides the served stage only (`TrainConfig.ranker`, `threads`) is not part of
the key. Entries are written whole (a temporary directory renamed into place) and read with
`weights_only` loading; an unreadable entry is reported and retrained, never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.model import Bert4XMR

logger = logging.getLogger(__name__)

# Bump when training changes in a way the configuration does not show (a new loss term, a
# fixed bug): old entries then miss instead of standing in for what the code now trains.
CACHE_VERSION = 1
META = "entry.json"


@dataclass(frozen=True)
class CachedModels:
    """One variant's trained models: the global one, each market's fine-tuned one, and the
    training seconds they took when they were trained (reported, not re-measured)."""

    global_model: Bert4XMR
    tuned: dict[str, Bert4XMR]
    seconds: float


def cache_key(fingerprint: str, split: str, seed: int, config: TrainConfig,
              markets: list[str], n_items: int) -> str:
    """The entry's name: sha256 of everything that decides the trained weights, with each
    fit's item-table freezing resolved for the catalogue's `n_items` (what the fit does)."""
    trained = config.to_dict()
    for key in ("ranker", "threads"):  # the served stage and the thread count do not
        trained.pop(key, None)
    for stage, fit in (("pretrain", config.pretrain), ("finetune", config.finetune)):
        trained[stage].pop("freeze_items_above")
        trained[stage]["freeze_items"] = fit.freezes_items(n_items)
    trained["seed"] = seed
    blob = json.dumps({"version": CACHE_VERSION, "data": fingerprint, "split": split,
                       "markets": markets, "config": trained, "torch": torch.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ModelCache:
    """A directory of entries named by `cache_key`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load(self, key: str, fresh: Bert4XMR, markets: list[str]) -> CachedModels | None:
        """The entry's models (copies of `fresh`, an untrained model of the same form, with
        the stored weights), or None where there is no usable entry."""
        entry = self.root / key
        if not entry.is_dir():
            return None
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            if meta.get("key") != key or sorted(meta.get("markets", [])) != sorted(markets):
                raise ValueError(f"{META} does not describe this entry")
            global_model = _loaded(fresh, entry / "global.pt")
            tuned = {m: _loaded(fresh, entry / f"market-{m}.pt") for m in markets}
        except (OSError, ValueError, KeyError, RuntimeError, EOFError,
                pickle.UnpicklingError) as e:  # JSONDecodeError is a ValueError
            logger.warning("model cache entry %s unusable (%s): training afresh", entry, e)
            return None
        logger.info("model cache hit %s", entry)
        return CachedModels(global_model, tuned, float(meta.get("seconds", 0.0)))

    def store(self, key: str, models: CachedModels, description: dict[str, Any]) -> Path:
        """Write the entry whole: into a temporary directory, then renamed into place (an
        entry another process wrote first is kept)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / key
        tmp = self.root / f".{key[:12]}-{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            torch.save(models.global_model.state_dict(), tmp / "global.pt")
            for market, model in models.tuned.items():
                torch.save(model.state_dict(), tmp / f"market-{market}.pt")
            meta = {"key": key, "markets": sorted(models.tuned), "seconds": models.seconds,
                    **description}
            (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # not "another writer got there first"
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def _loaded(fresh: Bert4XMR, path: Path) -> Bert4XMR:
    model = copy.deepcopy(fresh)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model
