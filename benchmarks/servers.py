"""The processes the load benchmark measures: a throw-away `redis-server` and `xmr serve`
(uvicorn, one worker), each on a free loopback port, started and stopped by context managers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(log: Path, timeout_s: float = 20.0) -> Iterator[str]:
    """A fresh redis-server without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found on PATH (apt-get install redis-server)")
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _redis_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {log})")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0"
    finally:
        _stop(process)


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    ready_s: float  # from spawning the process to the first 200 of /readyz


def get(url: str, timeout_s: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def post_json(url: str, body: str, timeout_s: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


@contextmanager
def xmr_server(
    artifacts: Path, redis_url: str, env: dict[str, str], log: Path, timeout_s: float = 300.0,
    source: Path | None = None,
) -> Iterator[Server]:
    """`xmr serve` in its own process with one torch thread; waits until /readyz answers 200.
    `source`: a checkout of another commit whose `service` and `training` serve instead."""
    port = free_port()
    server_env = {
        **os.environ,
        "XMR_ARTIFACTS": str(artifacts), "XMR_HOST": HOST, "XMR_PORT": str(port),
        "XMR_REDIS_URL": redis_url, "XMR_THREADS": "1", "XMR_LOG_LEVEL": "WARNING",
        **env,
    }
    url = f"http://{HOST}:{port}"
    started = time.monotonic()
    with log.open("wb") as out:
        # the `xmr` console script is `service.cli:app`; -m runs it with this interpreter
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"],
                                   env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=source)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"xmr serve exited with {process.returncode} (see {log})")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"xmr serve not ready within {timeout_s:.0f}s (see {log})")
            try:
                if get(f"{url}/readyz", timeout_s=5.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield Server(url, process.pid, time.monotonic() - started)
    finally:
        _stop(process)
