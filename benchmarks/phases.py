"""Where one recommend's time goes inside the server process: each step of
`service.recommender.recommend_many` timed alone, one query at a time (B=1, no HTTP), on the
load benchmark's requests (`workload.py`: sessions of 1-50 real items, k=10).

    python benchmarks/phases.py --data ../shared/data/xmarket --artifacts ART [--requests 1500]

Steps, in a request's order (the encoder runs first, so what follows meets the caches the
encoder left, as it does in the service): `resolve` (ids to rows), `encode` (the market's
serving encoder), `search_retrieve` (the index's top `retrieve`, what the two-stage ranking
asks for), `search_model` (top k + the session's length: what a market without a ranker asks
for), `rank_session` (the whole second stage; markets with a ranker) and its parts:
`candidates` (the co-occurrence sums and the pool), `features`, `score`; then `total`, one
whole `recommend_many` call. Prints the median and mean microseconds of each, one line each.
Run it on a quiet machine; compare steps within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from workload import ITEMS, WorkloadSpec, build_requests

from service.bundle import load_bundle
from service.index import set_search_threads
from service.recommender import Query, recommend_many, resolve
from service.search import as_numpy
from training.ranker import features, rank_session, session_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, required=True, help="`xmr train` output")
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    set_search_threads(1)  # as `xmr serve` with XMR_THREADS=1 (its default)
    bundle = load_bundle(args.artifacts, None, "faiss", "cpu", "auto", 1)
    requests = [r for r in build_requests(args.data, WorkloadSpec(n_requests=args.requests))
                if r.kind == ITEMS]
    spent: dict[str, list[float]] = {}

    def timed(step: str, started: float) -> float:
        now = time.perf_counter()
        spent.setdefault(step, []).append(now - started)
        return now

    for request in requests:
        model = bundle.market(request.market)
        query = Query(items=json.loads(request.body)["items"], k=10)
        t = time.perf_counter()
        found = resolve(model, query)
        t = timed("resolve", t)
        if not found.rows:
            continue
        user = as_numpy(model.encoder.encode([found.rows]))  # (1, D)
        t = timed("encode", t)
        ranker = model.ranker
        depth = ranker.spec.retrieve if ranker is not None else query.k
        _, hits = model.index.search.search(user, min(depth, model.n_items))
        t = timed("search_retrieve", t)
        model.index.search.search(user, min(query.k + len(found.excluded), model.n_items))
        t = timed("search_model", t)
        if ranker is not None:
            pool, terms = session_candidates(ranker, found.rows, hits[0], None, found.excluded)
            t = timed("candidates", t)
            table = features(ranker, user[0], pool, terms)
            t = timed("features", t)
            ranker.ranker.scorer.score(table)
            t = timed("score", t)
            rank_session(ranker, found.rows, user[0], hits[0], None, found.excluded, query.k)
            t = timed("rank_session", t)
        recommend_many(model, [query])
        timed("total", t)
    for step, values in spent.items():
        micro = np.asarray(values) * 1e6
        print(f"{step:16s} median {statistics.median(micro):8.1f} us   mean {micro.mean():8.1f} us"
              f"   n {len(micro)}")


if __name__ == "__main__":
    main()
