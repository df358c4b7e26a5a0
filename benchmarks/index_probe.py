"""Approximate-index options on one scale-workload market, without serving: per option,
`build_index` (one FAISS thread), recall@10 on 500 fresh query vectors (another seed than the
build's) and one-query search p50/p99 at k=10 and k=100.

    python benchmarks/index_probe.py --items 1000000 \
        --options '[{"kind": "ivf-sq8", "nlist": 1024}, {"kind": "ivf-sq8", "nlist": 4096}]'

The market is `scale.py`'s proxy (one market selling the whole catalogue, stand-in vectors:
see benchmarks/README.md, "What the artifacts are"). An option refused at the recall floor is
printed with the recall each tried parameter reached. One JSON line per option.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scale import loaded_index_quality, proxy_market

from service.errors import IndexRecallError
from service.index import build_index, set_search_threads
from service.index_manifest import IndexOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--options", required=True, help="JSON list of IndexOptions fields")
    parser.add_argument("--workdir", default="out/index-probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_search_threads(1)
    market_dir, _ = proxy_market(args.items, Path(args.workdir))
    for fields in json.loads(args.options):
        started = time.perf_counter()
        try:
            manifest = build_index(market_dir, IndexOptions(**fields))
        except IndexRecallError as e:
            print(json.dumps({"options": fields, "refused": e.message}), flush=True)
            continue
        build_s = time.perf_counter() - started
        print(json.dumps({
            "options": fields, "kind": manifest.kind, "params": manifest.params,
            "build_s": round(build_s, 1), "recall_at_10_build": manifest.recall_at_10,
            **loaded_index_quality(market_dir, [10, 100]),
        }), flush=True)


if __name__ == "__main__":
    main()
