"""Scale benchmark (issue 12): synthetic data, index kinds and serving at 8K, 100K and 1M items,
measured side by side in one run (benchmarks/README.md has the results and the command).

    python benchmarks/scale.py --out FILE.json [--sizes 8000,100000,1000000] [--markets 7,50]
                               [--kinds flat,ivf,ivf-sq8,ivf-pq4,hnsw] [--serve-seconds 10]
                               [--workers 1,2]
                               [--layouts full,shared] [--before-src DIR] [--steps ...]
                               [--baseline ARTIFACTS[:SRC] ...]

1. generation: `write_scale` (what `xmr synthetic --items N --markets M` runs) and the loader
   (`read_dataset`) at each size and market count, users = items / 2.
2. indexes: per size, one market selling the whole catalogue; per kind, `build_index` (one
   FAISS and torch thread), then the loaded index's recall@10 against exact search on 500
   fresh query vectors and its one-query search latency at k=10 and k=200.
3. serving: `xmr serve` (one worker, one thread, Redis) over each index: recommend p50/p99 at
   concurrency 1 on sessions of the data (1-15 items, k=10), and the server's RSS.
4. workers: recommend at concurrency 8 on the smallest size, 1 and 2 workers, alternated.
5. market sets: per size, market count and layout (`market_set.py`), a global checkpoint and
   every market's checkpoint and index on disk, and one server holding them all: its RSS.
6. training (first; `--only-training` runs only this): sequences/s of pre-training steps
   (`training.train.TrainingStep`, one thread) at each size, full and sampled softmax, with
   and without distillation, and full-ranking validation's cost per user.
7. ratio (`--steps ratio` only): recommend at concurrency 1 over each size's proxy (`auto`
   index) and each `--baseline` (real artifacts, optionally served by another checkout),
   alternated in one run: the largest size's p50 over each.

The artifacts are written here, not trained (training now samples its softmax above 20K items,
but a whole 1M-item `xmr train`, with full-ranking validation at ~0.1 s per user, was not run on
this machine): a Bert4XMR of the default shape
(TrainConfig's: d_model 128, 2 layers, since issue 10; d_model 64 before) with torch's random
initialisation, to whose item embeddings a direction of a rank-d_model PureSVD of the synthetic
user-item matrix is added (items bought by the same users
point the same way, as in a trained model; the init noise keeps items with the same buyers
apart, as training does), with the norms of a trained model's rows (LEARNED_NORM,
MARKET_NORM). Saved with the real `training.checkpoint.save_checkpoint`. Good for time, memory
and recall; they say nothing of recommendation quality. `--trained DIR` measures the largest
market of real `xmr train` artifacts beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from client import RECOMMEND, Phase, rss_kib, run_phase
from load import machine
from market_set import ARTIFACTS_NOTE, LAYOUTS, build_indexes, disk_mib, item_id, write_set
from market_set import stand_in_model as model_for
from servers import redis_server, xmr_server
from summary import percentile
from workload import ITEMS, Request, WorkloadSpec, build_requests

from service.errors import IndexRecallError
from service.index import build_index, load_index, set_search_threads
from service.index_manifest import HNSW_EF_SEARCHES, IVF_NPROBES, IndexOptions, default_nlist
from service.recall import exact_kth_scores, recall_at_k, sample_queries
from training.checkpoint import Manifest, load_checkpoint, save_checkpoint
from training.config import FitConfig, TrainConfig
from training.data import read_dataset
from training.evaluate import model_scorer, rank_split
from training.model import Bert4XMR, ModelConfig
from training.split import MarketSplit
from training.synthetic import MarketRows, ScaleSpec, generate_scale, write_scale
from training.train import TrainingStep, _batches
from training.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]


def generation(sizes: list[int], market_counts: list[int], workdir: Path) -> list[dict[str, Any]]:
    results = []
    for n_items in sizes:
        for n_markets in market_counts:
            spec = ScaleSpec(n_items=n_items, n_markets=n_markets, n_users=n_items // 2)
            out = workdir / f"data-{n_items}-{n_markets}"
            started = time.perf_counter()
            written = write_scale(out, spec)
            write_s = time.perf_counter() - started
            started = time.perf_counter()
            dataset = read_dataset(out)
            read_s = time.perf_counter() - started
            result = {"items": n_items, "markets": n_markets, "users": spec.n_users,
                      "interactions": sum(rows for *_, rows in written),
                      "distinct_items_read": len(dataset.item_ids),
                      "bytes": sum(path.stat().st_size for path, *_ in written),
                      "generate_and_write_s": round(write_s, 2), "read_s": round(read_s, 2)}
            print(f"generation items={n_items} markets={n_markets} "
                  f"interactions={result['interactions']} write={write_s:.1f}s "
                  f"read={read_s:.1f}s", flush=True)
            results.append(result)
            shutil.rmtree(out)
    return results


def training_splits(spec: ScaleSpec) -> list[tuple[MarketSplit, int]]:
    """The scale workload as training splits: every user's items in time order, all for
    training (item number n is row n + 1; no held-out items)."""
    empty = np.zeros(0, dtype=np.int64)
    splits = []
    for market_row, rows in enumerate(generate_scale(spec)):
        starts = np.r_[0, np.flatnonzero(np.diff(rows.users)) + 1, len(rows.users)]
        items = rows.items + 1
        train = [items[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]
        splits.append((MarketSplit(rows.market, "full", 0, [], train, empty, empty, empty,
                                   np.unique(items)), market_row))
    return splits


def training_throughput(sizes: list[int], softmaxes: list[str], distills: list[float],
                        full_up_to: int, steps: int) -> list[dict[str, Any]]:
    """Pre-training steps at each size (7 markets, users = items / 2) for each softmax and
    distillation weight, with the default TrainConfig and FitConfig otherwise (one thread):
    sequences/s over `steps` batches after 2 of warm-up, and what full-ranking validation
    costs per user. `per_sequence_vs_smallest_full`: time per sequence over that of the
    smallest catalogue's full softmax with the same distillation (the 2x goal of issue 12)."""
    config = TrainConfig()
    results = []
    for n_items in sizes:
        spec = ScaleSpec(n_items=n_items, n_markets=7, n_users=n_items // 2)
        splits = training_splits(spec)
        for softmax in softmaxes:
            if softmax == "full" and n_items > full_up_to:
                continue
            for distill in distills:
                fit_config = replace(config.pretrain, softmax=softmax, distill=distill)
                results.append(time_steps(splits, spec.n_markets, config, fit_config, steps))
    for result in results:
        base = next((r for r in results if r["items"] == min(sizes) and r["softmax"] == "full"
                     and r["distill"] == result["distill"]), None)
        if base is not None:
            result["per_sequence_vs_smallest_full"] = round(
                base["sequences_per_s"] / result["sequences_per_s"], 2)
    return results


def time_steps(splits: list[tuple[MarketSplit, int]], n_markets: int, config: TrainConfig,
               fit_config: FitConfig, steps: int) -> dict[str, Any]:
    n_rows = max(int(split.market_items.max()) for split, _ in splits) + 1
    torch.manual_seed(0)
    model = Bert4XMR(ModelConfig(n_rows=n_rows, n_markets=n_markets, **config.model_kwargs()))
    started = time.perf_counter()
    step = TrainingStep(model, splits, fit_config)
    setup_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    batches = _batches(splits, fit_config.batch_size, rng)[: steps + 2]
    model.train()
    for market_row, seqs in batches[:2]:
        step(market_row, seqs, rng)
    started = time.perf_counter()
    for market_row, seqs in batches[2:]:
        step(market_row, seqs, rng)
    seconds = time.perf_counter() - started
    step.close()
    sequences = sum(len(seqs) for _, seqs in batches[2:])
    result = {"items": n_rows - 1, "markets": n_markets, "softmax": step.softmax,
              "negatives": fit_config.negatives if step.softmax == "sampled" else None,
              "distill": fit_config.distill, "d_model": config.d_model,
              "batch_size": fit_config.batch_size, "steps": len(batches) - 2,
              "setup_s": round(setup_s, 2),
              "step_ms": round(1000 * seconds / (len(batches) - 2), 1),
              "sequences_per_s": round(sequences / seconds, 1),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "valid_ms_per_user": validation_ms_per_user(model, splits[0])}
    print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return result


def validation_ms_per_user(model: Bert4XMR, split_row: tuple[MarketSplit, int],
                           users: int = 64) -> float:
    """Milliseconds per user of full-ranking validation (rank_split) over the market's items:
    the held-out item of `users` users is taken as each one's last training item."""
    split, market_row = split_row
    train = split.train[:users]
    probe = MarketSplit(split.market, "full", 0, [], [seq[:-1] for seq in train],
                        np.arange(len(train)), np.asarray([seq[-1] for seq in train]),
                        np.asarray([seq[-1] for seq in train]), split.market_items)
    started = time.perf_counter()
    rank_split(probe, model_scorer(model, market_row), "valid")
    return round(1000 * (time.perf_counter() - started) / len(train), 2)


def write_artifacts(rows: MarketRows, n_items: int, out: Path, seed: int = 0) -> Path:
    """One market checkpoint (see the module docstring) under `out/markets/<market>`."""
    model = model_for(rows.users, rows.items, n_items, 1, seed)
    vocab = Vocab([item_id(n, n_items) for n in range(n_items)])  # row = item number + 1
    counts = np.bincount(rows.items, minlength=n_items)
    order = sorted(range(n_items), key=lambda n: (-counts[n], n))
    manifest = Manifest(kind="market", model_config=model.config, markets=[rows.market],
                        market=rows.market, train_config={"note": ARTIFACTS_NOTE})
    save_checkpoint(out / "markets" / rows.market, model, vocab, manifest,
                    {item_id(n, n_items): int(counts[n]) for n in order})
    return out


def session_requests(rows: MarketRows, n_items: int, n: int = 2000,
                     seed: int = 0) -> list[Request]:
    """Recommend bodies: a window of 1-15 items of a user's sequence, k=10."""
    rng = np.random.default_rng(seed)
    starts = np.r_[0, np.flatnonzero(np.diff(rows.users)) + 1, len(rows.users)]
    requests = []
    for user in rng.integers(len(starts) - 1, size=n):
        sequence = rows.items[starts[user]:starts[user + 1]]
        length = int(rng.integers(1, min(15, len(sequence)) + 1))
        first = int(rng.integers(0, len(sequence) - length + 1))
        items = [item_id(int(i), n_items) for i in sequence[first:first + length]]
        requests.append(Request(ITEMS, rows.market, json.dumps({"items": items, "k": 10}),
                                len(items)))
    return requests


def search_latency(search: Any, queries: np.ndarray, k: int) -> dict[str, float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        search.search(torch.from_numpy(query[None, :]), k)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {f"search_k{k}_p50_ms": round(percentile(times, 50), 3),
            f"search_k{k}_p99_ms": round(percentile(times, 99), 3)}


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants (the workers of `xmr serve --workers`)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_rss_kib(int(child))
    return total


def recommend(url: str, pid: int, requests: list[Request], seconds: float,
              concurrency: int = 1) -> dict[str, Any]:
    asyncio.run(run_phase(Phase(RECOMMEND, concurrency, 2.0, warmup=True), requests, url, pid,
                          10.0))
    result = asyncio.run(run_phase(Phase(RECOMMEND, concurrency, seconds), requests, url, pid,
                                   10.0))
    latencies = sorted(result.latencies_ms.get(ITEMS, []))
    return {"recommend_p50_ms": round(percentile(latencies, 50), 3),
            "recommend_p99_ms": round(percentile(latencies, 99), 3),
            "requests": len(latencies), "errors": sum(result.errors.values()),
            "req_per_s": round(len(latencies) / result.wall_s, 1),
            "server_rss_mib": round(tree_rss_kib(pid) / 1024, 1)}


def proxy_market(n_items: int, workdir: Path) -> tuple[Path, list[Request]]:
    """Artifacts of one market selling all `n_items` items (see the module docstring), and
    recommend bodies cut from its users' sessions."""
    spec = ScaleSpec(n_items=n_items, n_markets=1, n_users=n_items // 2, overlap=1.0)
    rows = generate_scale(spec)[0]
    started = time.perf_counter()
    artifacts = write_artifacts(rows, n_items, workdir / f"artifacts-{n_items}")
    print(f"artifacts items={n_items} written in {time.perf_counter() - started:.1f}s "
          f"({ARTIFACTS_NOTE})", flush=True)
    return artifacts / "markets" / rows.market, session_requests(rows, n_items)


def popular_requests(market_dir: Path, n: int = 2000, seed: int = 0) -> list[Request]:
    """Recommend bodies of 1-15 items drawn by the market's interaction counts (for trained
    artifacts, whose sessions this script does not read)."""
    market_items = load_checkpoint(market_dir).market_items or {}
    ids = list(market_items)
    weights = np.asarray(list(market_items.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    requests = []
    for length in rng.integers(1, 16, size=n):
        items = [ids[i] for i in rng.choice(len(ids), size=min(int(length), len(ids)),
                                            replace=False, p=weights / weights.sum())]
        requests.append(Request(ITEMS, market_dir.name,
                                json.dumps({"items": items, "k": 10}), len(items)))
    return requests


def build_or_cap(market_dir: Path, kind: str) -> tuple[Any, str | None]:
    """Build `kind` at the default floor; if refused, build it at the most that tuning may try
    (the largest nprobe or efSearch) so its recall and speed there are measured too."""
    try:
        return build_index(market_dir, IndexOptions(kind=kind)), None
    except IndexRecallError as e:
        n_items = len(load_checkpoint(market_dir).market_items or {})
        nlist = default_nlist(n_items, IndexOptions(kind=kind).resolve(n_items))
        cap = IndexOptions(kind=kind, min_recall=0.01,
                           nprobe=max(v for v in IVF_NPROBES if v <= max(1, nlist // 4)),
                           ef_search=max(HNSW_EF_SEARCHES))
        return build_index(market_dir, cap), e.message


def loaded_index_quality(market_dir: Path, ks: list[int]) -> dict[str, float]:
    """The market's index as the server loads it: recall@10 against exact search on 500 fresh
    query vectors (another seed than the build's), and one-query search p50/p99 at each k."""
    checkpoint = load_checkpoint(market_dir)
    index = load_index(market_dir, checkpoint, "faiss", "cpu")
    queries = sample_queries(checkpoint, index.rows, 1000, seed=1).check  # (500, D), fresh
    found = index.search.search(torch.from_numpy(queries), 10)[1]
    vectors = np.asarray(index.vectors)  # (N, D), exact
    kth = exact_kth_scores(index.rows, vectors, queries)
    out = {"recall_at_10": round(recall_at_k(found, queries, index.rows, vectors, kth), 4)}
    for k in ks:
        out.update(search_latency(index.search, queries, k))
    return out


def measure_kinds(label: str, market_dir: Path, requests: list[Request], kinds: list[str],
                  workdir: Path, redis_url: str, serve_seconds: float) -> list[dict[str, Any]]:
    """Per kind: build, recall and search latency of the loaded index, then serving."""
    artifacts = market_dir.parent.parent
    results = []
    for kind in kinds:
        started = time.perf_counter()
        manifest, refused = build_or_cap(market_dir, kind)
        build_s = time.perf_counter() - started
        result: dict[str, Any] = {
            "vectors": label, "items": manifest.n_items, "kind": manifest.kind,
            "params": manifest.params, "refused_at_floor": refused,
            "build_index_s": manifest.build_seconds, "build_all_s": round(build_s, 2),
            "recall_at_10_build": manifest.recall_at_10,
            **loaded_index_quality(market_dir, [10, 200]),
            "index_mib": round((market_dir / manifest.index_file).stat().st_size / 2**20, 1),
            "encoder_mib": round((market_dir / manifest.encoder_file).stat().st_size / 2**20, 1),
            "weights_mib": round((market_dir / "weights.safetensors").stat().st_size / 2**20, 1),
        }
        env = {"XMR_THREADS": "1", "XMR_MARKETS": market_dir.name}
        with xmr_server(artifacts, redis_url, env,
                        workdir / f"serve-{label}-{manifest.n_items}-{kind}.log") as server:
            result["server_ready_s"] = round(server.ready_s, 1)
            result.update(recommend(server.url, server.pid, requests, serve_seconds))
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        results.append(result)
    return results


def ratio(baselines: list[str], data: Path, sizes: list[int], workdir: Path, redis_url: str,
          seconds: float, rounds: int) -> dict[str, Any]:
    """The largest size's request against smaller ones, side by side: `xmr serve` over each
    baseline (`ARTIFACTS[:SRC]`: `xmr train` output on real data, served by the checkout SRC,
    default this one) with bodies of 1-15 items of `data`'s sessions (the load benchmark's
    workload), and over each size's proxy with its `auto` index and its own sessions' bodies
    of 1-15 items; k=10, concurrency 1, one worker and thread each; in the order A B .. B A,
    `rounds` times. Each server's median p50, and the largest proxy's p50 over it."""
    spec = WorkloadSpec(n_requests=2000, max_items=15, session_share=0.0)
    servers: list[tuple[str, Path, Path | None, list[Request]]] = []
    for baseline in baselines:
        artifacts, _, source = baseline.partition(":")
        src = Path(source) if source else None
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src or ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        servers.append((f"{Path(artifacts).name}@{commit}", Path(artifacts), src,
                        [r for r in build_requests(data, spec) if r.kind == ITEMS]))
    params = {}
    for n_items in sorted(sizes):
        market_dir, requests = proxy_market(n_items, workdir)
        manifest = build_index(market_dir)
        label = f"proxy-{n_items}-{manifest.kind}"
        params[label] = manifest.params
        servers.append((label, market_dir.parent.parent, None, requests))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in servers}
    for _ in range(rounds):
        for label, artifacts, src, bodies in servers + servers[::-1]:
            with xmr_server(artifacts, redis_url, {"XMR_THREADS": "1"},
                            workdir / f"ratio-{label}.log", source=src) as server:
                result = recommend(server.url, server.pid, bodies, seconds)
            print(f"ratio {label} " + " ".join(f"{k}={v}" for k, v in result.items()),
                  flush=True)
            runs[label].append(result)
    for label, artifacts, *_ in servers:
        if label.startswith("proxy-"):
            shutil.rmtree(artifacts)
    proxy = float(np.median([r["recommend_p50_ms"] for r in runs[servers[-1][0]]]))
    out: dict[str, Any] = {"params": params, "runs": runs, "p50_ms": {}, "ratio": {}}
    for label in runs:
        p50 = float(np.median([r["recommend_p50_ms"] for r in runs[label]]))
        out["p50_ms"][label] = round(p50, 3)
        out["ratio"][label] = round(proxy / p50, 2)
    print(f"ratio p50_ms={out['p50_ms']} proxy/baseline={out['ratio']}", flush=True)
    return out


def largest_market(artifacts: Path) -> Path:
    markets = [p for p in (artifacts / "markets").iterdir() if (p / "manifest.json").is_file()]
    return max(markets, key=lambda p: len(load_checkpoint(p).market_items or {}))


def workers(artifacts: Path, requests: list[Request], counts: list[int], redis_url: str,
            workdir: Path, seconds: float) -> list[dict[str, Any]]:
    """Recommend at concurrency 8 with each worker count, in the order A B B A."""
    results = []
    for count in counts + counts[::-1]:
        env = {"XMR_THREADS": "1", "XMR_WORKERS": str(count)}
        with xmr_server(artifacts, redis_url, env, workdir / f"workers-{count}.log") as server:
            result = {"workers": count, **recommend(server.url, server.pid, requests, seconds,
                                                    concurrency=8),
                      "main_process_rss_mib": round(rss_kib(server.pid) / 1024, 1)}
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        results.append(result)
    return results


def market_sets(sizes: list[int], counts: list[int], layouts: list[str], workdir: Path,
                redis_url: str, before_src: Path | None, recall_queries: int,
                serve_seconds: float) -> list[dict[str, Any]]:
    """Step 5: per size, market count and layout, the artifacts on disk and the RSS of one
    server holding every market (after recommend requests spread over all of them)."""
    results = []
    for n_items in sizes:
        for n_markets in counts:
            markets = generate_scale(ScaleSpec(n_items=n_items, n_markets=n_markets,
                                               n_users=n_items // 2))
            requests = [r for rows in markets
                        for r in session_requests(rows, n_items, max(20, 2000 // n_markets))]
            for layout in layouts:
                out = workdir / f"set-{n_items}-{n_markets}-{layout}"
                shutil.rmtree(out, ignore_errors=True)
                source = before_src if layout == "full" else None
                result: dict[str, Any] = {
                    "items": n_items, "markets": n_markets, "layout": layout,
                    "code": "before" if source is not None else "this",
                    "sold_items_mean": round(float(np.mean([len(np.unique(r.items))
                                                            for r in markets]))),
                    "write_s": round(write_set(markets, n_items, out, layout), 1)}
                index_s, built = build_indexes(out, [r.market for r in markets], recall_queries,
                                               source)
                result["index_build_s"] = round(index_s, 1)
                result["index_kinds"] = sorted({b["kind"] for b in built})
                recalls = [b["recall_at_10"] for b in built if b["recall_at_10"] is not None]
                result["recall_at_10_min"] = min(recalls) if recalls else None
                result.update(disk_mib(out))
                with xmr_server(out, redis_url, {"XMR_THREADS": "1"},
                                workdir / f"set-{n_items}-{n_markets}-{layout}.log",
                                timeout_s=3600.0, source=source) as server:
                    result["server_ready_s"] = round(server.ready_s, 1)
                    result["server_rss_ready_mib"] = round(tree_rss_kib(server.pid) / 1024, 1)
                    result.update(recommend(server.url, server.pid, requests, serve_seconds))
                print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
                results.append(result)
                shutil.rmtree(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Results as JSON.")
    parser.add_argument("--sizes", default="8000,100000,1000000", help="Catalogue sizes.")
    parser.add_argument("--markets", default="7,50", help="Market counts of the generation step.")
    parser.add_argument("--kinds", default="flat,ivf,ivf-sq8,ivf-pq4,hnsw", help="Index kinds.")
    parser.add_argument("--serve-seconds", type=float, default=10.0,
                        help="Recommend seconds per index (after 2 s of warm-up).")
    parser.add_argument("--workers", default="1,2", help="Worker counts ('' to skip).")
    parser.add_argument("--trained", type=Path, action="append", default=[],
                        help="Artifacts of `xmr train` (repeatable): their largest market is "
                             "measured beside the proxies, with popularity-drawn sessions.")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-scale")
    parser.add_argument("--steps", default="training,generation,indexes,workers,market-sets",
                        help="Steps to run, of training, generation, indexes, workers, "
                             "market-sets, ratio (not run by default).")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"Market-set layouts, of {', '.join(LAYOUTS)}.")
    parser.add_argument("--before-src", type=Path,
                        help="A checkout of the code before the shared item table (f5ae3c4): "
                             "the `full` layout's indexes are built and served by it.")
    parser.add_argument("--baseline", action="append", default=[],
                        help="Step ratio: ARTIFACTS[:SRC], `xmr train` output on --ratio-data "
                             "served by the checkout SRC (default this one); repeatable.")
    parser.add_argument("--ratio-data", type=Path, default=ROOT.parent / "shared" / "data" /
                        "xmarket", help="Step ratio: the data the baselines were trained on.")
    parser.add_argument("--ratio-rounds", type=int, default=2,
                        help="Step ratio: rounds of A B .. B A.")
    parser.add_argument("--set-recall-queries", type=int, default=200,
                        help="Market sets: recall queries per market index.")
    parser.add_argument("--train-softmax", default="full,sampled",
                        help="Softmaxes whose training throughput is measured ('' to skip).")
    parser.add_argument("--train-full-up-to", type=int, default=100_000,
                        help="Largest catalogue trained with the full softmax.")
    parser.add_argument("--train-steps", type=int, default=20, help="Timed steps per row.")
    parser.add_argument("--train-distill", default="0,1",
                        help="Distillation weights whose training throughput is measured.")
    parser.add_argument("--only-training", action="store_true",
                        help="Measure training throughput only (--steps training).")
    args = parser.parse_args()
    steps = {"training"} if args.only_training else set(args.steps.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    set_search_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine(),
                              "load_average_before": os.getloadavg(),
                              "artifacts": ARTIFACTS_NOTE, "threads": 1}
    counts = [int(m) for m in args.markets.split(",")]
    if "training" in steps and args.train_softmax:
        report["training"] = training_throughput(
            sizes, args.train_softmax.split(","), [float(d) for d in args.train_distill.split(",")],
            args.train_full_up_to, args.train_steps)
    if steps == {"training"}:
        report["load_average_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
        return
    if "generation" in steps:
        report["generation"] = generation(sizes, counts, args.workdir)
    report["indexes"] = []
    kinds = args.kinds.split(",") if "indexes" in steps else []
    with redis_server(args.workdir / "redis.log") as redis_url:
        if "market-sets" in steps:
            report["market_sets"] = market_sets(sizes, counts, args.layouts.split(","),
                                                args.workdir, redis_url, args.before_src,
                                                args.set_recall_queries, args.serve_seconds)
        for trained in args.trained:  # a copy of its largest market: indexes are rebuilt
            source = largest_market(trained)
            market_dir = args.workdir / f"trained-{source.name}" / "markets" / source.name
            shutil.rmtree(market_dir.parent.parent, ignore_errors=True)
            shutil.copytree(source, market_dir)
            if (source.parent.parent / "global").is_dir():  # the parent holding its item table
                shutil.copytree(source.parent.parent / "global",
                                market_dir.parent.parent / "global")
            report["indexes"].extend(measure_kinds(
                f"trained:{source.name}", market_dir, popular_requests(market_dir), kinds,
                args.workdir, redis_url, args.serve_seconds))
            shutil.rmtree(market_dir.parent.parent)
        if "ratio" in steps:
            report["ratio"] = ratio(args.baseline, args.ratio_data, sizes, args.workdir,
                                    redis_url, args.serve_seconds, args.ratio_rounds)
        smallest: tuple[Path, list[Request]] | None = None
        for n_items in sizes if "indexes" in steps or "workers" in steps else []:
            market_dir, requests = proxy_market(n_items, args.workdir)
            report["indexes"].extend(measure_kinds("proxy", market_dir, requests, kinds,
                                                   args.workdir, redis_url, args.serve_seconds))
            if smallest is None:
                smallest = (market_dir.parent.parent, requests)
                build_index(market_dir)  # exact, for the workers step
            else:
                shutil.rmtree(market_dir.parent.parent)
        if args.workers and "workers" in steps and smallest is not None:
            report["workers"] = workers(*smallest, [int(w) for w in args.workers.split(",")],
                                        redis_url, args.workdir, args.serve_seconds)
    report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
