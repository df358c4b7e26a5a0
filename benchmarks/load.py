"""Load benchmark of the recommendation service on real data (see benchmarks/README.md).

Trains once into a cache directory unless --artifacts is given, times `xmr index build` for all
markets, starts a real redis-server and `xmr serve` (uvicorn, one worker, one torch thread), and
drives it from a separate client process: POST /markets/{market}/recommend against the same
route's no-op (POST /markets/{market}/noop, same bodies) and GET /noop, alternating endpoints in
short slices at each concurrency. Prints a table and writes JSON.

    python benchmarks/load.py --data DIR [--artifacts DIR] [--duration S] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client import GET_NOOP, NOOP, RECOMMEND, Phase, PhaseResult, rss_kib
from servers import get, post_json, redis_server, xmr_server
from summary import summarize, table, targets
from workload import WorkloadSpec, build_requests, describe, write_requests

ROOT = Path(__file__).resolve().parents[1]
XMR = [sys.executable, "-m", "service.cli"]  # the `xmr` console script, this interpreter


def train_once(data: Path, cache: Path, config: Path) -> tuple[Path, float | None]:
    """Artifacts in `cache/artifacts`, trained with `xmr train --split none` unless present."""
    artifacts = cache / "artifacts"
    if any((artifacts / "markets").glob("*/manifest.json")):
        return artifacts, None
    started = time.monotonic()
    subprocess.run([*XMR, "train", "--data", str(data), "--out", str(artifacts),
                    "--split", "none", "--config", str(config)], check=True)
    return artifacts, time.monotonic() - started


def build_indexes(artifacts: Path) -> dict[str, Any]:
    """Run `xmr index build` for every market; per-market seconds from when each line appears
    (the first one includes the interpreter's start and imports)."""
    started = time.monotonic()
    process = subprocess.Popen([*XMR, "index", "build", "--artifacts", str(artifacts)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    markets: dict[str, float] = {}
    last = started
    for line in process.stdout:
        now = time.monotonic()
        markets[line.split(":", 1)[0]] = round(now - last, 2)
        last = now
    if process.wait() != 0:
        raise RuntimeError(f"xmr index build exited with {process.returncode}")
    return {"total_s": round(time.monotonic() - started, 2), "per_market_s": markets}


def make_plan(endpoints: list[str], concurrencies: list[int], duration_s: float, rounds: int,
              warmup_s: float) -> list[Phase]:
    """Warm-up, then per concurrency `rounds` slices of each endpoint in alternating order
    (A B, B A, ...), so drifts in machine load hit every endpoint alike."""
    plan = [Phase(e, 8, warmup_s, warmup=True) for e in endpoints]
    for concurrency in concurrencies:
        for r in range(rounds):
            order = endpoints if r % 2 == 0 else endpoints[::-1]
            offset = 997 * (r + 1) + 31 * concurrency
            plan.extend(Phase(e, concurrency, duration_s / rounds, offset=offset) for e in order)
    return plan


def encoder_batches(metrics: str) -> dict[str, float]:
    """Encoder calls and requests per call over the whole run, and the served ranking's
    second stage (mean microseconds per re-ranked request), from the server's /metrics."""
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in ("xmr_encoder_batch_size_sum", "xmr_encoder_batch_size_count"):
            values[name.rsplit("_", 1)[1]] = float(value)
        if name.startswith(("xmr_rerank_seconds_sum", "xmr_rerank_seconds_count")):
            key = "rerank_" + name.split("{")[0].rsplit("_", 1)[1]
            values[key] = values.get(key, 0.0) + float(value)
    calls, requests = values.get("count", 0.0), values.get("sum", 0.0)
    reranked = values.get("rerank_count", 0.0)
    return {"encoder_calls": calls, "mean_batch": round(requests / calls, 2) if calls else 0.0,
            "reranked": reranked,
            "rerank_mean_us": round(1e6 * values.get("rerank_sum", 0.0) / reranked, 1)
            if reranked else 0.0}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("XMR_DATA_DIR"),
                        help="Directory of <market>_5core.txt files (default: $XMR_DATA_DIR).")
    parser.add_argument("--artifacts", type=Path, help="Output of `xmr train` (default: train).")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "bench-load",
                        help="Where trained artifacts, logs and the request list go.")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench.toml",
                        help="Training config when training (few epochs; the default shape).")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="Seconds per endpoint and concurrency (split into --rounds slices).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating slices per endpoint.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds per endpoint.")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma list of concurrencies.")
    parser.add_argument("--requests", type=int, default=4000, help="Distinct requests.")
    parser.add_argument("--session-share", type=float, default=0.2,
                        help="Share of recommend requests that name a Redis session_id.")
    parser.add_argument("--no-get-noop", action="store_true", help="Skip GET /noop.")
    parser.add_argument("--skip-index-build", action="store_true",
                        help="Serve the indexes already built in --artifacts.")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra environment of the server, e.g. XMR_BATCH_MAX=16.")
    parser.add_argument("--diagnostic-zero-encoder", action="store_true",
                        help="Diagnostic, not the service: the server's ONNX encoder returns "
                             "zero vectors at no cost (benchmarks/diagnostic), so recommend's "
                             "cost without the encoder's arithmetic shows as a bound.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data or XMR_DATA_DIR is required (the real request sessions come from it)")
    return args


def main() -> None:
    args = parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    train_s = None
    artifacts = args.artifacts
    if artifacts is None:
        artifacts, train_s = train_once(args.data, args.cache, args.config)
    index = None if args.skip_index_build else build_indexes(artifacts)
    requests = build_requests(args.data, WorkloadSpec(n_requests=args.requests,
                                                      session_share=args.session_share))
    requests_file = args.cache / "requests.json"
    write_requests(requests_file, requests)
    endpoints = [NOOP, RECOMMEND] + ([] if args.no_get_noop else [GET_NOOP])
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    plan = make_plan(endpoints, concurrencies, args.duration, args.rounds, args.warmup)
    plan_file = args.cache / "plan.json"
    plan_file.write_text(json.dumps([asdict(p) for p in plan]), encoding="utf-8")
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.diagnostic_zero_encoder:
        server_env["XMR_DIAGNOSTIC_ZERO_ENCODER"] = "1"
        server_env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).with_name("diagnostic")), str(ROOT),
             os.environ.get("PYTHONPATH", "")])
    results_file = args.cache / "client-results.json"
    load_before = os.getloadavg()

    with redis_server(args.cache / "redis.log") as redis_url, \
            xmr_server(artifacts, redis_url, server_env, args.cache / "server.log") as server:
        first = requests[0]
        status, body = post_json(f"{server.url}/markets/{first.market}/recommend", first.body)
        if status != 200:
            raise RuntimeError(f"a first recommend returned {status}: {body[:300]!r}")
        rss_ready = rss_kib(server.pid)
        subprocess.run([sys.executable, str(Path(__file__).with_name("client.py")),
                        "--url", server.url, "--requests", str(requests_file),
                        "--plan", str(plan_file), "--server-pid", str(server.pid),
                        "--out", str(results_file)], check=True)
        rss_end = rss_kib(server.pid)
        batches = encoder_batches(get(f"{server.url}/metrics")[1].decode())
        hwm = next(int(line.split()[1]) for line in
                   Path(f"/proc/{server.pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))

    results = [PhaseResult(**r) for r in json.loads(results_file.read_text(encoding="utf-8"))]
    rows = summarize(results)
    goals = targets(rows)
    rss_warm = [r.server_rss_kib for r in results if r.warmup][-1]
    memory = {"rss_ready_mib": round(rss_ready / 1024, 1),
              "rss_after_warmup_mib": round(rss_warm / 1024, 1),
              "rss_end_mib": round(rss_end / 1024, 1), "rss_peak_mib": round(hwm / 1024, 1),
              "rss_after_each_phase_mib": [
                  [r.endpoint, r.concurrency, round(r.server_rss_kib / 1024, 1)] for r in results]}
    report = {
        "command": " ".join(sys.argv), "machine": machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "artifacts": str(artifacts), "train_s": train_s, "index_build": index,
        "server": {"ready_s": round(server.ready_s, 2), "env": server_env,
                   "threads": 1, "workers": 1},
        "memory": memory, "encoder_batches": batches, "workload": describe(requests),
        "plan": {"duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                 "concurrency": concurrencies, "endpoints": endpoints},
        "rows": [asdict(r) for r in rows], "targets": goals,
    }
    if args.diagnostic_zero_encoder:
        report["diagnostic"] = "zero encoder: a bound, not the service"
        print("DIAGNOSTIC RUN: the server's encoder returned zero vectors at no cost; the "
              "recommend rows are a bound, not the service")
    print(table(rows, goals))
    if index is not None:
        per_market = " ".join(f"{m}={s}" for m, s in index["per_market_s"].items())
        print(f"index build, all markets: {index['total_s']} s ({per_market})")
    print(f"server ready in {server.ready_s:.1f} s; RSS after warm-up "
          f"{memory['rss_after_warmup_mib']} MiB, at the end {memory['rss_end_mib']} MiB, "
          f"peak {memory['rss_peak_mib']} MiB")
    print(f"encoder calls {batches['encoder_calls']:.0f}, mean requests per call "
          f"{batches['mean_batch']} (whole run, warm-up and readiness probes included)")
    print(f"second stage (deeper search + ranker): {batches['reranked']:.0f} requests, "
          f"mean {batches['rerank_mean_us']} us per request")
    mix = describe(requests)
    print(f"recommend mix: {mix['n_items_requests']} item sessions "
          f"(items {mix['items_per_items_request']}) + {mix['n_session_requests']} session_id "
          f"requests; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
