"""Soak: a bounded run of steady closed-loop load against a real `xmr serve` + redis-server,
sampling the server's RSS; then hostile input (abuse.py) against the same server. Prints RSS at
start (after warm-up), end and max, request counts and statuses.

    python benchmarks/soak.py [--data DIR] [--seconds 180] [--concurrency 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from abuse import run_abuse
from client import rss_kib
from reliability import Tally, data_dir, item_sessions, run_workers, train_artifacts
from servers import redis_server, xmr_server

ROOT = Path(__file__).resolve().parents[1]


async def soak(url: str, pid: int, markets: list[str], sessions: dict[str, list[list[str]]],
               seconds: float, concurrency: int, max_requests: int,
               sample_s: float) -> dict[str, Any]:
    """Mixed traffic: item-only recommendations, session recommendations (Redis append + read),
    event appends and session reads, over every market."""
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()

    def items_of(sessions: dict[str, list[list[str]]], market: str, w: int, n: int) -> list[str]:
        return sessions[market][(w * 7919 + n) % len(sessions[market])]

    async def step(client: httpx.AsyncClient, w: int, n: int) -> tuple[str, httpx.Response]:
        market = markets[(w + n) % len(markets)]
        items = sessions[market][(w * 7919 + n) % len(sessions[market])]
        session = f"soak-{w}-{n // 280}"  # 40 steps of each kind per session; TTL refreshed
        kind = ("recommend_items", "recommend_items", "recommend_items", "recommend_items",
                "recommend_session", "events", "get_session")[n % 7]
        if kind == "recommend_items":
            return kind, await client.post(f"/markets/{market}/recommend",
                                           json={"items": items, "k": 10})
        if kind == "recommend_session":
            return kind, await client.post(f"/markets/{market}/recommend",
                                           json={"session_id": session, "items": items[:2]})
        if kind == "events":
            return kind, await client.post(f"/markets/{market}/sessions/{session}/events",
                                           json={"items": items[:3]})
        # read back the session the previous step (n % 7 == 5) appended to
        written = markets[(w + n - 1) % len(markets)]
        r = await client.get(f"/markets/{written}/sessions/{session}")
        if r.status_code == 200 and not set(items_of(sessions, written, w, n - 1)[:3]) <= \
                set(r.json()["items"]):
            return "get_session_missing_items", r
        return kind, r

    async def sampler() -> None:
        started = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - started, 1), rss_kib(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), sample_s)

    async def run() -> None:
        await run_workers(url, {"mixed": (concurrency, step)}, seconds, max_requests, tallies)
        stop.set()

    tallies: dict[str, Tally] = {}
    await asyncio.gather(run(), sampler())
    samples.append((round(seconds, 1), rss_kib(pid)))
    rss = [kib for _, kib in samples]
    total = sum(t.n for t in tallies.values())
    return {
        "seconds": seconds, "concurrency": concurrency, "requests": total,
        "requests_per_s": round(total / seconds, 1),
        "rss_start_mib": round(rss[0] / 1024, 1), "rss_end_mib": round(rss[-1] / 1024, 1),
        "rss_max_mib": round(max(rss) / 1024, 1),
        "rss_samples_mib": [(t, round(kib / 1024, 1)) for t, kib in samples],
        "tallies": {k: t.summary() for k, t in sorted(tallies.items())},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("XMR_DATA_DIR"),
                        help="<market>_5core.txt files (default $XMR_DATA_DIR, else synthetic).")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "reliability")
    parser.add_argument("--seconds", type=float, default=180.0, help="Soak duration.")
    parser.add_argument("--warmup", type=float, default=10.0, help="Warm-up before RSS start.")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="Hard bound.")
    parser.add_argument("--abuse-rounds", type=int, default=20, help="Hostile rounds after.")
    parser.add_argument("--max-growth-mib", type=float, default=50.0,
                        help="Fail when RSS grows more than this during the soak.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = data_dir(Path(args.data) if args.data else None, args.workdir)
    artifacts = train_artifacts(data, args.workdir, 0)
    markets = sorted(p.name for p in (artifacts / "markets").iterdir() if p.is_dir())
    sessions = {m: item_sessions(artifacts, m, 300, seed=i) for i, m in enumerate(markets)}
    report: dict[str, Any] = {"command": " ".join(sys.argv), "data": str(data),
                              "cpus": os.cpu_count()}
    with redis_server(args.workdir / "redis-soak.log") as redis_url, \
            xmr_server(artifacts, redis_url, {}, args.workdir / "server-soak.log") as server:
        asyncio.run(soak(server.url, server.pid, markets, sessions, args.warmup,
                         args.concurrency, args.max_requests, args.warmup))
        result = asyncio.run(soak(server.url, server.pid, markets, sessions, args.seconds,
                                  args.concurrency, args.max_requests, 10.0))
        report["soak"] = result
        report["abuse"] = run_abuse(server.url, server.pid, markets[0], args.abuse_rounds)
    failures = []
    for name, tally in result["tallies"].items():
        if tally["transport_errors"] or any(int(s) >= 500 for s in tally["statuses"]) or \
                name == "get_session_missing_items" or (name == "get_session" and
                                                        set(tally["statuses"]) != {200}):
            failures.append(f"soak {name}: {tally}")
    growth = result["rss_end_mib"] - result["rss_start_mib"]
    if growth > args.max_growth_mib:
        failures.append(f"RSS grew {growth:.1f} MiB during the soak")
    failures += report["abuse"]["failures"]
    report["failures"] = failures
    summary = {k: v for k, v in result.items() if k != "rss_samples_mib"}
    print(json.dumps({"soak": summary, "abuse": report["abuse"]}, indent=2))
    print(f"soak: {result['requests']} requests in {args.seconds:.0f} s at concurrency "
          f"{args.concurrency}; RSS start {result['rss_start_mib']} MiB, end "
          f"{result['rss_end_mib']} MiB, max {result['rss_max_mib']} MiB")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("soak: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
