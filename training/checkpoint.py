"""The checkpoint contract between training and the service: write atomically, read with checks.

A checkpoint is a directory holding `weights.safetensors` (tensors only: nothing is unpickled)
and `manifest.json` (schema version, model config, markets, market, parent, data fingerprint,
metrics, creation time, the weights' sha256). Two layouts, told apart by the schema version:

- schema 1, a checkpoint with its own item table: the global one, and a market checkpoint
  written without a parent. `items.json` (row -> item id); a market's `market_items.json`
  (the items sold there, with their interaction counts).
- schema 2, a market checkpoint sharing its parent's item table (what `xmr train` writes): its
  weights hold every tensor but the item embedding, plus the rows of items it sells that its
  fine-tune changed (`training.item_table`); `market_items.safetensors` holds the sold rows and
  counts. The vocabulary and every other row are the parent's, whose weights' sha256 the
  manifest's `parent` names: a missing or replaced parent is refused.

`read_checkpoint_info` checks all of it but the weights' contents without torch (serving from the
exported encoder and the FAISS index needs no more); `load_checkpoint` adds the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from training.item_table import (
    CHANGED,
    CHANGED_ROWS,
    ITEM_TABLE,
    ItemTable,
    MarketItems,
    OutputSide,
    TableError,
    mapped_tensors,
)
from training.vocab import Vocab

if TYPE_CHECKING:  # torch and the model are imported where weights are read or written
    import torch

    from training.model import Bert4XMR, ModelConfig

OWN_TABLE = 1  # schema: the checkpoint holds its item table
SHARED_TABLE = 2  # schema: a market checkpoint using its parent's item table
SCHEMA_VERSION = SHARED_TABLE  # the newest this reader knows
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
ITEMS = "items.json"
MARKET_ITEMS = "market_items.json"  # schema 1
SOLD = "market_items.safetensors"  # schema 2: "rows" and "counts", int32, most popular first
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the model uses

Tables = dict[Path, ItemTable]  # item tables already read, by checkpoint directory


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or inconsistent; the message names its path."""


@dataclass
class Manifest:
    kind: str  # "global" or "market"
    model_config: ModelConfig
    markets: list[str]  # market code -> market embedding row (its position)
    market: str | None = None
    parent: dict[str, str] | None = None  # path (relative to this one) and weights_sha256
    data_fingerprint: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    weights_sha256: str = ""
    schema_version: int = OWN_TABLE

    @property
    def version(self) -> str:
        """A short id of these weights, reported by the service as `model_version`."""
        return self.weights_sha256[:12]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "market": self.market,
            "markets": self.markets,
            "model_config": self.model_config.to_dict(),
            "parent": self.parent,
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
            "train_config": self.train_config,
            "created_at": self.created_at,
            "weights_sha256": self.weights_sha256,
        }


@dataclass(frozen=True)
class CheckpointInfo:
    """A checked checkpoint without its model: what serving from the exported encoder and the
    FAISS index reads. Only the model config fields that serving uses are kept."""

    path: Path
    kind: str
    market: str | None
    markets: list[str]
    weights_sha256: str
    max_len: int
    d_model: int
    table: ItemTable  # its own, or (schema 2) the parent's
    items: MarketItems | None  # a market's sold items and item vectors; None: global

    @property
    def version(self) -> str:
        """The same short id as `Manifest.version`."""
        return self.weights_sha256[:12]

    @property
    def vocab(self) -> Vocab:
        return self.table.vocab

    @property
    def market_items(self) -> dict[str, int] | None:
        """Item id -> interactions in the market, most popular first (built on each call)."""
        return None if self.items is None else _sold_dict(self.items, self.vocab)

    @property
    def market_row(self) -> int:
        if self.market is None:
            raise CheckpointError(f"{self.path}: a global checkpoint has no market")
        return self.markets.index(self.market)


@dataclass
class Checkpoint:
    path: Path
    manifest: Manifest
    model: Bert4XMR
    info: CheckpointInfo  # the same checkpoint as `read_checkpoint_info` reads it

    @property
    def vocab(self) -> Vocab:
        return self.info.vocab

    @property
    def market_items(self) -> dict[str, int] | None:
        return self.info.market_items

    @property
    def market_row(self) -> int:
        return self.info.market_row


def _sold_dict(items: MarketItems, vocab: Vocab) -> dict[str, int]:
    return {vocab.item_id(row): count
            for row, count in zip(items.sold.tolist(), items.counts.tolist(), strict=True)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a fully written `tmp` directory into place at `target`, replacing what was there."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def parent_dir(path: Path, parent: dict[str, str]) -> Path:
    """The parent checkpoint's directory, `parent["path"]` taken relative to `path`."""
    return Path(os.path.normpath(path / parent["path"]))


def save_checkpoint(
    path: Path,
    model: Bert4XMR,
    vocab: Vocab,
    manifest: Manifest,
    market_items: dict[str, int] | None = None,
    keep: tuple[str, ...] = (),
    share_items: bool = True,
) -> Manifest:
    """Write a checkpoint directory atomically (temporary directory, then rename).

    A market checkpoint with a `parent` is written sharing the parent's item table (schema 2):
    of the item embedding only the rows of `market_items` that differ from the parent's are
    kept. `share_items=False`, or no parent, writes the whole table (schema 1). `keep` names
    files of an existing checkpoint at `path` to carry over (none by default: an index built
    for older weights must not survive a retrain).
    """
    from safetensors.torch import save_file

    if manifest.kind == "market" and (manifest.market is None or market_items is None):
        raise ValueError("a market checkpoint needs its market and its market items")
    shared = manifest.kind == "market" and manifest.parent is not None and share_items
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if shared:
            assert manifest.parent is not None and market_items is not None
            sold = np.asarray(vocab.indices(market_items), dtype=np.int64)  # (S,)
            table = _parent_table(path, manifest.parent, {})
            if table.vocab.item_ids != vocab.item_ids:
                raise CheckpointError(f"{table.path / ITEMS}: another vocabulary than the "
                                      f"market checkpoint {path} is written with")
            state.update(_changed_rows(state.pop(ITEM_TABLE), table, sold))
            save_file(state, str(tmp / WEIGHTS))
            counts = np.asarray(list(market_items.values()), dtype=np.int64)
            _save_sold(tmp / SOLD, sold, counts)
            manifest.schema_version = SHARED_TABLE
        else:
            save_file(state, str(tmp / WEIGHTS))
            _write_json(tmp / ITEMS, vocab.item_ids)
            if market_items is not None:
                _write_json(tmp / MARKET_ITEMS, market_items)
            manifest.schema_version = OWN_TABLE
        manifest.weights_sha256 = file_sha256(tmp / WEIGHTS)
        manifest.created_at = manifest.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        _write_json(tmp / MANIFEST, manifest.to_json())
        for name in keep:
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _changed_rows(weight: torch.Tensor, table: ItemTable, sold: np.ndarray
                  ) -> dict[str, torch.Tensor]:
    """The sold rows of `weight` (n_rows, D) that differ from the shared table, sorted."""
    import torch

    rows = np.sort(sold)
    mine = weight[torch.from_numpy(rows)]  # (S, D)
    theirs = torch.from_numpy(np.ascontiguousarray(table.rows[rows]))  # (S, D)
    differs = (mine != theirs).any(dim=1).numpy()
    return {CHANGED_ROWS: torch.from_numpy(rows[differs]).contiguous(),
            CHANGED: mine[torch.from_numpy(differs)].contiguous()}


def _save_sold(path: Path, rows: np.ndarray, counts: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({"rows": rows.astype(np.int32), "counts": counts.astype(np.int32)}, str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _read_manifest_json(path: Path) -> dict[str, Any]:
    data = _read_json(path / MANIFEST)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / MANIFEST}: expected a JSON object")
    version = data.get("schema_version")
    if version not in (OWN_TABLE, SHARED_TABLE):
        raise CheckpointError(
            f"{path / MANIFEST}: schema_version {version!r}, "
            f"this reader knows {OWN_TABLE} and {SHARED_TABLE}"
        )
    if version == SHARED_TABLE and (data.get("kind") != "market"
                                    or not isinstance(data.get("parent"), dict)):
        raise CheckpointError(f"{path / MANIFEST}: schema_version 2 is a market checkpoint "
                              "with the parent whose item table it shares")
    return data


def _check_manifest(path: Path, kind: object, market: object, markets: list[str],
                    n_markets: object) -> None:
    if kind not in ("global", "market"):
        raise CheckpointError(f"{path / MANIFEST}: kind must be 'global' or 'market'")
    if kind == "market" and market not in markets:
        raise CheckpointError(f"{path / MANIFEST}: market {market!r} not in {markets}")
    if n_markets != len(markets):
        raise CheckpointError(f"{path / MANIFEST}: n_markets does not match the market list")


def read_manifest(path: Path) -> Manifest:
    from training.model import ModelConfig

    data = _read_manifest_json(path)
    try:
        manifest = Manifest(
            kind=data["kind"],
            model_config=ModelConfig.from_dict(data["model_config"]),
            markets=list(data["markets"]),
            market=data.get("market"),
            parent=data.get("parent"),
            data_fingerprint=data.get("data_fingerprint", ""),
            metrics=dict(data.get("metrics") or {}),
            train_config=dict(data.get("train_config") or {}),
            created_at=data.get("created_at", ""),
            weights_sha256=data["weights_sha256"],
            schema_version=data["schema_version"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: invalid manifest ({e!r})") from e
    _check_manifest(path, manifest.kind, manifest.market, manifest.markets,
                    manifest.model_config.n_markets)
    return manifest


def read_checkpoint_info(path: Path, tables: Tables | None = None) -> CheckpointInfo:
    """Read and validate a checkpoint but for its weights' contents (their sha256 is checked),
    without torch: of the model config only the fields serving uses are read. A schema-2
    market's item table is its parent's, taken from `tables` where read already (one copy for
    every market of a server) and added to it. Any inconsistency raises CheckpointError naming
    the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory")
    data = _read_manifest_json(path)
    try:
        config = data["model_config"]
        fields = (data["kind"], data.get("market"), list(data["markets"]),
                  str(data["weights_sha256"]), int(config["max_len"]), int(config["d_model"]),
                  int(config["n_rows"]), config["n_markets"],
                  str(config.get("market_placement", "both")))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: invalid manifest ({e!r})") from e
    kind, market, markets, weights_sha256, max_len, d_model, n_rows, n_markets, placement = fields
    _check_manifest(path, kind, market, markets, n_markets)
    _check_weights(path, weights_sha256)
    tensors = _mapped(path / WEIGHTS)
    if data["schema_version"] == SHARED_TABLE:
        table = _parent_table(path, data["parent"], {} if tables is None else tables)
    else:
        table = ItemTable(path, weights_sha256, _read_vocab(path), _tensor(path, tensors,
                                                                          ITEM_TABLE))
    if table.vocab.n_rows != n_rows:
        raise CheckpointError(f"{table.path / ITEMS}: {len(table.vocab)} items but the model "
                              f"of {path} has {n_rows - 1}")
    if table.rows.shape != (n_rows, d_model):
        raise CheckpointError(f"{table.path / WEIGHTS}: item table {tuple(table.rows.shape)}, "
                              f"but the model of {path} has ({n_rows}, {d_model})")
    items = None
    if kind == "market":
        sold, counts = (_read_sold(path, n_rows) if data["schema_version"] == SHARED_TABLE
                        else _read_sold_json(path, table.vocab))
        items = MarketItems(table, sold, counts, *_changed(path, tensors, n_rows, d_model),
                            _output_side(path, tensors, markets.index(market), placement))
    return CheckpointInfo(path, kind, market, markets, weights_sha256, max_len, d_model, table,
                          items)


def _mapped(weights: Path) -> dict[str, np.ndarray]:
    try:
        return mapped_tensors(weights)
    except TableError as e:
        raise CheckpointError(f"unreadable weights: {e}") from e


def _tensor(path: Path, tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return tensors[name]
    except KeyError:
        raise CheckpointError(f"{path / WEIGHTS}: no tensor {name}") from None


def read_item_table(path: Path) -> ItemTable:
    """A schema-1 checkpoint's item table, memory-mapped, with its vocabulary (sha256 checked)."""
    data = _read_manifest_json(path)
    if data["schema_version"] != OWN_TABLE:
        raise CheckpointError(f"{path}: a market checkpoint sharing its parent's item table "
                              "holds none to share")
    sha = str(data.get("weights_sha256", ""))
    _check_weights(path, sha)
    return ItemTable(path, sha, _read_vocab(path), _tensor(path, _mapped(path / WEIGHTS),
                                                           ITEM_TABLE))


def _parent_table(path: Path, parent: dict[str, str], tables: Tables) -> ItemTable:
    """The item table of `path`'s parent, read once per `tables`, its sha256 the one named."""
    try:
        where, expected = parent_dir(path, parent), str(parent["weights_sha256"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: parent needs a path and a weights_sha256 "
                              f"({e!r})") from e
    if not (where / MANIFEST).is_file():
        raise CheckpointError(f"{path}: shares the item table of {where}, which is missing "
                              "(publish the market checkpoints with their global checkpoint)")
    key = where.resolve()
    if key not in tables:
        tables[key] = read_item_table(where)
    table = tables[key]
    if table.weights_sha256 != expected:
        raise CheckpointError(
            f"{path}: shares the item table of {where} with weights {expected[:12]}, but "
            f"{where / WEIGHTS} is {table.weights_sha256[:12]} (a global checkpoint retrained "
            "without its markets?)"
        )
    return table


def _read_vocab(path: Path) -> Vocab:
    item_ids = _read_json(path / ITEMS)
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
        raise CheckpointError(f"{path / ITEMS}: expected a list of item id strings")
    try:
        return Vocab(item_ids)
    except ValueError as e:
        raise CheckpointError(f"{path / ITEMS}: {e}") from e


def _read_sold_json(path: Path, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    market_items = _read_json(path / MARKET_ITEMS)
    if not isinstance(market_items, dict) or not market_items:
        raise CheckpointError(f"{path / MARKET_ITEMS}: expected a non-empty object")
    unknown = [i for i in market_items if i not in vocab]
    if unknown:
        raise CheckpointError(f"{path / MARKET_ITEMS}: items not in items.json: {unknown[:5]}")
    if not all(isinstance(c, int) and c >= 0 for c in market_items.values()):
        raise CheckpointError(f"{path / MARKET_ITEMS}: counts must be integers >= 0")
    return (np.asarray(vocab.indices(market_items), dtype=np.int64),
            np.asarray(list(market_items.values()), dtype=np.int32))


def _read_sold(path: Path, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    file = path / SOLD
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="numpy") as f:
            rows = f.get_tensor("rows").astype(np.int64)
            counts = f.get_tensor("counts").astype(np.int32)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable sold items, tensors rows and counts ({e})"
                              ) from e
    if rows.ndim != 1 or rows.shape != counts.shape or not len(rows):
        raise CheckpointError(f"{file}: expected non-empty rows and counts of one length")
    if rows.min() < 1 or rows.max() >= n_rows or len(np.unique(rows)) != len(rows):
        raise CheckpointError(f"{file}: rows must be distinct items 1..{n_rows - 1}")
    if counts.min() < 0:
        raise CheckpointError(f"{file}: counts must be >= 0")
    return rows, counts


def _changed(path: Path, tensors: dict[str, np.ndarray], n_rows: int, d_model: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """A schema-2 market's changed rows (sorted) and their values; none for schema 1."""
    if CHANGED_ROWS not in tensors:
        return np.zeros(0, dtype=np.int64), np.zeros((0, d_model), dtype=np.float32)
    rows = np.asarray(tensors[CHANGED_ROWS], dtype=np.int64)
    values = _tensor(path, tensors, CHANGED)
    if (rows.ndim != 1 or values.shape != (len(rows), d_model)
            or (len(rows) and (rows[0] < 1 or rows[-1] >= n_rows or (np.diff(rows) <= 0).any()))):
        raise CheckpointError(f"{path / WEIGHTS}: {CHANGED_ROWS} must be sorted distinct item "
                              f"rows with one {d_model}-wide row each in {CHANGED}")
    return rows, values


def _output_side(path: Path, tensors: dict[str, np.ndarray], market_row: int,
                 placement: str) -> OutputSide:
    market = np.asarray(_tensor(path, tensors, "market_emb.weight")[market_row], np.float32)
    zero = np.zeros_like(market)
    projection = tensors.get("output_proj.weight")
    return OutputSide(
        input_shift=market if placement in ("both", "input") else zero,
        output_shift=market if placement in ("both", "output") else zero,
        norm_weight=np.asarray(_tensor(path, tensors, "input_norm.weight"), np.float32),
        norm_bias=np.asarray(_tensor(path, tensors, "input_norm.bias"), np.float32),
        eps=LAYER_NORM_EPS,
        projection=None if projection is None else np.asarray(projection, np.float32),
    )


def _check_weights(path: Path, weights_sha256: str) -> None:
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    actual = file_sha256(weights)
    if actual != weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:12]} does not match the manifest's "
            f"{weights_sha256[:12]} (corrupt or replaced weights)"
        )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    tables: Tables | None = None) -> Checkpoint:
    """Read and validate a checkpoint; any inconsistency raises CheckpointError naming the path.
    A schema-2 market's model gets its parent's item table with its own changed rows."""
    import torch
    from safetensors.torch import load_file

    from training.model import Bert4XMR

    path = Path(path)
    info = read_checkpoint_info(path, tables)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable weights ({e})") from e
    if manifest.schema_version == SHARED_TABLE:
        assert info.items is not None
        state.pop(CHANGED_ROWS, None)
        state.pop(CHANGED, None)
        table = torch.from_numpy(np.array(info.table.rows))  # (n_rows, D), a writable copy
        rows = torch.from_numpy(np.array(info.items.changed_rows))  # copies: the map is read-only
        table[rows] = torch.from_numpy(np.array(info.items.changed))
        state[ITEM_TABLE] = table
    model = Bert4XMR(manifest.model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit the manifest's model ({e})") from e
    model.to(map_location).eval()
    return Checkpoint(path, manifest, model, info)
