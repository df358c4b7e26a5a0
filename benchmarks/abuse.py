"""Hostile input against a real server: huge bodies (declared and chunked), huge k, thousands of
items, deep or non-UTF-8 JSON, path tricks in market and session ids. Every answer must be a 4xx,
the server's RSS must stay bounded and a normal request must be answered the same afterwards.
`run_abuse` is called by soak.py on its server; alone it starts one.

    python benchmarks/abuse.py [--data DIR] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from client import rss_kib
from reliability import data_dir, item_sessions, train_artifacts
from servers import redis_server, xmr_server

ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}


def chunked(total: int) -> Iterator[bytes]:
    """A body without Content-Length, sent in 64 KiB chunks."""
    yield b'{"items": ["'
    for _ in range(total // 65536):
        yield b"x" * 65536
    yield b'"]}'


def hostile(market: str) -> list[tuple[str, str, str, Any, dict[str, str]]]:
    """(name, method, path, body, headers)."""
    items = [f"i{n}" for n in range(5000)]
    return [
        ("8 MiB declared body", "POST", f"/markets/{market}/recommend",
         b'{"items": ["' + b"x" * (8 << 20) + b'"]}', JSON),
        ("8 MiB chunked body", "POST", f"/markets/{market}/recommend", None, JSON),
        ("k = 10**18", "POST", f"/markets/{market}/recommend", b'{"k": 1000000000000000000}', JSON),
        ("k = 1e308", "POST", f"/markets/{market}/recommend", b'{"k": 1e308}', JSON),
        ("5000 items", "POST", f"/markets/{market}/recommend",
         json.dumps({"items": items}).encode(), JSON),
        ("5000 candidates", "POST", f"/markets/{market}/recommend",
         json.dumps({"candidates": items}).encode(), JSON),
        ("5000 events", "POST", f"/markets/{market}/sessions/a/events",
         json.dumps({"items": items}).encode(), JSON),
        ("9000 numbers", "POST", f"/markets/{market}/recommend",
         json.dumps({"items": list(range(9000))}).encode(), JSON),
        ("nested 30000 deep", "POST", f"/markets/{market}/recommend",
         b"[" * 30000 + b"]" * 30000, JSON),
        ("not UTF-8", "POST", f"/markets/{market}/recommend", b'{"items": ["\xff\xfe"]}', JSON),
        ("not UTF-8, no type", "POST", f"/markets/{market}/recommend", b"\xff\xfe\x00", {}),
        ("truncated JSON", "POST", f"/markets/{market}/recommend", b'{"items": ["a", ', JSON),
        ("market ../..", "POST", "/markets/..%2F..%2Fetc%2Fpasswd/recommend", b"{}", JSON),
        ("market with NUL", "POST", f"/markets/{market}%00/recommend", b"{}", JSON),
        ("market of 5000 chars", "POST", "/markets/" + "a" * 5000 + "/recommend", b"{}", JSON),
        ("session ../../x", "GET", f"/markets/{market}/sessions/..%2F..%2Fx", None, {}),
        ("session with newline", "GET", f"/markets/{market}/sessions/a%0Ab", None, {}),
        ("session id pattern in body", "POST", f"/markets/{market}/recommend",
         b'{"session_id": "xmr:*", "items": []}', JSON),
    ]


def run_abuse(url: str, pid: int, market: str, rounds: int) -> dict[str, Any]:
    requests = hostile(market)
    normal = {"items": [], "k": 10}
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.post(f"/markets/{market}/recommend", json=normal).json()
        rss_start = rss_kib(pid)
        rss_max = rss_start
        for _ in range(rounds):
            for name, method, path, body, headers in requests:
                content = chunked(8 << 20) if name == "8 MiB chunked body" else body
                try:
                    r = client.request(method, path, content=content, headers=headers)
                except httpx.HTTPError as e:  # the server may close on a body it refused
                    statuses[f"{name}: {type(e).__name__}"] += 1
                    continue
                statuses[f"{name}: {r.status_code}"] += 1
                if not 400 <= r.status_code < 500:
                    failures.append(f"abuse {name}: {r.status_code} {r.text[:200]}")
            rss_max = max(rss_max, rss_kib(pid))
        rss_end = rss_kib(pid)
        after = client.post(f"/markets/{market}/recommend", json=normal).json()
        ready = client.get("/readyz").status_code
    if after["items"] != before["items"] or ready != 200:
        failures.append("abuse: the service answered differently afterwards")
    growth = (rss_end - rss_start) / 1024
    if growth > 100:
        failures.append(f"abuse: RSS grew {growth:.1f} MiB")
    return {"rounds": rounds, "requests": rounds * len(requests),
            "statuses": dict(sorted(statuses.items())),
            "rss_start_mib": round(rss_start / 1024, 1), "rss_end_mib": round(rss_end / 1024, 1),
            "rss_max_mib": round(rss_max / 1024, 1), "failures": sorted(set(failures))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("XMR_DATA_DIR"))
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "reliability")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = data_dir(Path(args.data) if args.data else None, args.workdir)
    artifacts = train_artifacts(data, args.workdir, 0)
    market = sorted(p.name for p in (artifacts / "markets").iterdir())[0]
    item_sessions(artifacts, market, 1)  # the market is servable
    with redis_server(args.workdir / "redis-abuse.log") as redis_url, \
            xmr_server(artifacts, redis_url, {}, args.workdir / "server-abuse.log") as server:
        result = run_abuse(server.url, server.pid, market, args.rounds)
    print(json.dumps(result, indent=2))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
