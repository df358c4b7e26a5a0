"""The load benchmark's client: a separate process that runs a plan of closed-loop phases.

Each phase keeps `concurrency` keep-alive HTTP/1.1 connections busy for `duration_s`, one request
in flight per connection, and records every latency with its request kind and status. The
client speaks HTTP/1.1 over asyncio streams itself (request bytes encoded once up front): a
general-purpose client spends more CPU per request than a no-op server, and on a small machine
that would make the client, not the server, the measured bottleneck. Its CPU use per phase is
reported so a saturated client shows.

    python benchmarks/client.py --url URL --requests REQS.json --plan PLAN.json --out OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from workload import Request, read_requests

NOOP = "noop"  # POST /markets/{market}/noop with the same body
RECOMMEND = "recommend"  # POST /markets/{market}/recommend
GET_NOOP = "get_noop"  # GET /noop: the cheapest route


@dataclass(frozen=True)
class Phase:
    endpoint: str
    concurrency: int
    duration_s: float
    warmup: bool = False
    offset: int = 0  # where in the request list the phase starts (same for each endpoint)


@dataclass
class PhaseResult:
    endpoint: str
    concurrency: int
    warmup: bool
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    server_rss_kib: int
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)  # by request kind
    errors: dict[str, int] = field(default_factory=dict)  # "kind:status" -> count


def encode(request: Request, endpoint: str, host: str) -> bytes:
    if endpoint == GET_NOOP:
        return f"GET /noop HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    route = "recommend" if endpoint == RECOMMEND else "noop"
    body = request.body.encode()
    head = (f"POST /markets/{request.market}/{route} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One keep-alive connection; responses must carry Content-Length (uvicorn's do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, raw: bytes) -> tuple[int, bytes, bool]:
        """(status, body, server keeps the connection open)."""
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split(b" ", 2)[1])
        length, keep = 0, True
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
            elif name == b"transfer-encoding":
                raise ValueError("chunked responses are not supported by this client")
        body = await self.reader.readexactly(length) if length else b""
        return status, body, keep

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run_phase(
    phase: Phase, requests: list[Request], url: str, server_pid: int, timeout_s: float
) -> PhaseResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    encoded = [(r.kind, encode(r, phase.endpoint, parts.netloc)) for r in requests]
    order = itertools.cycle(encoded)  # shared by the workers: each request is sent once a cycle
    connections = [await Connection.open(host, port) for _ in range(phase.concurrency)]
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}

    async def worker(connection: Connection | None) -> None:
        deadline = started + phase.duration_s
        while time.perf_counter() < deadline:
            kind, raw = next(order)
            t0 = time.perf_counter()
            try:
                if connection is None:
                    connection = await Connection.open(host, port)
                status, _, keep = await asyncio.wait_for(connection.exchange(raw), timeout_s)
                outcome = str(status) if not 200 <= status < 300 else ""
                if not keep:
                    connection.close()
                    connection = None
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
                outcome = type(e).__name__
                if connection is not None:
                    connection.close()
                connection = None
            elapsed_ms = (time.perf_counter() - t0) * 1000
            if outcome:
                errors[f"{kind}:{outcome}"] = errors.get(f"{kind}:{outcome}", 0) + 1
            else:
                latencies.setdefault(kind, []).append(elapsed_ms)
        if connection is not None:
            connection.close()

    server_cpu = cpu_seconds(server_pid)
    client_cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    return PhaseResult(
        phase.endpoint, phase.concurrency, phase.warmup, wall,
        time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu,
        rss_kib(server_pid), latencies, errors,
    )


async def run_plan(
    plan: list[Phase], requests: list[Request], url: str, server_pid: int, timeout_s: float
) -> list[PhaseResult]:
    results = []
    for phase in plan:
        offset = phase.offset % len(requests)
        rotated = requests[offset:] + requests[:offset]
        results.append(await run_phase(phase, rotated, url, server_pid, timeout_s))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=Path, required=True, help="From workload.py.")
    parser.add_argument("--plan", type=Path, required=True, help="JSON list of phases.")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="Per-request timeout (s).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    plan = [Phase(**p) for p in json.loads(args.plan.read_text(encoding="utf-8"))]
    results = asyncio.run(run_plan(plan, read_requests(args.requests), args.url,
                                   args.server_pid, args.timeout))
    args.out.write_text(json.dumps([asdict(r) for r in results]), encoding="utf-8")


if __name__ == "__main__":
    main()
