"""The training configuration: TOML tables override only the keys they give, unknown keys are
refused with the file and table named, and `paper_form` is the paper's Bert4XMR."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, FitConfig, TrainConfig, load_config, paper_form


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_a_table_replaces_only_the_keys_it_gives(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "threads = 1\n[pretrain]\nmax_epochs = 2\n"
                                          "[finetune]\nmax_epochs = 1\n"))
    default = TrainConfig()
    assert config.threads == 1 and config.pretrain.max_epochs == 2
    assert config.finetune.max_epochs == 1
    # The fine-tune's own defaults (lower lr, validate_start) survive the partial table.
    assert config.finetune.lr == default.finetune.lr != FitConfig().lr
    assert config.finetune.validate_start is True
    assert config.pretrain.distill == default.pretrain.distill
    assert config.model_kwargs() == default.model_kwargs()


@pytest.mark.parametrize(("text", "named"), [
    ("d_modle = 32\n", "d_modle"),
    ("[pretrain]\nlr_rate = 0.1\n", "[pretrain]"),
    ("[ranker]\nretreive = 10\n", "[ranker]"),
    ("d_model = 'wide'\n", "d_model"),
])
def test_bad_keys_are_refused_with_where(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.toml") as caught:
        load_config(_write(tmp_path, text))
    assert named in str(caught.value)


def test_paper_form_is_the_papers_model_beside_the_default() -> None:
    config = TrainConfig(seed=3, threads=1)
    paper = paper_form(config)
    assert (paper.d_model, paper.d_ff, paper.pooling) == (64, 256, "mean")
    assert not paper.position_embedding
    assert paper.market_embedding and paper.market_placement == "both"
    for fit in (paper.pretrain, paper.finetune):
        assert fit.next_prob == 0.0 and fit.distill == 0.0
    # Everything that is not the model's form stays as given.
    assert (paper.seed, paper.threads, paper.n_layers) == (3, 1, config.n_layers)
    assert paper.finetune.lr == config.finetune.lr and paper.ranker == config.ranker
    # The default is not the paper's form (what the served numbers use differs from it).
    assert config.model_kwargs() != paper.model_kwargs()
