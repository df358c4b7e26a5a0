"""How much of a million-item market an IVF search must read for recall@10 >= 0.95, whatever
its codes: the partition's own bound. Per way of forming the lists, and per number of lists
probed: the share of the exact top-10 whose items lie in the probed lists (the recall an IVF
index would reach with exact codes) and the vectors those lists hold (what its scan reads).

    python benchmarks/ivf_partition.py [--items 1000000] [--nlist 2048]

The market is `scale.py`'s proxy (stand-in vectors: see benchmarks/README.md, "What the
artifacts are"); 500 fresh query vectors (`service.recall.sample_queries`, seed 1, as
`scale.py` measures recall). Ways of forming the lists, each trained on 64 points per list:
- `ivf`: what `build_index` builds (FAISS's IVF training under inner product);
- `kmeans-l2`: plain k-means (FAISS `Kmeans`, 20 iterations), items to the centroid of largest
  inner product; `spherical`: the same with unit centroids; `l2-assign`: items to the nearest
  centroid;
- `spill`: `ivf`'s lists with each item also in a second list, the one that minimises
  |r'|^2 + |<r', r>|^2 / |r|^2 among its 16 best (r, r': the residuals to the first and the
  second centroid; the orthogonality-amplified spilling of Sun et al., "SOAR", 2023).
Then, for the bandwidth such a scan meets, one core's read rate over a 256 MB array.
One JSON line per way, then one for the bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scale import proxy_market

from service.index import market_vectors
from service.recall import sample_queries
from training.checkpoint import load_checkpoint

NPROBES = (64, 128, 192, 256, 320, 384, 512)


def lists_of(kind: str, faiss, x: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (nlist, D) and each item's list (N,) for one way of forming the lists."""
    n, d = x.shape
    sample = x[np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * nlist),
                                                       replace=False))]
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        centroids = index.quantizer.reconstruct_n(0, nlist)
    else:
        kmeans = faiss.Kmeans(d, nlist, niter=20, seed=0, spherical=kind == "spherical",
                              max_points_per_centroid=64, min_points_per_centroid=1)
        kmeans.train(sample)
        centroids = kmeans.centroids
    assign = faiss.IndexFlatL2(d) if kind == "l2-assign" else faiss.IndexFlatIP(d)
    assign.add(centroids)
    return centroids, assign.search(x, 1)[1][:, 0]


def spilled(faiss, x: np.ndarray, centroids: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each item's second list (N,): SOAR's loss among the 16 lists of largest inner product."""
    quantizer = faiss.IndexFlatIP(x.shape[1])
    quantizer.add(centroids)
    second = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), 50_000):
        block = x[start:start + 50_000]
        near = quantizer.search(block, 16)[1][:, 1:]  # (b, 15), the first is (mostly) `first`
        r = block - centroids[first[start:start + 50_000]]
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        other = block[:, None, :] - centroids[near]  # (b, 15, D)
        loss = (other ** 2).sum(-1) + np.einsum("bkd,bd->bk", other, r) ** 2
        second[start:start + 50_000] = near[np.arange(len(near)), loss.argmin(1)]
    return second


def bound(queries: np.ndarray, truth: np.ndarray, centroids: np.ndarray,
          lists: list[np.ndarray]) -> dict[str, list[float]]:
    """Per nprobe: [recall@10 with exact codes, vectors scanned (thousands)]."""
    nlist = len(centroids)
    sizes = sum(np.bincount(assigned, minlength=nlist) for assigned in lists)
    order = np.argsort(-(queries @ centroids.T), axis=1)
    rows = np.arange(len(queries))[:, None]
    out = {}
    for nprobe in NPROBES:
        probed = np.zeros((len(queries), nlist), dtype=bool)
        np.put_along_axis(probed, order[:, :nprobe], True, axis=1)
        found = np.zeros(truth.shape, dtype=bool)
        for assigned in lists:
            found |= probed[rows, assigned[truth]]
        out[str(nprobe)] = [round(float(found.mean()), 4),
                            round(float((probed * sizes).sum(1).mean()) / 1e3, 1)]
    return out


def read_rate() -> float:
    """GB/s one core reads a 256 MB float32 array at (the median of 20 sums)."""
    array = np.ones(64_000_000, dtype=np.float32)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        array.sum()
        times.append(time.perf_counter() - started)
    return array.nbytes / float(np.median(times)) / 1e9


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--workdir", default="out/index-probe")
    args = parser.parse_args()
    torch.set_num_threads(2)
    market_dir, _ = proxy_market(args.items, Path(args.workdir))
    checkpoint = load_checkpoint(market_dir)
    rows, x = market_vectors(checkpoint)
    x = np.ascontiguousarray(x, dtype=np.float32)
    queries = sample_queries(checkpoint, rows, 1000, seed=1).check.astype(np.float32)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(queries, 10)[1]  # (Q, 10) positions
    del exact
    for kind in ("ivf", "spill", "kmeans-l2", "spherical", "l2-assign"):
        started = time.perf_counter()
        centroids, first = lists_of("ivf" if kind == "spill" else kind, faiss, x, args.nlist)
        lists = [first, spilled(faiss, x, centroids, first)] if kind == "spill" else [first]
        print(json.dumps({"lists": kind, "nlist": args.nlist, "seconds":
                          round(time.perf_counter() - started, 1),
                          "nprobe: [recall@10 exact codes, K vectors scanned]":
                          bound(queries, truth, centroids, lists)}), flush=True)
    print(json.dumps({"read_gb_per_s_one_core": round(read_rate(), 1),
                      "index_bytes_per_vector": x.shape[1] // 2}), flush=True)


if __name__ == "__main__":
    main()
