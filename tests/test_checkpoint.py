"""Checkpoint round trip, and refusal of corrupt or mismatched checkpoints naming the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    ITEMS,
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    Manifest,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from training.model import Bert4XMR, ModelConfig
from training.vocab import Vocab

ITEM_IDS = [f"I{n:03d}" for n in range(12)]


def _model() -> Bert4XMR:
    torch.manual_seed(0)
    config = ModelConfig(n_rows=len(ITEM_IDS) + 1, n_markets=2, d_model=16, n_layers=1,
                         n_heads=2, d_ff=32)
    return Bert4XMR(config).eval()


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    model = _model()
    manifest = Manifest(kind="market", model_config=model.config, markets=["aa", "bb"],
                        market="bb", data_fingerprint="abc", metrics={"valid_ndcg@10": 0.25})
    counts = {ITEM_IDS[3]: 7, ITEM_IDS[1]: 2}
    save_checkpoint(tmp_path / "bb", model, Vocab(ITEM_IDS), manifest, counts)
    return tmp_path / "bb"


def test_round_trip_keeps_weights_scores_vocab_and_manifest(checkpoint_dir: Path) -> None:
    original = _model()
    loaded = load_checkpoint(checkpoint_dir)
    assert loaded.vocab.item_ids == ITEM_IDS
    assert loaded.manifest.market == "bb" and loaded.market_row == 1
    assert loaded.manifest.metrics == {"valid_ndcg@10": 0.25}
    assert loaded.manifest.data_fingerprint == "abc"
    assert loaded.manifest.model_config == original.config
    assert loaded.market_items == {ITEM_IDS[3]: 7, ITEM_IDS[1]: 2}
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    items = torch.tensor([[1, 2, 3], [4, 5, 0]])
    market = torch.tensor([1, 1])
    with torch.no_grad():
        assert torch.allclose(original(items, market), loaded.model(items, market))
    assert not list(checkpoint_dir.parent.glob(".bb.tmp-*"))  # nothing left of the atomic write


def test_saving_again_replaces_the_checkpoint_atomically(checkpoint_dir: Path) -> None:
    model = _model()
    with torch.no_grad():
        model.item_emb.weight.add_(1.0)
    manifest = Manifest(kind="market", model_config=model.config, markets=["aa", "bb"],
                        market="bb")
    save_checkpoint(checkpoint_dir, model, Vocab(ITEM_IDS), manifest, {ITEM_IDS[0]: 1})
    loaded = load_checkpoint(checkpoint_dir)
    assert torch.equal(loaded.model.item_emb.weight, model.item_emb.weight)
    assert sorted(p.name for p in checkpoint_dir.parent.iterdir()) == ["bb"]


def test_flipped_byte_in_weights_is_refused(checkpoint_dir: Path) -> None:
    weights = checkpoint_dir / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(weights)):
        load_checkpoint(checkpoint_dir)


def test_truncated_weights_are_refused_even_with_a_matching_hash(checkpoint_dir: Path) -> None:
    weights = checkpoint_dir / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(checkpoint_dir)
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    manifest["weights_sha256"] = file_sha256(weights)  # a forger fixing the hash
    (checkpoint_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(checkpoint_dir)


def test_bad_json_manifest_is_refused(checkpoint_dir: Path) -> None:
    (checkpoint_dir / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{checkpoint_dir / MANIFEST}.*not valid JSON"):
        load_checkpoint(checkpoint_dir)


def test_unknown_schema_version_is_refused(checkpoint_dir: Path) -> None:
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (checkpoint_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        load_checkpoint(checkpoint_dir)


def test_items_json_length_mismatch_is_refused(checkpoint_dir: Path) -> None:
    (checkpoint_dir / ITEMS).write_text(json.dumps(ITEM_IDS[:-1]))
    with pytest.raises(CheckpointError, match=f"{checkpoint_dir / ITEMS}.*11 items"):
        load_checkpoint(checkpoint_dir)


def test_model_config_that_does_not_fit_the_weights_is_refused(checkpoint_dir: Path) -> None:
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    manifest["model_config"]["d_ff"] = 64
    (checkpoint_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(checkpoint_dir)


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        load_checkpoint(tmp_path / "nothing")
