"""Training configuration: typed dataclasses, read from TOML with unknown keys refused."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MODEL_KEYS = (
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "dropout",
    "max_len",
    "market_embedding",
    "position_embedding",
    "output_projection",
)


class ConfigError(ValueError):
    """An invalid configuration file or value; the message names the file and key."""


@dataclass(frozen=True)
class FitConfig:
    """One `fit()` run: optimiser, batching, masking and early stopping.

    Defaults were chosen by `benchmarks/sweep.py` on the XMarket validation items (never test):
    hiding half of each session, leaving the visible items and items not sold in the market out
    of the softmax, and often hiding the newest item each helped full-ranking NDCG@10.
    """

    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 3
    mask_prob: float = 0.5
    label_smoothing: float = 0.0
    exclude_visible: bool = True  # leave the session's own items out of the softmax
    market_softmax: bool = True  # softmax over the items the market sells (its training items)
    hide_last: float = 0.5  # probability of always hiding the newest item (see train._mask_batch)
    validate_start: bool = False  # score the starting weights too (fine-tuning keeps them if best)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.2
    max_len: int = 50
    market_embedding: bool = True
    position_embedding: bool = False
    output_projection: bool = False
    threads: int = 2
    pretrain: FitConfig = field(default_factory=FitConfig)
    finetune: FitConfig = field(
        default_factory=lambda: FitConfig(lr=5e-4, max_epochs=10, patience=2, validate_start=True)
    )

    def model_kwargs(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in MODEL_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("pretrain", "finetune"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            default = getattr(cls(), key)
            kwargs[key] = replace(default, **_build(FitConfig, value, f"{where} [{key}]").__dict__)
            continue
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {expected.__name__}, got {value!r}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(path: Path | None) -> TrainConfig:
    """The default configuration, or one read from a TOML file (unknown keys are errors)."""
    if path is None:
        return TrainConfig()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    config: TrainConfig = _build(TrainConfig, data, str(path))
    return config
