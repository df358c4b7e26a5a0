"""The reliability rig shared by chaos.py, soak.py, fuzz.py and abuse.py: tiny trained artifacts,
a redis-server that survives `kill -9` (append-only file, fsync before every reply), and a
bounded closed-loop traffic generator that records every status.

The server and its helpers come from servers.py (the load benchmark's): `xmr serve` in its own
process on a free loopback port, `free_port`, and `rss_kib` from client.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from servers import HOST, _redis_ping, free_port

XMR = [sys.executable, "-m", "service.cli"]  # the `xmr` console script, this interpreter

# One epoch of a tiny model: the rig measures behaviour under faults, not quality.
TINY_CONFIG = """\
d_model = 16
n_layers = 1
n_heads = 2
d_ff = 32
dropout = 0.1
threads = 1

[pretrain]
max_epochs = 1
batch_size = 128

[finetune]
max_epochs = 1
batch_size = 128
validate_start = false
"""


def data_dir(data: Path | None, workdir: Path) -> Path:
    """The given data, or the deterministic synthetic markets (`xmr synthetic`) in `workdir`."""
    if data is not None:
        return data
    out = workdir / "synthetic"
    if not out.is_dir():
        subprocess.run([*XMR, "synthetic", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def train_artifacts(data: Path, workdir: Path, seed: int, markets: str | None = None) -> Path:
    """`xmr train` (tiny config, this seed) then `xmr index build` into
    `workdir/artifacts-<data dir name>-seed<seed>`; reused when present."""
    out = workdir / f"artifacts-{data.name}-seed{seed}"
    if any((out / "markets").glob("*/index.json")):
        return out
    config = out.parent / "tiny.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(TINY_CONFIG, encoding="utf-8")
    env = {**os.environ, "XMR_LOG_LEVEL": "WARNING"}
    train = [*XMR, "train", "--data", str(data), "--out", str(out), "--config", str(config),
             "--seed", str(seed)] + (["--markets", markets] if markets else [])
    subprocess.run(train, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*XMR, "index", "build", "--artifacts", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return out


class PersistentRedis:
    """redis-server with `--appendonly yes --appendfsync always` in `workdir`: a write is on
    disk before Redis acknowledges it, so `kill -9` + restart keeps every acknowledged write.
    (With `--save ""` and no AOF, as in servers.redis_server, a restart loses everything.)"""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while not _redis_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.workdir})")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None


@dataclass
class Tally:
    """Every answer of one kind of request: statuses, transport errors, latencies."""

    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    @property
    def server_errors(self) -> int:
        return sum(c for s, c in self.statuses.items() if s >= 500)

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies_ms)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (
            lambda q: None)
        return {"requests": self.n, "statuses": dict(sorted(self.statuses.items())),
                "transport_errors": dict(self.transport_errors),
                "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


Step = Callable[[httpx.AsyncClient, int, int], Awaitable[tuple[str, httpx.Response]]]


async def run_workers(url: str, workers: dict[str, tuple[int, Step]], duration_s: float,
                      max_requests: int, tallies: dict[str, Tally],
                      stop: asyncio.Event | None = None) -> None:
    """Closed loop: `workers[name] = (count, step)`; each worker calls `step(client, worker,
    n)` until `duration_s` passes, `max_requests` are sent in all, or `stop` is set."""
    stop = stop or asyncio.Event()
    deadline = time.monotonic() + duration_s
    sent = 0

    async def loop(name: str, worker: int, step: Step) -> None:
        nonlocal sent
        n = 0
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            while not stop.is_set() and time.monotonic() < deadline and sent < max_requests:
                sent += 1
                started = time.perf_counter()
                try:
                    kind, response = await step(client, worker, n)
                except httpx.HTTPError as e:
                    tallies.setdefault(name, Tally()).transport_errors[type(e).__name__] += 1
                    await asyncio.sleep(0.05)
                else:
                    tallies.setdefault(kind, Tally()).statuses[response.status_code] += 1
                    tallies[kind].latencies_ms.append(1000 * (time.perf_counter() - started))
                n += 1

    await asyncio.gather(*(loop(name, w, step) for name, (count, step) in workers.items()
                           for w in range(count)))


def item_sessions(artifacts: Path, market: str, n: int, seed: int = 0) -> list[list[str]]:
    """Sessions of 1-10 items sold in the market (from its checkpoint's sold items)."""
    from training.checkpoint import read_checkpoint_info

    items = list(read_checkpoint_info(artifacts / "markets" / market).market_items or {})
    rng = random.Random(seed)
    return [rng.sample(items, min(len(items), rng.randint(1, 10))) for _ in range(n)]
