"""The sampled softmax: exact where every item is drawn, its logQ correction unbiased, the
teacher's top items as the dense teacher has them, chosen by catalogue size, and training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import ConfigError, FitConfig, TrainConfig, load_config
from training.data import read_dataset
from training.distill import build_teacher
from training.model import Bert4XMR, ModelConfig
from training.sampled_softmax import Negatives, NegativeSampler, sampled_loss
from training.split import MarketSplit
from training.train import _loss, _mask_batch, fit, new_model, prepare, validate

N_ROWS = 13  # 12 items and the padding row


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _split(train: list[list[int]]) -> MarketSplit:
    empty = np.zeros(0, dtype=np.int64)
    return MarketSplit("aa", "full", 0, [f"u{i}" for i in range(len(train))], train, empty,
                       empty, empty, np.unique(np.concatenate(train)))


def _batch(seed: int = 0) -> tuple[Bert4XMR, list[list[int]], torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """A small model in eval mode, sessions over items 1..10 (11 and 12 are not sold in the
    market), the masked batch and the market's allowed rows."""
    torch.manual_seed(seed)
    model = Bert4XMR(ModelConfig(n_rows=N_ROWS, n_markets=2, d_model=8, n_heads=2, d_ff=16,
                                 max_len=8)).eval()
    rng = np.random.default_rng(seed)
    seqs = [list(rng.permutation(np.arange(1, 11))[: int(rng.integers(3, 9))] + 0)
            for _ in range(24)]
    seqs = [[int(r) for r in seq] for seq in seqs]
    inputs, targets, owned = _mask_batch(seqs, 8, 0.5, rng, next_prob=0.3)
    allowed = torch.zeros(N_ROWS, dtype=torch.bool)
    allowed[1:11] = True
    return model, seqs, inputs, targets, owned, allowed


def _every_item_once(allowed: torch.Tensor) -> Negatives:
    rows = allowed.nonzero().flatten()
    return Negatives(rows, torch.zeros(len(rows)))  # S = n, q = 1/n: log(1) - log(1) = 0


@pytest.mark.parametrize("exclude_visible", [True, False])
def test_sampled_loss_with_every_item_drawn_once_equals_the_full_loss(
    exclude_visible: bool,
) -> None:
    model, _, inputs, targets, _, allowed = _batch()
    full = _loss(model, inputs, targets, 1, 0.0, exclude_visible, allowed)
    sampled = sampled_loss(model, inputs, targets, 1, _every_item_once(allowed),
                           exclude_visible, allowed)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize(("k", "everything_known"), [(100, True), (3, True), (3, False)])
def test_sampled_distillation_with_every_item_drawn_once_equals_the_full_one(
    k: int, everything_known: bool
) -> None:
    model, seqs, inputs, targets, owned, allowed = _batch()
    # With 30 sessions of all items 1..12 the teacher knows every item; without them most
    # items are unknown to it (a logit of 0): the top k, the rest known, the rest unknown.
    teacher = build_teacher(([list(range(1, N_ROWS))] * 30 if everything_known else []) + seqs,
                            N_ROWS)
    full = _loss(model, inputs, targets, 1, 0.0, True, allowed, teacher, owned, distill=1.0)
    plain = _loss(model, inputs, targets, 1, 0.0, True, allowed)
    sampled = sampled_loss(model, inputs, targets, 1, _every_item_once(allowed), True,
                           allowed, teacher, owned, distill=1.0, distill_top=k)
    assert full.item() > plain.item() + 1e-3  # the distillation term is there
    assert sampled.item() == pytest.approx(full.item(), rel=1e-5)


def test_teacher_top_items_are_the_dense_teachers_distribution() -> None:
    _, seqs, inputs, _, owned, allowed = _batch(seed=1)
    teacher = build_teacher(seqs, N_ROWS, temperature=0.5)
    scores = teacher.scores(inputs, owned)  # (B, N)
    usable = allowed.expand_as(scores).clone().scatter_(1, inputs, False)
    dense = torch.log_softmax((scores / 0.5).masked_fill(~usable, float("-inf")), 1)
    top = teacher.top(inputs, owned, allowed, True, k=3)
    informed = (scores * usable).amax(1) > 0
    assert torch.equal(top.informed, informed)
    known = top.rows != 0
    assert bool(known.any())
    assert torch.allclose(top.probs[known], dense.exp().gather(1, top.rows)[known], atol=1e-6)
    best = torch.where(usable & (scores > 0), dense, float("-inf")).topk(3, 1).values.exp()
    assert torch.allclose(top.probs[known], best[known], atol=1e-6)
    every = top.probs_at(torch.arange(N_ROWS))  # (B, N)
    assert torch.allclose(every[usable & informed[:, None]],
                          dense.exp()[usable & informed[:, None]], atol=1e-6)
    entropy = torch.where(usable, dense.exp() * dense, 0.0).sum(1)
    assert torch.allclose(top.neg_entropy[informed], entropy[informed], atol=1e-5)


def test_logq_correction_makes_the_partition_estimate_unbiased() -> None:
    # Item r bought r**2 times: power 1 draws item 10 about 100 times as often as item 1.
    counts = [[r] * (r * r - 1) + [r] for r in range(1, 11)]
    sampler = NegativeSampler.from_splits([(_split(counts), 0)], N_ROWS, n_draws=8,
                                          power=1.0, market_softmax=True)
    weights = np.arange(1, 11) ** 2.0
    q = weights / weights.sum()
    logits = torch.linspace(2.0, -2.0, N_ROWS)  # favours the rare items the draw misses
    exact = logits[1:11].exp().sum().item()
    rng = np.random.default_rng(0)
    corrected, plain, seen = [], [], np.zeros(N_ROWS)
    for _ in range(4000):
        draw = sampler.draw(0, rng)
        count = (draw.correction.double().exp().numpy() * 8 * q[draw.rows.numpy() - 1])
        seen[draw.rows.numpy()] += np.rint(count)
        corrected.append((logits[draw.rows] + draw.correction).exp().sum().item())
        plain.append(logits[draw.rows].exp().sum().item())
    assert np.allclose(seen[1:11] / seen.sum(), q, atol=0.01)  # draws follow q
    assert np.mean(corrected) == pytest.approx(exact, rel=0.05)
    assert np.mean(plain) < 0.5 * exact  # without the correction: far off


def test_sampler_draws_only_the_markets_items() -> None:
    sampler = NegativeSampler.from_splits([(_split([[3, 4], [4, 7]]), 2)], N_ROWS, 64, 0.75,
                                          market_softmax=True)
    draw = sampler.draw(2, np.random.default_rng(0))
    assert set(draw.rows.tolist()) == {3, 4, 7}
    every = NegativeSampler.from_splits([(_split([[3, 4]]), 0)], N_ROWS, 2000, 0.0, False)
    assert set(every.draw(0, np.random.default_rng(0)).rows.tolist()) == set(range(1, N_ROWS))


def test_auto_softmax_is_full_up_to_the_threshold_and_sampled_above() -> None:
    config = FitConfig()
    assert config.softmax == "auto"
    assert config.softmax_for(8_304) == "full"
    assert config.softmax_for(config.sampled_above) == "full"
    assert config.softmax_for(config.sampled_above + 1) == "sampled"
    assert replace(config, softmax="sampled").softmax_for(100) == "sampled"
    assert replace(config, softmax="full").softmax_for(10**7) == "full"


def test_softmax_keys_read_from_toml_and_bad_values_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pretrain]\nsoftmax = "sampled"\nnegatives = 512\nnegatives_power = 0.5\n'
                    'sampled_above = 1000\ndistill_top = 20\n', encoding="utf-8")
    config = load_config(path)
    assert (config.pretrain.softmax, config.pretrain.negatives, config.pretrain.negatives_power,
            config.pretrain.sampled_above, config.pretrain.distill_top) == (
        "sampled", 512, 0.5, 1000, 20)
    assert config.finetune.softmax == "auto"  # a table replaces only the keys it names
    for body, words in [('softmax = "sampeld"', "softmax must be one of"),
                        ("negatives = 0", "negatives"), ("negative = 5", "unknown key"),
                        ('softmax = "sampled"\nlabel_smoothing = 0.1', "label_smoothing")]:
        path.write_text(f"[pretrain]\n{body}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=words):
            load_config(path)


def test_fit_with_the_sampled_softmax_learns_and_gives_back_a_dense_table(
    synthetic_data_dir: Path, tiny_train_config: TrainConfig
) -> None:
    prepared = prepare(read_dataset(synthetic_data_dir), "full", seed=0)
    model = new_model(prepared, tiny_train_config)
    splits = [(prepared.splits[m], row) for row, m in enumerate(prepared.markets)]

    before = validate(model, splits, "cpu")["mean"]
    config = FitConfig(lr=3e-3, batch_size=32, max_epochs=4, patience=10, softmax="sampled",
                       negatives=64, next_prob=0.5, distill=1.0, distill_top=20)
    result = fit(model, splits, config, seed=0, name="test")
    losses = [epoch["loss"] for epoch in result.history]
    assert losses[-1] < 0.9 * losses[0]
    assert result.best_metric is not None and result.best_metric > before + 0.02
    assert validate(model, splits, "cpu")["mean"] == pytest.approx(result.best_metric)
    assert not model.item_emb.sparse


def test_fine_tuning_freezes_the_item_table_above_its_threshold(
    synthetic_data_dir: Path, tiny_train_config: TrainConfig
) -> None:
    fine = TrainConfig().finetune
    assert fine.freezes_items(8_304) is False  # XMarket's size: the fine-tune trains the table
    assert fine.freezes_items(1_000_000) is True
    assert TrainConfig().pretrain.freezes_items(1_000_000) is False  # pre-training never
    assert replace(fine, freeze_items=True).freezes_items(10) is True

    prepared = prepare(read_dataset(synthetic_data_dir), "full", seed=0)
    model = new_model(prepared, tiny_train_config)
    splits = [(prepared.splits[m], row) for row, m in enumerate(prepared.markets)]
    table = model.item_emb.weight.detach().clone()
    n_items = model.config.n_rows - 1
    for softmax in ("full", "sampled"):
        config = FitConfig(batch_size=32, max_epochs=1, softmax=softmax, negatives=64,
                           distill_top=20, freeze_items_above=n_items - 1)
        fit(model, splits, config, seed=0, name="frozen")
        assert torch.equal(model.item_emb.weight, table)
        assert model.item_emb.weight.grad is None  # no table-sized gradient kept
        assert model.item_emb.weight.requires_grad  # given back trainable
    fit(model, splits, replace(config, freeze_items_above=n_items), seed=0, name="trained")
    assert not torch.equal(model.item_emb.weight, table)
