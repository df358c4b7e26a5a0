"""The item table that markets share, read without torch: the item embedding of a checkpoint's
weights as a read-only memory map (`ItemTable`, one per server whatever the number of markets),
and a market's view of it (`MarketItems`): its sold items, the rows its fine-tune changed, and
the market-shifted item vectors v_m(i) of any rows, computed on demand in numpy.

A market checkpoint of schema 2 stores no item table (`training.checkpoint`): only the rows of
items it sells that its fine-tune changed. Items a market does not sell never appear in its
sessions' training data nor in its results, so every other row is the parent's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.vocab import Vocab

ITEM_TABLE = "item_emb.weight"  # the tensor of the item embedding in every checkpoint
CHANGED_ROWS = "item_emb.changed_rows"  # schema-2 market: (C,) int64 rows it changed, sorted
CHANGED = "item_emb.changed"  # schema-2 market: (C, D) float32 their values
MAX_HEADER = 100_000_000  # bytes; safetensors' own readers refuse larger headers too
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "F16": np.float16, "BF16": None, "BOOL": np.bool_}


class TableError(ValueError):
    """A weights file whose tensors cannot be mapped; the message names the file."""


def mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy memory map (no copy, no torch):
    pages are read when touched and shared by every process that maps the same file."""
    try:
        total = path.stat().st_size
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > min(total - 8, MAX_HEADER):
                raise TableError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
        start = 8 + size
        out: dict[str, np.ndarray] = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(spec["dtype"])
            if dtype is None:
                raise TableError(f"{path}: tensor {name} has dtype {spec['dtype']}, not mappable")
            begin, end = spec["data_offsets"]
            shape = tuple(int(s) for s in spec["shape"])
            if start + end > total or end - begin != np.dtype(dtype).itemsize * int(
                    np.prod(shape, dtype=np.int64)):
                raise TableError(f"{path}: tensor {name} runs past the file or its shape")
            if end == begin:
                out[name] = np.zeros(shape, dtype=dtype)
                continue
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        return out
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError,
            TypeError, ValueError) as e:
        if isinstance(e, TableError):
            raise
        raise TableError(f"{path}: unreadable safetensors header ({e!r})") from e


@dataclass(frozen=True)
class ItemTable:
    """A checkpoint's item embedding (n_rows, D), memory-mapped, with its vocabulary."""

    path: Path  # the checkpoint directory whose weights hold it
    weights_sha256: str
    vocab: Vocab
    rows: np.ndarray  # (n_rows, D) float32, read-only; row 0 is padding

    @property
    def d_model(self) -> int:
        return int(self.rows.shape[1])


@dataclass(frozen=True)
class OutputSide:
    """What turns an item embedding into v_m(i) in one market: LayerNorm(E + shift) [W^T].
    Every array float32 (`training.checkpoint` reads them so), as `MarketItems.vectors` uses
    them on its float32 rows without a copy."""

    input_shift: np.ndarray  # (D,) the market embedding where the input side has it, else 0
    output_shift: np.ndarray  # (D,) the same for the output side
    norm_weight: np.ndarray  # (D,)
    norm_bias: np.ndarray  # (D,)
    eps: float
    projection: np.ndarray | None  # (D, D) the output projection W, or None


@dataclass(frozen=True)
class MarketItems:
    """A market's items over a shared `ItemTable`: the items sold (most popular first), the rows
    its fine-tune changed, and its item vectors v_m(i) for any rows."""

    table: ItemTable
    sold: np.ndarray  # (S,) int64 item rows, most popular first
    counts: np.ndarray  # (S,) int32 training interactions of each
    changed_rows: np.ndarray  # (C,) int64, sorted: rows whose embedding differs from `table`
    changed: np.ndarray  # (C, D) float32
    side: OutputSide

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        """The market's item embedding rows (..., D) for item rows of any shape (PAD included)."""
        out = self.table.rows[rows]  # fancy indexing copies: the map stays read-only
        if len(self.changed_rows):
            at = np.searchsorted(self.changed_rows, rows)
            at = np.minimum(at, len(self.changed_rows) - 1)
            hit = self.changed_rows[at] == rows
            out[hit] = self.changed[at[hit]]
        return out

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """v_m(i) of the given rows, (N, D) float32: the same function as
        `Bert4XMR.item_vectors`, without torch.

        In float32 and in place on the gathered copy, as torch's float32 LayerNorm computes it
        (within 1e-6 of a float64 pass, measured). A request's re-rank of a few hundred hits
        calls this: each float64 temporary of 600 x 128 is a fresh 600 KB allocation whose
        pages fault in, and that pass took 1.5 ms where this one takes 0.2 ms (rows warm; with
        the rows cold in a 1M-row map, a served re-rank's median went 377 -> 260 us)."""
        side = self.side
        x = self.embeddings(np.asarray(rows, dtype=np.int64))  # (N, D) float32, our copy
        x += side.output_shift
        x -= x.mean(axis=-1, keepdims=True)
        variance = np.einsum("nd,nd->n", x, x) / np.float32(x.shape[-1])  # (N,)
        x *= (1.0 / np.sqrt(variance + np.float32(side.eps)))[:, None]
        x *= side.norm_weight
        x += side.norm_bias
        if side.projection is not None:
            x = x @ side.projection.T
        return np.ascontiguousarray(x, dtype=np.float32)


class SoldVectors:
    """The vectors of a market's indexed items in index order, computed when indexed:
    `vectors[positions]` is (C, D) float32, as an array of them would give, without holding
    N x D floats per market."""

    def __init__(self, items: MarketItems, rows: np.ndarray) -> None:
        self.items = items
        self.rows = rows  # (N,) item rows in index order

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.items.table.d_model

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: np.ndarray | slice) -> np.ndarray:
        return self.items.vectors(self.rows[positions])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self.items.vectors(self.rows)
        return out if dtype is None else out.astype(dtype)
