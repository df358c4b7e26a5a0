"""Training: `fit()` is the one loop (train an epoch, validate, keep the best state, stop early);
`pretrain()` and `finetune()` compose it; `train_markets()` is what `xmr train` runs.

Objective: for each user, a random part of the training items is hidden, the visible part is
encoded, and each hidden item is predicted with a full-softmax cross-entropy over the catalogue
(cheap at ~8K items; it also pushes down items never sold in the market), or above
`FitConfig.sampled_above` items with a sampled softmax (training.sampled_softmax).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.checkpoint import Manifest, save_checkpoint
from training.config import FitConfig, TrainConfig
from training.data import Dataset
from training.distill import Teacher, build_teacher, distillation_loss
from training.distributed import Distributed
from training.evaluate import evaluate_split, model_scorer, pad_sessions
from training.model import Bert4XMR, ModelConfig
from training.ranker import save_ranker
from training.sampled_softmax import NegativeSampler, sampled_loss
from training.served import RankerFitting, ranker_spec
from training.split import MarketSplit, split_market
from training.vocab import PAD, Vocab

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_metric: float | None  # None: no validation users, nothing was measured
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _batches(
    splits: list[tuple[MarketSplit, int]], batch_size: int, rng: np.random.Generator
) -> list[tuple[int, list[list[int]]]]:
    """Shuffled batches of training sequences, one market per batch.

    Users are shuffled, then sorted by length inside windows of 16 batches, so that a batch
    pads to a similar length (sessions are mostly short, a few are long).
    """
    out: list[tuple[int, list[list[int]]]] = []
    for split, market_row in splits:
        seqs = [s for s in split.train if len(s) >= 2]
        order = rng.permutation(len(seqs))
        window = 16 * batch_size
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(seqs[i]))
            for start in range(0, len(chunk), batch_size):
                out.append((market_row, [seqs[i] for i in chunk[start : start + batch_size]]))
    return [out[i] for i in rng.permutation(len(out))]


def _mask_batch(
    seqs: list[list[int]],
    max_len: int,
    mask_prob: float,
    rng: np.random.Generator,
    hide_last: float = 0.0,
    next_prob: float = 0.0,
    next_span: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each sequence into visible inputs and hidden targets (each at least one item).

    With probability `hide_last` the newest item is always hidden: under a time split the
    held-out item is the newest one, and this puts more of that task into training. With
    probability `next_prob` the sequence is a next-item example instead: cut at a random point,
    everything before the cut visible, the `next_span` items after it hidden. Returns the
    visible rows, the hidden rows and each user's own (newest) items.
    """
    visible: list[list[int]] = []
    hidden: list[list[int]] = []
    for seq in seqs:
        if next_prob and len(seq) >= 2 and rng.random() < next_prob:
            cut = int(rng.integers(1, len(seq)))
            visible.append(seq[max(0, cut - max_len) : cut])
            hidden.append(seq[cut : cut + next_span])
            continue
        seq = seq[-(max_len + 1) :]
        hide = rng.random(len(seq)) < mask_prob
        if hide_last and rng.random() < hide_last:
            hide[-1] = True
        if hide.all():
            hide[rng.integers(len(seq))] = False
        if not hide.any():
            hide[rng.integers(len(seq))] = True
        visible.append([r for r, h in zip(seq, hide, strict=True) if not h])
        hidden.append([r for r, h in zip(seq, hide, strict=True) if h])
    owned = pad_sessions(seqs, max_len + 1)
    return pad_sessions(visible, max_len), pad_sessions(hidden, max_len + 1), owned


def _loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    market_row: int,
    label_smoothing: float,
    exclude_visible: bool = False,
    allowed: torch.Tensor | None = None,
    teacher: Teacher | None = None,
    owned: torch.Tensor | None = None,
    distill: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the hidden items; `allowed` (N,) restricts the softmax. With a
    `teacher`, plus `distill` times the KL from its distribution (training.distill)."""
    market = torch.full((inputs.shape[0],), market_row, dtype=torch.long, device=inputs.device)
    logits = model(inputs, market)  # (B, N)
    if exclude_visible:
        # The session's own items are never recommended back: don't spend the loss on them.
        logits = logits.scatter(1, inputs, float("-inf"))  # also hits PAD through the padding
    else:
        logits = logits.index_fill(1, torch.tensor([PAD], device=logits.device), float("-inf"))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    log_probs = F.log_softmax(logits, dim=-1)  # (B, N)
    real = targets != PAD  # (B, M)
    picked = log_probs.gather(1, targets)  # (B, M); -inf at padding, masked out next
    nll = -torch.where(real, picked, torch.zeros_like(picked)).sum() / real.sum()
    if teacher is not None and owned is not None and distill:
        with torch.no_grad():
            scores = teacher.scores(inputs, owned)  # (B, N)
        nll = nll + distill * distillation_loss(log_probs, scores, teacher.temperature)
    if label_smoothing:
        finite = torch.isfinite(log_probs)
        per_row = torch.where(finite, log_probs, torch.zeros_like(log_probs)).sum(-1)
        uniform = -(per_row / finite.sum(-1)).mean()
        return (1 - label_smoothing) * nll + label_smoothing * uniform
    return nll


def _progress(items: list, description: str) -> Iterator:
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)


def validate(
    model: Bert4XMR, splits: list[tuple[MarketSplit, int]], device: str
) -> dict[str, float]:
    """Validation NDCG@10 per market and `mean` weighted by evaluated users."""
    scores: dict[str, float] = {}
    total, weight = 0.0, 0
    for split, market_row in splits:
        if not len(split.eval_users):
            continue
        metric = evaluate_split(split, model_scorer(model, market_row, device), "valid")["ndcg@10"]
        scores[split.market] = metric
        total += metric * len(split.eval_users)
        weight += len(split.eval_users)
    scores["mean"] = total / weight if weight else 0.0
    return scores


class TrainingStep:
    """One optimisation step on a batch of one market: the loss (full or sampled softmax,
    FitConfig.softmax), its backward pass and the optimisers. `fit()` runs it over epochs;
    benchmarks/scale.py times it. With the sampled softmax the item table takes sparse
    gradients (SparseAdam on the rows a step touched, with AdamW's decoupled weight decay on
    those rows): a dense AdamW step over a million-row table costs more than the rest of the
    step (benchmarks/README.md). `close()` gives the model its dense item table back."""

    def __init__(self, model: Bert4XMR, splits: list[tuple[MarketSplit, int]],
                 config: FitConfig, device: str = "cpu", dist: Distributed | None = None) -> None:
        self.model, self.config, self.device = model, config, device
        self.softmax = config.softmax_for(model.config.n_rows - 1)
        if self.softmax == "sampled" and config.label_smoothing:
            raise ValueError(f"softmax=auto chose 'sampled' for {model.config.n_rows - 1} items "
                             "(above sampled_above), which has no label_smoothing: set "
                             "softmax='full' or label_smoothing=0")
        model.to(device)
        dist = dist or Distributed.single()
        # NCCL has no sparse all-reduce: several GPU processes keep the table dense (a GPU
        # steps a million rows quickly); gloo (CPU) reduces sparse gradients.
        frozen = config.freezes_items(model.config.n_rows - 1)
        sparse = (self.softmax == "sampled" and not frozen
                  and not (dist.world_size > 1 and str(device).startswith("cuda")))
        model.item_emb.sparse = sparse
        # A frozen table takes no gradient at all (no optimizer would ever clear it: at 1M
        # items it would be a dense table-sized sum growing every step); `close` restores it.
        model.item_emb.weight.requires_grad_(not frozen)
        self.wrapped = dist.wrap(model)
        table = model.item_emb.weight
        dense_table = not (frozen or sparse)
        self.optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad and (p is not table or dense_table)],
            lr=config.lr, weight_decay=config.weight_decay)]
        if sparse:
            self.optimizers.append(torch.optim.SparseAdam([model.item_emb.weight], lr=config.lr))
        self.allowed: dict[int, torch.Tensor] = {}
        if config.market_softmax:
            for split, market_row in splits:
                mask = torch.zeros(model.config.n_rows, dtype=torch.bool)
                mask[torch.as_tensor(split.catalogue())] = True
                self.allowed[market_row] = mask.to(device)
        self.teacher = None
        if config.distill:
            self.teacher = build_teacher([seq for split, _ in splits for seq in split.train],
                                         model.config.n_rows, decay=config.distill_decay,
                                         temperature=config.distill_temperature).to(device)
        self.sampler = (NegativeSampler.from_splits(
            splits, model.config.n_rows, config.negatives, config.negatives_power,
            config.market_softmax) if self.softmax == "sampled" else None)

    def __call__(self, market_row: int, seqs: list[list[int]], rng: np.random.Generator) -> float:
        """Train on one batch; returns its loss."""
        config, device = self.config, self.device
        inputs, targets, owned = _mask_batch(
            seqs, self.model.config.max_len, config.mask_prob, rng, config.hide_last,
            config.next_prob, config.next_span,
        )
        inputs, targets, owned = inputs.to(device), targets.to(device), owned.to(device)
        if self.sampler is not None:
            loss = sampled_loss(
                self.wrapped, inputs, targets, market_row,
                self.sampler.draw(market_row, rng, device), config.exclude_visible,
                self.allowed.get(market_row), self.teacher, owned, config.distill,
                config.distill_top,
            )
        else:
            loss = _loss(
                self.wrapped, inputs, targets, market_row, config.label_smoothing,
                config.exclude_visible, self.allowed.get(market_row), self.teacher, owned,
                config.distill,
            )
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        table = self.model.item_emb.weight
        touched = (table.grad.coalesce().indices()[0]
                   if table.grad is not None and table.grad.is_sparse else None)
        for optimizer in self.optimizers:
            optimizer.step()
        if touched is not None and config.weight_decay:
            with torch.no_grad():  # AdamW's decoupled decay, on the rows this step moved
                table[touched] *= 1.0 - config.lr * config.weight_decay
        return float(loss.item())

    def close(self) -> None:
        self.model.item_emb.sparse = False
        self.model.item_emb.weight.requires_grad_(True)


def fit(
    model: Bert4XMR,
    splits: list[tuple[MarketSplit, int]],
    config: FitConfig,
    seed: int,
    name: str,
    device: str = "cpu",
    dist: Distributed | None = None,
) -> FitResult:
    """Train with early stopping on validation NDCG@10; `model` ends with the best weights."""
    dist = dist or Distributed.single()
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_step = TrainingStep(model, splits, config, device, dist)
    logger.info("fit=%s softmax=%s items=%d", name, train_step.softmax, model.config.n_rows - 1)
    try:
        return _fit(model, splits, config, name, device, dist, train_step, rng, started)
    finally:
        train_step.close()


def _fit(model: Bert4XMR, splits: list[tuple[MarketSplit, int]], config: FitConfig, name: str,
         device: str, dist: Distributed, train_step: TrainingStep, rng: np.random.Generator,
         started: float) -> FitResult:
    def step(epoch: int) -> tuple[float, int]:
        """One epoch of training; returns the summed loss and the number of sequences."""
        model.train()
        batches = dist.shard(_batches(splits, config.batch_size, rng))
        total, n = 0.0, 0
        for market_row, seqs in _progress(batches, f"{name} epoch {epoch}"):
            total += train_step(market_row, seqs, rng) * len(seqs)
            n += len(seqs)
        return total, n

    if not any(len(split.eval_users) for split, _ in splits):
        # Nothing to validate on (e.g. a market of one user): fine-tuning keeps the starting
        # weights, training from scratch runs every epoch; no metric is reported.
        epochs = 0 if config.validate_start else config.max_epochs
        logger.warning("fit=%s no validation users: training %d epochs, no early stopping",
                       name, epochs)
        for epoch in range(1, epochs + 1):
            step(epoch)
        model.eval()
        return FitResult(None, epochs, epochs, time.perf_counter() - started)
    limit = config.valid_users_for(model.config.n_rows - 1)
    checked = [(split.evaluating(limit), row) for split, row in splits]
    for (split, _), (subset, _) in zip(splits, checked, strict=True):
        if subset is not split:
            logger.info("fit=%s market=%s validates on %d of its %d validation users "
                        "(valid_scores)", name, split.market, len(subset.eval_users),
                        len(split.eval_users))
    best = validate(model, checked, device)["mean"] if config.validate_start else -1.0
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, stale, epochs_run = 0, 0, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, config.max_epochs + 1):
        total, n = step(epoch)
        epochs_run = epoch
        scores = validate(model, checked, device)
        history.append({"epoch": epoch, "loss": total / max(n, 1), **scores})
        logger.info(
            "fit=%s epoch=%d loss=%.4f valid_ndcg@10=%.4f",
            name,
            epoch,
            total / max(n, 1),
            scores["mean"],
        )
        if scores["mean"] > best:
            best, best_epoch, stale = scores["mean"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best, best_epoch, epochs_run, time.perf_counter() - started, history)


@dataclass
class Prepared:
    """A dataset split for training: the shared vocabulary and each market's split."""

    dataset: Dataset
    vocab: Vocab
    markets: list[str]
    splits: dict[str, MarketSplit]


def prepare(dataset: Dataset, split: str, seed: int) -> Prepared:
    vocab = Vocab.from_items(dataset.item_ids)
    markets = dataset.market_codes
    all_items = np.arange(1, vocab.n_rows, dtype=np.int64)
    splits = {
        m: split_market(dataset.markets[m], vocab, split, seed, all_items=all_items)
        for m in markets
    }
    return Prepared(dataset, vocab, markets, splits)


def new_model(prepared: Prepared, config: TrainConfig) -> Bert4XMR:
    model_config = ModelConfig(
        n_rows=prepared.vocab.n_rows, n_markets=len(prepared.markets), **config.model_kwargs()
    )
    torch.manual_seed(config.seed)
    return Bert4XMR(model_config)


def market_counts(split: MarketSplit, vocab: Vocab) -> dict[str, int]:
    """Interactions per item sold in the market (training part), most popular first."""
    counts = split.train_counts(vocab.n_rows)
    rows = sorted(split.market_items.tolist(), key=lambda row: (-counts[row], row))
    return {vocab.item_id(row): int(counts[row]) for row in rows}


def pretrain(
    prepared: Prepared, config: TrainConfig, device: str = "cpu", dist: Distributed | None = None
) -> tuple[Bert4XMR, FitResult]:
    model = new_model(prepared, config)
    splits = [(prepared.splits[m], row) for row, m in enumerate(prepared.markets)]
    result = fit(model, splits, config.pretrain, config.seed, "global", device, dist)
    return model, result


def finetune(
    global_model: Bert4XMR,
    prepared: Prepared,
    market: str,
    config: TrainConfig,
    device: str = "cpu",
    dist: Distributed | None = None,
) -> tuple[Bert4XMR, FitResult]:
    model = copy.deepcopy(global_model)
    row = prepared.markets.index(market)
    result = fit(
        model,
        [(prepared.splits[market], row)],
        config.finetune,
        config.seed + row,
        f"finetune-{market}",
        device,
        dist,
    )
    return model, result


def train_markets(
    dataset: Dataset,
    out: Path,
    config: TrainConfig,
    split: str = "none",
    device: str = "cpu",
    dist: Distributed | None = None,
) -> dict[str, FitResult]:
    """Pre-train on all markets, fine-tune each, and (on rank 0) write the checkpoints."""
    dist = dist or Distributed.single()
    prepared = prepare(dataset, split, config.seed)
    global_model, global_result = pretrain(prepared, config, device, dist)
    results = {"global": global_result}
    base = {
        "markets": prepared.markets,
        "data_fingerprint": dataset.fingerprint,
        "train_config": {**config.to_dict(), "split": split},
    }
    global_manifest = Manifest(
        kind="global",
        model_config=global_model.config,
        metrics={"valid_ndcg@10": global_result.best_metric},
        **base,  # type: ignore[arg-type]
    )
    if dist.is_main:
        save_checkpoint(out / "global", global_model, prepared.vocab, global_manifest)
    fitting = (RankerFitting(prepared.splits, prepared.markets, prepared.vocab.n_rows,
                             ranker_spec(config.ranker), config.ranker.max_users, config.seed,
                             slate_negatives=config.ranker.slate_negatives)
               if config.ranker.enabled and dist.is_main else None)
    weights: dict[str, str] = {}
    for market in prepared.markets:
        model, result = finetune(global_model, prepared, market, config, device, dist)
        results[market] = result
        if dist.is_main:
            manifest = Manifest(
                kind="market",
                model_config=model.config,
                market=market,
                parent={"path": "../../global", "weights_sha256": global_manifest.weights_sha256},
                metrics={"valid_ndcg@10": result.best_metric},
                **base,  # type: ignore[arg-type]
            )
            save_checkpoint(
                out / "markets" / market,
                model,
                prepared.vocab,
                manifest,
                market_counts(prepared.splits[market], prepared.vocab),
            )
            weights[market] = manifest.weights_sha256
        if fitting is not None:
            fitting.add(market, model, device)
    if fitting is not None:
        fitted = fitting.fit(config.ranker.hidden, config.ranker.l2, config.ranker.market_l2)
        for market, ranker in fitted.rankers.items():
            save_ranker(out / "markets" / market, ranker, weights[market], fitted.fitted[market])
        logger.info("rankers fitted markets=%d seconds=%.1f", len(fitted.rankers),
                    fitted.seconds)
    dist.barrier()
    return results
