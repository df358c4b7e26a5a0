"""Training configuration: typed dataclasses, read from TOML with unknown keys refused."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SOFTMAXES = ("auto", "full", "sampled")
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
    "pooling",
    "market_placement",
)


class ConfigError(ValueError):
    """An invalid configuration file or value; the message names the file and key."""


@dataclass(frozen=True)
class FitConfig:
    """One `fit()` run: optimiser, batching, masking and early stopping.

    Defaults were chosen by `benchmarks/sweep.py` on the XMarket validation items (never test):
    hiding half of each session, leaving the visible items and items not sold in the market out
    of the softmax, and often hiding the newest item each helped full-ranking NDCG@10; so did
    turning half of the sequences into next-item examples and distilling the co-occurrence
    teacher (weight 1, temperature 0.1): fine-tuned validation mean 0.280 -> 0.354 together
    with the wider, order-aware model of TrainConfig.
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
    # Probability that a training sequence becomes a next-item example instead: cut at a random
    # point, every item before the cut visible, the `next_span` items after it hidden.
    next_prob: float = 0.5
    next_span: int = 1
    # Weight of the distillation term (training.distill): KL from a co-occurrence teacher.
    distill: float = 1.0
    distill_temperature: float = 0.1
    distill_decay: float = 0.6
    # Keep the item embedding as it is (fine-tuning: markets then share the global item table
    # and store no item rows of their own), always, or above `freeze_items_above` items.
    # XMarket (8.3K items, seed 0, validation): training the table during fine-tuning buys
    # +0.005 NDCG@10 (0.3543 vs 0.3489 frozen); at 1M items x 50 markets its changed rows
    # would take ~606 MiB beside a 257 MiB global checkpoint (issue 12's disk goal), so the
    # fine-tune default freezes it above 100K items.
    freeze_items: bool = False
    freeze_items_above: int | None = None
    # The softmax of the loss (training.sampled_softmax): "full" scores every allowed item,
    # "sampled" a shared draw of `negatives` items per step (popularity ** `negatives_power`,
    # corrected by log of each item's expected count) and updates the item table sparsely;
    # "auto" is full up to `sampled_above` items and sampled above. The full softmax's step
    # grows with the catalogue (one thread, d_model 64: 0.29 s at 8K items, 2.1 s at 100K);
    # 20K is about where it passes twice its 8K cost. XMarket (8.3K items) stays full.
    softmax: str = "auto"
    negatives: int = 2048
    negatives_power: float = 0.75
    sampled_above: int = 20_000
    # Distillation in the sampled path: the teacher's `distill_top` best items per example are
    # scored, the rest of the catalogue is one bucket (training.distill.TeacherTop).
    distill_top: int = 100
    # Early stopping ranks every item for each validation user: 0.12-0.17 s per user at a
    # million items (benchmarks/README.md), hours for a market of 500K users. A market then
    # validates on a fixed random subset of `valid_scores // n_items` of its validation users
    # (500 at 1M items, about a minute; XMarket's 8.3K items allow 60K, more than any market
    # has, so its results do not change).
    valid_scores: int = 500_000_000

    def __post_init__(self) -> None:
        if self.softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, not {self.softmax!r}")
        if self.negatives < 1 or self.distill_top < 1 or self.sampled_above < 0:
            raise ValueError("negatives and distill_top must be >= 1, sampled_above >= 0")
        if self.valid_scores < 1:
            raise ValueError(f"valid_scores must be >= 1, not {self.valid_scores}")
        if self.negatives_power < 0:
            raise ValueError(f"negatives_power must be >= 0, not {self.negatives_power}")
        if self.softmax == "sampled" and self.label_smoothing:
            raise ValueError("label_smoothing needs softmax='full' (the sampled softmax has no "
                             "mean over the whole catalogue)")

    def freezes_items(self, n_items: int) -> bool:
        """Whether this fit keeps the item table as it is, over a catalogue of `n_items`."""
        above = self.freeze_items_above
        return self.freeze_items or (above is not None and n_items > above)

    def valid_users_for(self, n_items: int) -> int:
        """The most validation users a market validates on over a catalogue of `n_items`."""
        return max(1, self.valid_scores // max(n_items, 1))

    def softmax_for(self, n_items: int) -> str:
        """The softmax used over a catalogue of `n_items` items: "full" or "sampled"."""
        if self.softmax != "auto":
            return self.softmax
        return "sampled" if n_items > self.sampled_above else "full"


@dataclass(frozen=True)
class RankerConfig:
    """The served ranking's second stage (`training.ranker`), fitted by `xmr train` on
    validation items: how many candidates the model and co-occurrence each bring, how many
    neighbours each item keeps, the scorer's form (0 hidden units: linear) and its L2 weight,
    how many validation users per market it is fitted on at most, and how many random market
    items stand beside each validation target when the scorer of explicit candidate lists
    (`MarketRanker.slate_scorer`) is fitted (0: lists are ordered by the pool's scorer), and
    the pull of each market's own scorer towards the shared one (0: every market uses the
    shared scorer; see `training.served.fit_scorers`)."""

    enabled: bool = True
    # XMarket, split full, seed 0, cross-validated on validation users (ranker_sweep.py):
    # 100/100/50 scored 0.3653 against 0.3650 for 200/200/100 (and 0.3646 for 300/300/100,
    # 0.3629 for 50/50/50) at half of rank_session's time (181 against 364 us, loaded machine).
    retrieve: int = 100
    expand: int = 100
    neighbours: int = 50
    hidden: int = 0
    l2: float = 1e-3
    max_users: int = 2000
    slate_negatives: int = 99
    # XMarket, split full, seed 0, 2-fold cross-validation over validation users
    # (benchmarks/ranker_sweep.py): shared 0.3625, market_l2 0.1 0.3646, 0.01 0.3650.
    market_l2: float = 0.01
    # > 0: the candidate's cosine with the newest session item's vector and its largest and
    # mean with the `similar` newest items' as three more features (training.ranker.RankerSpec).
    # XMarket, seed 0, cross-validated on validation users (ranker_sweep.py), off -> 8:
    # acmr slates 0.6055 -> 0.6229 (every market +0.014 to +0.021), acmr pool 0.3930 -> 0.3996,
    # full pool 0.3652 -> 0.3669, full slates 0.5431 -> 0.5488; 20 or 50 items: no better.
    similar: int = 8


@dataclass(frozen=True)
class TrainConfig:
    """The model's form and the two fits. The defaults are what `xmr train` ships and what the
    harness's `served` and `bert4xmr` rows measure: width 128, positions counted back from the
    newest item, a learned recency-weighted pooling (chosen on validation, see FitConfig);
    `paper_form()` gives the paper's model beside it."""

    seed: int = 0
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 512
    dropout: float = 0.2
    max_len: int = 50
    market_embedding: bool = True
    position_embedding: bool = True
    output_projection: bool = False
    pooling: str = "recency"
    market_placement: str = "both"
    threads: int = 2
    pretrain: FitConfig = field(default_factory=FitConfig)
    finetune: FitConfig = field(
        default_factory=lambda: FitConfig(lr=5e-4, max_epochs=10, patience=2, validate_start=True,
                                          freeze_items_above=100_000)
    )
    ranker: RankerConfig = field(default_factory=RankerConfig)

    def model_kwargs(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in MODEL_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


def paper_form(config: TrainConfig) -> TrainConfig:
    """The paper's Bert4XMR beside `config` (and this product's model before issue 10): width
    64, the session as a set (no position embedding), the plain mean of the outputs, the market
    embedding on both sides, and only the masked-item objective (no next-item examples, no
    distillation). The harness reports it as `bert4xmr_paper`."""
    return replace(
        config, d_model=64, d_ff=256, pooling="mean", position_embedding=False,
        market_embedding=True, market_placement="both",
        pretrain=replace(config.pretrain, next_prob=0.0, distill=0.0),
        finetune=replace(config.finetune, next_prob=0.0, distill=0.0),
    )


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("pretrain", "finetune", "ranker"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            default = getattr(cls(), key)
            table = RankerConfig if key == "ranker" else FitConfig
            given = {k: getattr(_build(table, value, f"{where} [{key}]"), k) for k in value}
            kwargs[key] = replace(default, **given)
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
