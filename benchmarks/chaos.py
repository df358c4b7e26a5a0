"""Faults under load against a real `xmr serve` (uvicorn) and a real redis-server on loopback.

1. Redis: clients append events to sessions and ask item-only recommendations; Redis is killed
   with SIGKILL and restarted on the same port. Expected: session endpoints 503 while it is down,
   item-only recommendations 200 throughout, recovery without restarting the service, and every
   event acknowledged with 2xx present at the end (Redis runs with an fsync'd append-only file).
2. Reload: clients ask recommendations while one market's checkpoint + index are swapped between
   two differently seeded models and reloaded (POST /admin/reload, and once SIGHUP). Expected:
   0 failed requests, every (model_version, index_version) one of the two valid pairs, and one
   ranking per pair for a fixed session (no response mixes versions).

    python benchmarks/chaos.py [--data DIR] [--duration S] [--down S] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from client import rss_kib
from reliability import (
    PersistentRedis,
    Tally,
    data_dir,
    item_sessions,
    run_workers,
    train_artifacts,
)
from servers import redis_server, xmr_server

from training.checkpoint import replace_dir

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "chaos-admin-token"
EVENTS_PER_SESSION = 40  # below XMR_SESSION_MAX_ITEMS=50: the cap never trims an event


async def redis_chaos(url: str, redis: PersistentRedis, market: str, sessions: list[list[str]],
                      duration_s: float, kill_at_s: float, down_s: float) -> dict[str, Any]:
    phase = "before"
    acked: dict[str, list[str]] = {}
    position = {}  # writer -> (session number, events in it)
    recovered_after_s: float | None = None
    restarted_at = 0.0

    def span(started: str) -> str:
        """The phase a request ran in, or `a->b` when the phase changed while it ran (a request
        that starts while Redis is down may be answered after the restart)."""
        return started if started == phase else f"{started}->{phase}"

    async def event(client: httpx.AsyncClient, w: int, n: int) -> tuple[str, httpx.Response]:
        nonlocal recovered_after_s
        number, count = position.get(w, (0, 0))
        session, item = f"chaos-w{w}-s{number}", f"ev-{w}-{n}"
        seen_phase = phase
        r = await client.post(f"/markets/{market}/sessions/{session}/events",
                              json={"items": [item]})
        if r.status_code == 200:
            acked.setdefault(session, []).append(item)
            count += 1
            if phase == "after" and recovered_after_s is None:
                recovered_after_s = time.monotonic() - restarted_at
        else:
            await asyncio.sleep(0.02)
        # a fresh session after a failure or when the session is full
        position[w] = (number + 1, 0) if r.status_code != 200 or count >= \
            EVENTS_PER_SESSION else (number, count)
        return f"events:{span(seen_phase)}", r

    async def recommend(client: httpx.AsyncClient, w: int, n: int) -> tuple[str, httpx.Response]:
        seen_phase = phase
        body = {"items": sessions[(w * 7919 + n) % len(sessions)], "k": 10}
        r = await client.post(f"/markets/{market}/recommend", json=body)
        return f"recommend_items:{span(seen_phase)}", r

    async def faults() -> None:
        nonlocal phase, restarted_at
        await asyncio.sleep(kill_at_s)
        await asyncio.to_thread(redis.kill)
        phase = "down"
        await asyncio.sleep(down_s)
        phase = "restarting"  # answers may be either while Redis replays its AOF
        await asyncio.to_thread(redis.start)
        restarted_at = time.monotonic()
        phase = "after"

    tallies: dict[str, Tally] = {}
    await asyncio.gather(
        run_workers(url, {"events": (4, event), "recommend": (4, recommend)}, duration_s,
                    200_000, tallies),
        faults())
    missing: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for session, events in acked.items():
            r = await client.get(f"/markets/{market}/sessions/{session}")
            stored = set(r.json()["items"]) if r.status_code == 200 else set()
            missing += [e for e in events if e not in stored]
        ready = (await client.get("/readyz")).status_code
    return {
        "acknowledged_events": sum(len(e) for e in acked.values()),
        "sessions": len(acked), "lost_acknowledged_events": len(missing),
        "recovered_after_restart_s": None if recovered_after_s is None
        else round(recovered_after_s, 3),
        "readyz_at_end": ready, "tallies": {k: t.summary() for k, t in sorted(tallies.items())},
    }


def versions(market_dir: Path) -> tuple[str, str]:
    manifest = json.loads((market_dir / "manifest.json").read_text(encoding="utf-8"))
    index = json.loads((market_dir / "index.json").read_text(encoding="utf-8"))
    return manifest["weights_sha256"][:12], index["version"]


def swap_in(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.swap")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    replace_dir(tmp, target)


async def reload_chaos(url: str, pid: int, served: Path, alternates: dict[str, Path],
                       market: str, sessions: list[list[str]], duration_s: float,
                       every_s: float) -> dict[str, Any]:
    pairs = {versions(p / "markets" / market) for p in alternates.values()}
    seen: dict[tuple[str, str], set[str]] = {}  # pair -> rankings of the probe session
    bad_pairs = 0
    reloads: list[int] = []
    stop = asyncio.Event()

    async def recommend(client: httpx.AsyncClient, w: int, n: int) -> tuple[str, httpx.Response]:
        nonlocal bad_pairs
        probe = w == 0
        body = {"items": sessions[0 if probe else (w * 7919 + n) % len(sessions)], "k": 10}
        r = await client.post(f"/markets/{market}/recommend", json=body)
        if r.status_code == 200:
            answer = r.json()
            pair = (answer["model_version"], answer["index_version"])
            if pair not in pairs:
                bad_pairs += 1
            if probe:
                seen.setdefault(pair, set()).add(json.dumps([i["item_id"] for i in
                                                             answer["items"]]))
        return "recommend_items", r

    async def swapper() -> None:
        names = sorted(alternates)
        n = 0
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + duration_s - every_s
            while time.monotonic() < deadline:
                await asyncio.sleep(every_s)
                n += 1
                source = alternates[names[n % len(names)]] / "markets" / market
                await asyncio.to_thread(swap_in, source, served / "markets" / market)
                if n == 3:  # once by signal, as an operator's `kill -HUP` would
                    os.kill(pid, signal.SIGHUP)
                    reloads.append(0)
                    continue
                r = await client.post("/admin/reload",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
                reloads.append(r.status_code)
        stop.set()

    tallies: dict[str, Tally] = {}
    await asyncio.gather(
        run_workers(url, {"recommend": (6, recommend)}, duration_s, 200_000, tallies, stop),
        swapper())
    return {
        "valid_pairs": sorted(pairs), "reloads_http": reloads.count(200),
        "reloads_sighup": reloads.count(0),
        "reload_failures": len([s for s in reloads if s not in (0, 200)]),
        "responses_with_other_pair": bad_pairs,
        "pairs_seen": sorted(seen), "rankings_per_pair": {f"{m}/{i}": len(r)
                                                          for (m, i), r in seen.items()},
        "tallies": {k: t.summary() for k, t in tallies.items()},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("XMR_DATA_DIR"),
                        help="<market>_5core.txt files (default $XMR_DATA_DIR, else synthetic).")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "reliability")
    parser.add_argument("--market", help="Market to load and swap (default: the first).")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds per scenario.")
    parser.add_argument("--kill-at", type=float, default=8.0, help="Seconds into the run.")
    parser.add_argument("--down", type=float, default=5.0, help="Seconds Redis stays down.")
    parser.add_argument("--reload-every", type=float, default=2.0, help="Seconds per swap.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = data_dir(Path(args.data) if args.data else None, args.workdir)
    trained = {f"seed{s}": train_artifacts(data, args.workdir, s)
               for s in (0, 1)}
    served = args.workdir / "serve"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(trained["seed0"], served)
    market = args.market or sorted(p.name for p in (served / "markets").iterdir())[0]
    sessions = item_sessions(served, market, 500)
    env = {"XMR_SESSION_MAX_ITEMS": "50", "XMR_ADMIN_TOKEN": TOKEN}
    report: dict[str, Any] = {"command": " ".join(sys.argv), "data": str(data),
                              "market": market, "cpus": os.cpu_count()}

    redis = PersistentRedis(args.workdir / "redis-aof")
    shutil.rmtree(redis.workdir, ignore_errors=True)
    redis.start()
    try:
        with xmr_server(served, redis.url, env, args.workdir / "server-redis.log") as server:
            rss_start = rss_kib(server.pid)
            result = asyncio.run(redis_chaos(server.url, redis, market, sessions, args.duration,
                                             args.kill_at, args.down))
            result.update(server_pid_unchanged=Path(f"/proc/{server.pid}").exists(),
                          rss_start_mib=round(rss_start / 1024, 1),
                          rss_end_mib=round(rss_kib(server.pid) / 1024, 1))
    finally:
        redis.kill()
    report["redis"] = result
    print(json.dumps({"redis": result}, indent=2))

    with redis_server(args.workdir / "redis-reload.log") as redis_url, \
            xmr_server(served, redis_url, env, args.workdir / "server-reload.log") as server:
        result = asyncio.run(reload_chaos(server.url, server.pid, served, trained, market,
                                          sessions, args.duration, args.reload_every))
    report["reload"] = result
    print(json.dumps({"reload": result}, indent=2))
    failures = check(report)
    report["failures"] = failures
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("chaos: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    sys.exit(1 if failures else 0)


def check(report: dict[str, Any]) -> list[str]:
    """What must hold; each broken expectation is one line."""
    failures = []
    redis, reload = report["redis"], report["reload"]
    tallies = redis["tallies"]
    for name, tally in tallies.items():
        kind, _, phase = name.partition(":")
        statuses = {int(s) for s in tally["statuses"]}
        if kind == "recommend_items" and statuses - {200}:
            failures.append(f"item recommendations {phase} Redis kill: {tally['statuses']}")
        if kind == "events" and phase == "down" and statuses - {503}:
            failures.append(f"session events while Redis was down: {tally['statuses']}")
        if kind == "events" and statuses - {200, 503}:
            failures.append(f"session events {phase}: {tally['statuses']}")
        if tally["transport_errors"]:
            failures.append(f"{name}: transport errors {tally['transport_errors']}")
    if redis["lost_acknowledged_events"]:
        failures.append(f"{redis['lost_acknowledged_events']} acknowledged events lost")
    if redis["recovered_after_restart_s"] is None or redis["readyz_at_end"] != 200:
        failures.append("no recovery after the Redis restart")
    for tally in reload["tallies"].values():
        if set(tally["statuses"]) - {200, "200"} or tally["transport_errors"]:
            failures.append(f"failed requests during reloads: {tally}")
    if reload["responses_with_other_pair"] or reload["reload_failures"]:
        failures.append("reload: responses outside the valid version pairs or failed reloads")
    if any(n != 1 for n in reload["rankings_per_pair"].values()):
        failures.append(f"reload: several rankings for one version {reload['rankings_per_pair']}")
    if len(reload["pairs_seen"]) < 2:
        failures.append("reload: the swapped model never answered")
    return failures


if __name__ == "__main__":
    main()
