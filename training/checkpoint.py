"""The checkpoint contract between training and the service: write atomically, read with checks.

A checkpoint is a directory holding `weights.safetensors` (tensors only: nothing is unpickled),
`manifest.json` (schema version, model config, markets, market, parent, data fingerprint,
metrics, creation time, the weights' sha256), `items.json` (row -> item id) and, for a market
checkpoint, `market_items.json` (the items sold there, with their interaction counts).

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

from safetensors import SafetensorError, safe_open

from training.vocab import Vocab

if TYPE_CHECKING:  # torch and the model are imported where weights are read or written
    import torch

    from training.model import Bert4XMR, ModelConfig

SCHEMA_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
ITEMS = "items.json"
MARKET_ITEMS = "market_items.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or inconsistent; the message names its path."""


@dataclass
class Manifest:
    kind: str  # "global" or "market"
    model_config: ModelConfig
    markets: list[str]  # market code -> market embedding row (its position)
    market: str | None = None
    parent: dict[str, str] | None = None
    data_fingerprint: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    weights_sha256: str = ""
    schema_version: int = SCHEMA_VERSION

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
    vocab: Vocab
    market_items: dict[str, int] | None  # item id -> interactions in the market

    @property
    def version(self) -> str:
        """The same short id as `Manifest.version`."""
        return self.weights_sha256[:12]

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
    vocab: Vocab
    market_items: dict[str, int] | None = None  # item id -> interactions in the market

    @property
    def info(self) -> CheckpointInfo:
        """This checkpoint as `read_checkpoint_info` reads it."""
        m = self.manifest
        return CheckpointInfo(self.path, m.kind, m.market, m.markets, m.weights_sha256,
                              m.model_config.max_len, m.model_config.d_model, self.vocab,
                              self.market_items)

    @property
    def market_row(self) -> int:
        if self.manifest.market is None:
            raise CheckpointError(f"{self.path}: a global checkpoint has no market")
        return self.manifest.markets.index(self.manifest.market)


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


def save_checkpoint(
    path: Path,
    model: Bert4XMR,
    vocab: Vocab,
    manifest: Manifest,
    market_items: dict[str, int] | None = None,
    keep: tuple[str, ...] = (),
) -> Manifest:
    """Write a checkpoint directory atomically (temporary directory, then rename).

    `keep` names files of an existing checkpoint at `path` to carry over (none by default:
    an index built for older weights must not survive a retrain).
    """
    from safetensors.torch import save_file

    if manifest.kind == "market" and (manifest.market is None or market_items is None):
        raise ValueError("a market checkpoint needs its market and its market items")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        manifest.weights_sha256 = file_sha256(tmp / WEIGHTS)
        manifest.created_at = manifest.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        _write_json(tmp / ITEMS, vocab.item_ids)
        if market_items is not None:
            _write_json(tmp / MARKET_ITEMS, market_items)
        _write_json(tmp / MANIFEST, manifest.to_json())
        for name in keep:
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path / MANIFEST}: schema_version {data.get('schema_version')!r}, "
            f"this reader knows {SCHEMA_VERSION}"
        )
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
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: invalid manifest ({e!r})") from e
    _check_manifest(path, manifest.kind, manifest.market, manifest.markets,
                    manifest.model_config.n_markets)
    return manifest


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Read and validate a checkpoint but for its weights' contents (their sha256 is checked),
    without torch: of the model config only the fields serving uses are read. Any inconsistency
    raises CheckpointError naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory")
    data = _read_manifest_json(path)
    try:
        config = data["model_config"]
        fields = (data["kind"], data.get("market"), list(data["markets"]),
                  str(data["weights_sha256"]), int(config["max_len"]), int(config["d_model"]),
                  int(config["n_rows"]), config["n_markets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: invalid manifest ({e!r})") from e
    kind, market, markets, weights_sha256, max_len, d_model, n_rows, n_markets = fields
    _check_manifest(path, kind, market, markets, n_markets)
    _check_weights(path, weights_sha256)
    try:  # the safetensors header and the file's extent, as numpy would read them
        with safe_open(str(path / WEIGHTS), framework="numpy") as weights:
            weights.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable weights ({e})") from e
    vocab, market_items = _read_items(path, kind, n_rows)
    return CheckpointInfo(path, kind, market, markets, weights_sha256, max_len, d_model, vocab,
                          market_items)


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


def _read_items(path: Path, kind: str, n_rows: int) -> tuple[Vocab, dict[str, int] | None]:
    item_ids = _read_json(path / ITEMS)
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
        raise CheckpointError(f"{path / ITEMS}: expected a list of item id strings")
    try:
        vocab = Vocab(item_ids)
    except ValueError as e:
        raise CheckpointError(f"{path / ITEMS}: {e}") from e
    if vocab.n_rows != n_rows:
        raise CheckpointError(f"{path / ITEMS}: {len(vocab)} items but the model has {n_rows - 1}")
    market_items = None
    if kind == "market":
        market_items = _read_json(path / MARKET_ITEMS)
        if not isinstance(market_items, dict) or not market_items:
            raise CheckpointError(f"{path / MARKET_ITEMS}: expected a non-empty object")
        unknown = [i for i in market_items if i not in vocab]
        if unknown:
            raise CheckpointError(f"{path / MARKET_ITEMS}: items not in items.json: {unknown[:5]}")
    return vocab, market_items


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; any inconsistency raises CheckpointError naming the path."""
    from safetensors.torch import load_file

    from training.model import Bert4XMR

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory")
    manifest = read_manifest(path)
    _check_weights(path, manifest.weights_sha256)
    vocab, market_items = _read_items(path, manifest.kind, manifest.model_config.n_rows)
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable weights ({e})") from e
    model = Bert4XMR(manifest.model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit the manifest's model ({e})") from e
    model.to(map_location).eval()
    return Checkpoint(path, manifest, model, vocab, market_items)
