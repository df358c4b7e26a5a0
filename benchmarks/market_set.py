"""The scale benchmark's artifact sets of many markets (issue 12 part 3): one global checkpoint
and a checkpoint + index per market, written in a `layout`, measured on disk and served by one
server (benchmarks/README.md, scale benchmark, step 5).

Layouts:
- `full`: each market checkpoint carries the whole item table (schema 1, as before the shared
  table); with `--before-src` its indexes are built and served by that checkout's code;
- `shared`: each market shares the global item table and changed none of its rows (schema 2,
  what `xmr train` writes with `finetune.freeze_items`, and by default above 100K items);
- `shared-rows`: shared, but every sold row changed (schema 2, a fine-tune that trained the
  item table: what `xmr train` writes by default up to 100K items).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.index import build_index
from service.index_manifest import IndexOptions
from training.checkpoint import Manifest, Tables, save_checkpoint
from training.config import TrainConfig
from training.model import Bert4XMR, ModelConfig
from training.synthetic import MarketRows
from training.vocab import Vocab

LAYOUTS = ("full", "shared", "shared-rows")
ARTIFACTS_NOTE = ("not trained: a random-weight Bert4XMR (default shape) whose item embeddings "
                  "add a PureSVD direction of the synthetic data to their random init, written "
                  "by save_checkpoint")
# Norms of a trained model's embedding rows (XMarket, the default config since issue 10:
# d_model 128; seed 0, split full, market ca: item rows 0.23-0.59 by popularity, median 0.46,
# market rows 0.47-0.57; the random init gives items about 0.23). The d_model 64 model these
# benchmarks used before had item rows 0.26-0.42 and market rows 0.40-0.45 (0.3 and 0.43 here).
LEARNED_NORM = 0.4
MARKET_NORM = 0.53


def item_id(n: int, n_items: int) -> str:
    return f"I{n:0{max(5, len(str(n_items - 1)))}d}"  # as write_scale names them


def stand_in_model(users: np.ndarray, items: np.ndarray, n_items: int, n_markets: int,
                   seed: int = 0) -> Bert4XMR:
    """A Bert4XMR of the default shape (TrainConfig's): torch's random init, plus on each
    item row a unit direction of a rank-d_model PureSVD of the user-item matrix scaled to
    LEARNED_NORM, and market rows at MARKET_NORM (benchmarks/README.md says why)."""
    n_users = int(users.max()) + 1
    matrix = torch.sparse_coo_tensor(torch.from_numpy(np.stack([users, items])),
                                     torch.ones(len(items)), (n_users, n_items),
                                     check_invariants=False).coalesce()
    torch.manual_seed(seed)
    shape = TrainConfig().model_kwargs()
    _, singular, vectors = torch.svd_lowrank(matrix, q=shape["d_model"], niter=2)  # (N, D)
    direction = torch.nn.functional.normalize(vectors * singular, dim=1)  # (N, D)
    model = Bert4XMR(ModelConfig(n_rows=n_items + 1, n_markets=n_markets, **shape))
    with torch.no_grad():
        model.item_emb.weight[1:] += LEARNED_NORM * direction
        model.market_emb.weight.normal_(0.0, MARKET_NORM / model.config.d_model ** 0.5)
    return model.eval()


def sold_counts(rows: MarketRows, n_items: int) -> dict[str, int]:
    """The market's items (those in its rows) -> interactions, most popular first."""
    counts = np.bincount(rows.items, minlength=n_items)
    sold = np.flatnonzero(counts)
    order = sold[np.lexsort((sold, -counts[sold]))]
    return {item_id(int(n), n_items): int(counts[n]) for n in order}


def write_set(markets: list[MarketRows], n_items: int, out: Path, layout: str) -> float:
    """The global checkpoint and every market checkpoint under `out`; seconds taken."""
    started = time.perf_counter()
    model = stand_in_model(np.concatenate([r.users for r in markets]),
                           np.concatenate([r.items for r in markets]), n_items, len(markets))
    vocab = Vocab([item_id(n, n_items) for n in range(n_items)])  # row = item number + 1
    codes = [r.market for r in markets]
    base = {"model_config": model.config, "markets": codes,
            "train_config": {"note": ARTIFACTS_NOTE}}
    global_manifest = save_checkpoint(out / "global", model, vocab,
                                      Manifest(kind="global", **base))  # type: ignore[arg-type]
    parent = {"path": "../../global", "weights_sha256": global_manifest.weights_sha256}
    rng = np.random.default_rng(0)
    for rows in markets:
        sold = sold_counts(rows, n_items)
        market_model = model
        if layout == "shared-rows":  # every sold row moved, as a fine-tune of the table does
            market_model = copy.deepcopy(model)
            sold_rows = torch.from_numpy(np.asarray(vocab.indices(sold), dtype=np.int64))
            with torch.no_grad():
                market_model.item_emb.weight[sold_rows] += torch.from_numpy(
                    rng.normal(0, 1e-3, (len(sold_rows), model.config.d_model))
                    .astype(np.float32))
        manifest = Manifest(kind="market", market=rows.market, parent=parent,
                            **base)  # type: ignore[arg-type]
        save_checkpoint(out / "markets" / rows.market, market_model, vocab, manifest, sold,
                        share_items=layout != "full")
    return time.perf_counter() - started


def build_indexes(out: Path, codes: list[str], recall_queries: int,
                  before_src: Path | None) -> tuple[float, list[dict[str, Any]]]:
    """Every market's index (`auto`); with `before_src`, by that checkout's `xmr index build`.
    Seconds taken and, per market, kind, parameters and recall@10."""
    started = time.perf_counter()
    if before_src is not None:
        subprocess.run([sys.executable, "-m", "service.cli", "index", "build", "--artifacts",
                        str(out), "--recall-queries", str(recall_queries)], cwd=before_src,
                       check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started, []
    tables: Tables = {}
    built = []
    for code in codes:
        manifest = build_index(out / "markets" / code,
                               IndexOptions(recall_queries=recall_queries), tables)
        built.append({"market": code, "kind": manifest.kind, "params": manifest.params,
                      "n_items": manifest.n_items, "recall_at_10": manifest.recall_at_10})
    return time.perf_counter() - started, built


def disk_mib(out: Path) -> dict[str, float]:
    """Bytes on disk (MiB): the global checkpoint, the market checkpoints (without their index
    files), the FAISS indexes and the ONNX encoders."""
    def size(paths: Any) -> float:
        return round(sum(p.stat().st_size for p in paths if p.is_file()) / 2**20, 1)

    markets = list((out / "markets").glob("*/*"))
    served = [p for p in markets if p.name.startswith(("index-", "encoder-"))]
    return {"global_mib": size((out / "global").iterdir()),
            "market_checkpoints_mib": size(p for p in markets if p not in served
                                           and p.name != "index.json"),
            "indexes_mib": size(p for p in markets if p.name.startswith("index-")),
            "encoders_mib": size(p for p in markets if p.name.startswith("encoder-"))}

