"""Batch throughput of the service's encode + search path: real sessions per second, encoded by
each market's checkpoint and searched exactly with torch, on a GPU when there is one.

Needs torch, numpy and safetensors only: it uses the checkpoint (`training.checkpoint`), the
service's torch serving encoders (`service.encoder.SessionEncoder`, eager, and on CUDA
`CudaGraphEncoder`, the GPU default) and torch search (`service.search.TorchSearch`), not
`service.recommender`, whose imports pull in faiss through `service.index`.

    python benchmarks/gpu_batch.py --artifacts DIR --data DIR [--device auto] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from service.encoder import CudaGraphEncoder, Encoder, SessionEncoder
from service.search import TorchSearch
from training.checkpoint import Checkpoint, load_checkpoint
from training.data import read_dataset


@dataclass(frozen=True)
class Market:
    name: str
    checkpoint: Checkpoint
    search: TorchSearch
    sessions: list[list[int]]  # real users' last max_len items, as rows
    encoders: dict[str, Encoder]  # by kind: torch (eager), cuda-graphs on CUDA


@dataclass(frozen=True)
class Result:
    encoder: str
    batch_size: int
    batches: int
    seconds: float
    sessions_per_s: float
    batch_ms_p50: float
    batch_ms_p99: float


def load_market(artifacts: Path, data_sequences: dict[str, list[str]], name: str,
                device: torch.device) -> Market:
    checkpoint = load_checkpoint(artifacts / "markets" / name, map_location=device)
    assert checkpoint.market_items is not None
    rows = np.asarray(checkpoint.vocab.indices(checkpoint.market_items), dtype=np.int64)  # (N,)
    with torch.inference_mode():
        vectors = checkpoint.model.item_vectors(checkpoint.market_row)  # (n_rows, D)
    picked = vectors.float().cpu().numpy()[rows]  # (N, D), as service.index.market_vectors
    max_len = checkpoint.model.config.max_len
    sessions = []
    for sequence in data_sequences.values():
        known = [r for r in (checkpoint.vocab.get(i) for i in sequence) if r is not None]
        if known:
            sessions.append(known[-max_len:])
    eager = SessionEncoder(checkpoint.model, checkpoint.market_row)
    encoders: dict[str, Encoder] = {"torch": eager}
    if device.type == "cuda":
        graphed = CudaGraphEncoder(eager)
        graphed.capture_all()  # every bucket shape, as the service does at load
        encoders["cuda-graphs"] = graphed
    return Market(name, checkpoint, TorchSearch(rows, picked, str(device)), sessions, encoders)


def run_batch(market: Market, encoder: str, sessions: list[list[int]], k: int) -> None:
    """What `service.recommender.recommend_many` does per batch: pad, encode, search, to host."""
    users = market.encoders[encoder].encode(sessions)  # (B, D) on the checkpoint's device
    market.search.search(users, k)  # numpy on the host: waits for the device


def measure(markets: list[Market], encoder: str, batch_size: int, seconds: float, k: int,
            rng: random.Random) -> Result:
    """Batches of one random market each, sessions drawn with replacement, for `seconds`."""

    def draw() -> tuple[Market, list[list[int]]]:
        market = rng.choice(markets)
        return market, [rng.choice(market.sessions) for _ in range(batch_size)]

    for _ in range(3):  # warm-up: kernels, allocator, cuBLAS handles
        market, sessions = draw()
        run_batch(market, encoder, sessions, k)
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        market, sessions = draw()  # drawing is host work the service does not do: not timed
        t0 = time.perf_counter()
        run_batch(market, encoder, sessions, k)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    times.sort()
    p50, p99 = (times[max(0, math.ceil(p * len(times)) - 1)] for p in (0.5, 0.99))  # nearest rank
    return Result(encoder, batch_size, len(times), round(total, 3),
                  round(batch_size * len(times) / total, 1), round(1000 * p50, 3),
                  round(1000 * p99, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="Output of `xmr train`.")
    parser.add_argument("--data", type=Path, default=os.environ.get("XMR_DATA_DIR"),
                        help="Directory of <market>_5core.txt files (default: $XMR_DATA_DIR).")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
    parser.add_argument("--batch-sizes", default="1,32,256,1024")
    parser.add_argument("--seconds", type=float, default=3.0, help="Timed seconds per size.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU work).")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data or XMR_DATA_DIR is required")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dataset = read_dataset(args.data)
    markets = [load_market(args.artifacts, dataset.markets[m].sequences, m, device)
               for m in dataset.market_codes if (args.artifacts / "markets" / m).is_dir()]
    if not markets:
        sys.exit(f"error: {args.artifacts}/markets holds none of the data's markets")
    rng = random.Random(0)
    results = [measure(markets, encoder, int(b), args.seconds, args.k, rng)
               for encoder in markets[0].encoders for b in args.batch_sizes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    codes = ",".join(m.name for m in markets)
    print(f"device {name}, torch {torch.__version__}, markets {codes}, torch search, k={args.k}")
    print(f"{'encoder':>11} {'batch':>6} {'batches':>8} {'sessions/s':>12} {'p50 ms':>9} "
          f"{'p99 ms':>9}")
    for r in results:
        print(f"{r.encoder:>11} {r.batch_size:>6} {r.batches:>8} {r.sessions_per_s:>12.1f} "
              f"{r.batch_ms_p50:>9.3f} {r.batch_ms_p99:>9.3f}")
    if args.out:
        report = {"command": " ".join(sys.argv), "device": name, "torch": torch.__version__,
                  "threads": args.threads, "k": args.k, "results": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
