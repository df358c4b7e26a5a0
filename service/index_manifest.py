"""What a market's index is, without FAISS: the kinds, the options `xmr index build` builds
from (`IndexOptions`), and `index.json`, the manifest that records what was built
(`IndexManifest`), with the content-addressed files it names. `service.index` builds and loads
the FAISS files; this module is cheap to import (the CLI reads its defaults).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from service.errors import IndexLoadError

INDEX_MANIFEST = "index.json"
# 2: the exported encoder joined the index; 3: approximate kinds; 4: the encoder takes the item
# embedding rows as an input (the shared item table), where 2 and 3 held the table: refused
SCHEMA_VERSION = 4
READABLE_VERSIONS = (4,)
IndexKind = Literal["flat_ip", "ivf_ip", "hnsw_ip", "ivf_sq8", "ivf_pq4"]
INDEX_CHOICES = ("auto", "flat", "ivf", "hnsw", "ivf-sq8", "ivf-pq4")
# `auto` builds the exact index up to this many items: one query over 100K items x 64 took
# about 1 ms on one core here, over 1M items 15 ms (benchmarks/README.md, scale benchmark).
# Above it, `ivf_pq4`: 4-bit codes scanned by FAISS's fast scan, then an exact re-rank. At 1M
# items x 128 it reached recall@10 0.95 at about 1.5 ms where `ivf_sq8` needed 3.9-5.6 ms
# (benchmarks/README.md, "4-bit fast-scan codes at 1M"), with half of ivf_sq8's code bytes.
EXACT_MAX_ITEMS = 100_000
# Hits re-ranked exactly per result wanted: 8-bit codes order the hits almost as the exact
# vectors do; 4-bit codes much less so (1M items, 2048 lists, nprobe 384: recall@10 0.960,
# 0.966 and 0.968 re-ranking 16, 24 and 32 x k; 16 made the tuning take nprobe 512, search p50
# 3.2 ms against 1.7 ms at 24; benchmarks/README.md, "4-bit fast-scan codes at 1M").
REFINE = {"ivf_sq8": 4, "ivf_pq4": 24}
PQ4_CENTROIDS = 16  # ivf_pq4: a 4-bit code's values, k-means centroids per dimension
# Tried in order, steps of about 1.5x: at 1M items nprobe 64 gave recall@10 0.951 in 1.1 ms,
# 96 gave 0.974 in 1.4 ms and 128 0.986 in 2.2 ms (benchmarks/README.md, scale benchmark;
# width 64). 320: `ivf_pq4`'s 2048 lists at 1M items x 128 reach the floor there.
IVF_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384,
               512)  # <= nlist / 4
# Tuning aims this far above the floor on one half of the queries, so that the other half,
# which decides, does not miss the floor by the sampling noise of 500 queries (~0.01).
TUNE_MARGIN = 0.01
HNSW_EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class IndexOptions:
    """How `build_index` builds: the kind, the recall floor and the parameters it may tune."""

    kind: str = "auto"  # one of INDEX_CHOICES
    exact_max_items: int = EXACT_MAX_ITEMS  # auto: flat up to this many items, ivf_pq4 above
    # (hnsw where ivf cannot reach the floor, flat where neither can: service.index.build_index)
    min_recall: float = 0.95  # recall@10 against exact search that an approximate index needs
    recall_queries: int = 1000  # query vectors sampled for tuning (half) and checking (half)
    seed: int = 0
    nlist: int | None = None  # IVF lists; default `default_nlist`
    nprobe: int | None = None  # IVF lists searched; default the smallest meeting the floor
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 40
    ef_search: int | None = None  # HNSW; default the smallest meeting the floor
    refine: int | None = None  # ivf_sq8, ivf_pq4: hits re-ranked exactly per result wanted

    def __post_init__(self) -> None:
        if self.kind not in INDEX_CHOICES:
            raise ValueError(f"index kind {self.kind!r}: one of {', '.join(INDEX_CHOICES)}")
        if not 0.0 < self.min_recall <= 1.0:
            raise ValueError(f"min_recall {self.min_recall} must lie in (0, 1]")
        if self.recall_queries < 2:
            raise ValueError("recall_queries must be at least 2")
        if self.refine is not None and self.refine < 1:
            raise ValueError(f"refine {self.refine} must be at least 1")

    def fallbacks(self) -> list[str]:
        """The kinds `auto` builds, in turn, where the one before stays below the floor: hnsw,
        then the exact index, slower but never wrong (a market's failed index would fail a
        whole `xmr train`, which publishes all markets or none). Kinds asked for: none."""
        return ["hnsw", "flat"] if self.kind == "auto" else []

    def resolve(self, n_items: int) -> IndexKind:
        """The kind to build for a market of `n_items` items."""
        if self.kind == "auto":
            return "flat_ip" if n_items <= self.exact_max_items else "ivf_pq4"
        return _KINDS[self.kind]

    def refine_for(self, kind: IndexKind) -> int:
        """Hits re-ranked by their exact vectors per result wanted (1: none) for `kind`."""
        if kind not in REFINE:
            return 1
        return self.refine or REFINE[kind]


_KINDS: dict[str, IndexKind] = {"flat": "flat_ip", "ivf": "ivf_ip", "hnsw": "hnsw_ip",
                                "ivf-sq8": "ivf_sq8", "ivf-pq4": "ivf_pq4"}


class _SchemaVersion(BaseModel):
    schema_version: int


class IndexManifest(BaseModel):
    """`index.json`: which `index-<version>.faiss` serves the market, built from which weights."""

    schema_version: int = SCHEMA_VERSION
    kind: IndexKind = "flat_ip"
    # ivf_ip: nlist, nprobe; ivf_sq8 and ivf_pq4: nlist, nprobe, refine; hnsw_ip: m,
    # ef_construction, ef_search
    params: dict[str, int] = {}
    recall_at_10: float | None = None  # against exact search; None for the exact flat_ip
    recall_queries: int = 0  # query vectors that measured it (the check half)
    search_p50_ms: float | None = None  # one query, one thread, on the building machine
    build_seconds: float | None = None  # the FAISS index alone (and its tuning)
    market: str
    index_file: str
    version: str  # first 12 hex digits of the index file's sha256
    sha256: str
    encoder_file: str  # encoder-<12 hex>.onnx: the market's encoder (service.export)
    encoder_sha256: str
    weights_sha256: str
    model_version: str
    n_items: int
    dim: int
    built_at: str


def default_nlist(n_items: int, kind: IndexKind = "ivf_ip") -> int:
    """About sqrt(N) lists, a power of two: 1024 at a million items, where a list holds ~1,000
    vectors and k-means on 64 points per list trains in seconds; at most N/39 lists, the
    fewest points per list FAISS's k-means accepts without a warning. `ivf_pq4`: twice as
    many (at 1M items 2048 lists reached the floor in less time than 1024 or 4096)."""
    lists = math.sqrt(n_items) * (2 if kind == "ivf_pq4" else 1)
    nlist = 2 ** round(math.log2(max(1.0, lists)))
    return max(1, min(nlist, n_items // 39))


def read_index_manifest(market_dir: Path) -> IndexManifest:
    path = market_dir / INDEX_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: missing; run `xmr index build`") from None
    try:
        # The version first: an index of another version fails on its fields otherwise, and
        # the message would not say what to do.
        version = _SchemaVersion.model_validate_json(text).schema_version
        if version not in READABLE_VERSIONS:
            raise IndexLoadError(f"{path}: schema_version {version}, this reader knows "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild with "
                                 "`xmr index build`")
        return IndexManifest.model_validate_json(text)
    except ValidationError as e:
        raise IndexLoadError(f"{path}: invalid index manifest ({e.error_count()} errors: "
                             f"{e.errors()[0]['msg']})") from e




def _fsync_write(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_index_manifest(market_dir: Path, manifest: IndexManifest) -> None:
    """Replace `index.json` atomically (a temporary file, fsynced, then renamed)."""
    tmp = market_dir / f".{INDEX_MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _fsync_write(tmp, manifest.model_dump_json(indent=2) + "\n")
        os.replace(tmp, market_dir / INDEX_MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def write_addressed(market_dir: Path, prefix: str, suffix: str,
                    write: Callable[[Path], None]) -> tuple[str, str]:
    """Write through a temporary file to `<prefix>-<sha12><suffix>`; (file name, sha256)."""
    from training.checkpoint import file_sha256  # here: the module stays free of torch

    tmp = market_dir / f".{prefix}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        sha = file_sha256(tmp)
        name = f"{prefix}-{sha[:12]}{suffix}"
        os.replace(tmp, market_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, sha


def checked_file(market_dir: Path, field: str, name: str, sha256: str) -> Path:
    """A file named by index.json's `field`: in the market directory, present, not corrupt."""
    from training.checkpoint import file_sha256

    path = market_dir / name
    prefix = field.removesuffix("_file") + "-"
    if path.parent != market_dir or not path.name.startswith(prefix):
        raise IndexLoadError(f"{market_dir / INDEX_MANIFEST}: bad {field} {name!r}")
    if not path.is_file():
        raise IndexLoadError(f"{path}: missing (named by {INDEX_MANIFEST})")
    if file_sha256(path) != sha256:
        raise IndexLoadError(f"{path}: sha256 does not match {INDEX_MANIFEST} (corrupt file)")
    return path
