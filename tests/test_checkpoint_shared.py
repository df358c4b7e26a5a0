"""Market checkpoints sharing the global item table (schema 2): what they store, the model they
load back, the vectors computed without torch, and refusal of a missing or replaced parent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from training.checkpoint import (
    ITEMS,
    MANIFEST,
    SOLD,
    WEIGHTS,
    CheckpointError,
    Manifest,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from training.item_table import CHANGED_ROWS, ITEM_TABLE
from training.model import Bert4XMR, ModelConfig
from training.vocab import Vocab

ITEM_IDS = [f"I{n:03d}" for n in range(20)]
MARKETS = ["aa", "bb"]
SOLD_IDS = {ITEM_IDS[4]: 9, ITEM_IDS[0]: 3, ITEM_IDS[7]: 1}  # most popular first


def _global(**options: object) -> Bert4XMR:
    torch.manual_seed(0)
    config = ModelConfig(n_rows=len(ITEM_IDS) + 1, n_markets=len(MARKETS), d_model=16,
                         n_layers=1, n_heads=2, d_ff=32, **options)  # type: ignore[arg-type]
    model = Bert4XMR(config).eval()
    with torch.no_grad():  # norms away from their init, so the vectors test sees them
        model.input_norm.weight.add_(torch.randn(16) * 0.1)
        model.input_norm.bias.add_(torch.randn(16) * 0.1)
    return model


def _write(root: Path, change_rows: list[int], **options: object) -> tuple[Bert4XMR, Bert4XMR]:
    """A global checkpoint and market bb fine-tuned from it: `change_rows` moved, the encoder
    and the market embedding too."""
    parent = _global(**options)
    vocab = Vocab(ITEM_IDS)
    saved = save_checkpoint(root / "global", parent, vocab,
                            Manifest(kind="global", model_config=parent.config, markets=MARKETS))
    market = _global(**options)
    with torch.no_grad():
        market.item_emb.weight[change_rows] += 0.5
        market.market_emb.weight.add_(0.25)
        for p in market.encoder.parameters():
            p.add_(0.01)
    manifest = Manifest(kind="market", model_config=market.config, markets=MARKETS, market="bb",
                        parent={"path": "../../global", "weights_sha256": saved.weights_sha256})
    save_checkpoint(root / "markets" / "bb", market, vocab, manifest, SOLD_IDS)
    return parent, market


def test_market_stores_only_its_changed_sold_rows_and_no_table(tmp_path: Path) -> None:
    sold_rows = [5, 1, 8]  # rows of SOLD_IDS
    _write(tmp_path, change_rows=[5, 8, 12])  # row 12 is not sold: its change is not kept
    market_dir = tmp_path / "markets" / "bb"
    with safe_open(str(market_dir / WEIGHTS), framework="numpy") as f:
        assert ITEM_TABLE not in f.keys()  # noqa: SIM118
        np.testing.assert_array_equal(f.get_tensor(CHANGED_ROWS), [5, 8])
    assert not (market_dir / ITEMS).exists()
    assert json.loads((market_dir / MANIFEST).read_text())["schema_version"] == 2
    with safe_open(str(market_dir / SOLD), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("rows"), sold_rows)
        np.testing.assert_array_equal(f.get_tensor("counts"), [9, 3, 1])
    # the market's weights are its encoder and embeddings: far below the table's size
    assert (market_dir / WEIGHTS).stat().st_size < (tmp_path / "global" / WEIGHTS).stat().st_size


def test_loaded_market_model_is_the_fine_tuned_one_on_sold_rows(tmp_path: Path) -> None:
    parent, market = _write(tmp_path, change_rows=[5, 8, 12])
    loaded = load_checkpoint(tmp_path / "markets" / "bb")
    assert loaded.vocab.item_ids == ITEM_IDS and loaded.market_items == SOLD_IDS
    state, want = loaded.model.state_dict(), market.state_dict()
    for name, tensor in want.items():
        if name != ITEM_TABLE:
            assert torch.equal(tensor, state[name]), name
    table = state[ITEM_TABLE]
    assert torch.equal(table[[5, 8]], want[ITEM_TABLE][[5, 8]])  # sold and changed: the market's
    assert torch.equal(table[12], parent.item_emb.weight[12])  # unsold: the parent's row
    sessions = torch.tensor([[5, 1, 8], [1, 0, 0]])
    markets = torch.tensor([1, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode(sessions, markets),
                                   market.encode(sessions, markets))


@pytest.mark.parametrize("options", [
    {}, {"market_placement": "input"}, {"market_placement": "output"},
    {"output_projection": True},
])
def test_market_item_vectors_without_torch_equal_the_models(tmp_path: Path,
                                                            options: dict[str, object]) -> None:
    parent, market = _write(tmp_path, change_rows=[5, 8, 12], **options)
    info = read_checkpoint_info(tmp_path / "markets" / "bb")
    assert info.items is not None
    rows = np.array([5, 1, 8, 3])  # changed and sold, sold, and an unchanged unsold row
    with torch.no_grad():
        want = market.item_vectors(1)[torch.from_numpy(rows)].numpy()
    np.testing.assert_allclose(info.items.vectors(rows), want, rtol=1e-5, atol=1e-5)
    embedded = info.items.embeddings(np.array([[5, 0], [12, 1]]))  # (2, 2, D)
    assert embedded.shape == (2, 2, 16)
    np.testing.assert_array_equal(embedded[0, 0], market.item_emb.weight[5].detach().numpy())
    # row 12 changed but is not sold: the parent's row, by design
    np.testing.assert_array_equal(embedded[1, 0], parent.item_emb.weight[12].detach().numpy())
    np.testing.assert_array_equal(embedded[0, 1], np.zeros(16, np.float32))  # padding


def test_markets_of_one_server_share_one_item_table(tmp_path: Path) -> None:
    _write(tmp_path, change_rows=[])
    tables: dict = {}
    first = read_checkpoint_info(tmp_path / "markets" / "bb", tables)
    again = read_checkpoint_info(tmp_path / "markets" / "bb", tables)
    assert first.table is again.table and len(tables) == 1
    assert isinstance(first.table.rows, np.memmap)  # mapped from the global weights, not copied
    assert first.items is not None and len(first.items.changed_rows) == 0


def test_missing_parent_is_refused_naming_it(tmp_path: Path) -> None:
    _write(tmp_path, change_rows=[5])
    (tmp_path / "global" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"shares the item table of .*global, which is "
                                              r"missing"):
        read_checkpoint_info(tmp_path / "markets" / "bb")


def test_retrained_parent_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, change_rows=[5])
    other = _global()
    with torch.no_grad():
        other.item_emb.weight.add_(1.0)
    save_checkpoint(tmp_path / "global", other, Vocab(ITEM_IDS),
                    Manifest(kind="global", model_config=other.config, markets=MARKETS))
    with pytest.raises(CheckpointError, match="retrained without its markets"):
        load_checkpoint(tmp_path / "markets" / "bb")


def test_full_copy_is_written_on_request_in_the_previous_layout(tmp_path: Path) -> None:
    parent, _ = _write(tmp_path, change_rows=[5])
    manifest = Manifest(kind="market", model_config=parent.config, markets=MARKETS, market="aa",
                        parent={"path": "../../global", "weights_sha256": "unused"})
    save_checkpoint(tmp_path / "markets" / "aa", parent, Vocab(ITEM_IDS), manifest, SOLD_IDS,
                    share_items=False)
    market_dir = tmp_path / "markets" / "aa"
    assert json.loads((market_dir / MANIFEST).read_text())["schema_version"] == 1
    assert (market_dir / ITEMS).is_file() and (market_dir / "market_items.json").is_file()
    loaded = load_checkpoint(market_dir)  # its own table: the parent is not read
    assert torch.equal(loaded.model.item_emb.weight, parent.item_emb.weight)


def test_tampered_sold_items_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, change_rows=[])
    from safetensors.numpy import save_file

    sold = tmp_path / "markets" / "bb" / SOLD
    save_file({"rows": np.array([5, 99], np.int32), "counts": np.array([1, 1], np.int32)},
              str(sold))
    with pytest.raises(CheckpointError, match=r"market_items.safetensors: rows must be distinct "
                                              r"items 1\.\.20"):
        read_checkpoint_info(tmp_path / "markets" / "bb")


def test_ranker_keeps_small_markets_vectors_dense_and_computes_large_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from service import bundle
    from training.item_table import SoldVectors

    _write(tmp_path, change_rows=[5])
    info = read_checkpoint_info(tmp_path / "markets" / "bb")
    assert info.items is not None
    rows = np.array([1, 5, 8, 3])
    index = SimpleNamespace(vectors=SoldVectors(info.items, rows))
    dense = bundle.ranker_vectors(index)  # 4 x 16 floats: well under the limit
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, info.items.vectors(rows))
    monkeypatch.setattr(bundle, "RANKER_DENSE_BYTES", 4 * 16 * 4 - 1)  # one byte short
    assert bundle.ranker_vectors(index) is index.vectors
