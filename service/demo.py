"""`xmr demo`: synthetic markets -> train -> build indexes -> serve -> one real recommendation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from service.index import build_index
from service.server import background_server
from service.settings import Settings
from training.config import FitConfig, TrainConfig
from training.data import read_dataset
from training.synthetic import SyntheticSpec, write_synthetic
from training.train import train_markets

logger = logging.getLogger(__name__)

# Small enough for well under a minute on two cores; still learns the synthetic topics.
DEMO_TRAIN = TrainConfig(
    d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.1, threads=2,
    pretrain=FitConfig(max_epochs=4, patience=2),
    finetune=FitConfig(lr=5e-4, max_epochs=2, patience=1, validate_start=True),
)


@dataclass(frozen=True)
class DemoResult:
    artifacts: Path
    market: str
    request: dict[str, Any]
    response: dict[str, Any]


def build_artifacts(workdir: Path, config: TrainConfig = DEMO_TRAIN,
                    spec: SyntheticSpec | None = None) -> Path:
    """Synthetic data, trained checkpoints and indexes under `workdir`; returns the artifacts."""
    data, artifacts = workdir / "data", workdir / "artifacts"
    write_synthetic(data, spec)
    torch.set_num_threads(config.threads)
    train_markets(read_dataset(data, None), artifacts, config)
    for market_dir in sorted((artifacts / "markets").iterdir()):
        build_index(market_dir)
    return artifacts


def run_demo(workdir: Path, config: TrainConfig = DEMO_TRAIN,
             spec: SyntheticSpec | None = None) -> DemoResult:
    artifacts = build_artifacts(workdir, config, spec)
    settings = Settings(artifacts=artifacts, host="127.0.0.1", redis_url=None,
                        reload_on_sighup=False)
    with background_server(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        markets = client.get("/markets").raise_for_status().json()["markets"]
        market = markets[0]["market"]
        popular = client.post(f"/markets/{market}/recommend", json={"k": 3}).json()
        request = {"items": [item["item_id"] for item in popular["items"][:2]], "k": 5}
        response = client.post(f"/markets/{market}/recommend", json=request)
        response.raise_for_status()
    return DemoResult(artifacts, market, request, response.json())
