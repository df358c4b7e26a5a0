"""Shared pytest fixtures. Others append fixtures here: keep additions self-contained."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# --- service fixtures: tiny trained artifacts with indexes, and a real redis-server ---------

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(scope="session")
def service_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic markets, trained for one epoch with a tiny model, indexes built (read-only)."""
    from service.demo import build_artifacts
    from training.config import FitConfig, TrainConfig
    from training.synthetic import SyntheticSpec

    config = TrainConfig(
        d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, threads=1,
        pretrain=FitConfig(max_epochs=1, batch_size=128),
        finetune=FitConfig(max_epochs=1, batch_size=128, validate_start=False),
    )
    spec = SyntheticSpec(n_items=120, users=(80, 50, 30))
    return build_artifacts(tmp_path_factory.mktemp("service"), config, spec)


@pytest.fixture(scope="session")
def model_ranking_artifacts(service_artifacts: Path,
                            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service artifacts without their fitted rankers: every market serves the model's
    own inner-product ranking (read-only)."""
    target = tmp_path_factory.mktemp("model-ranking") / "artifacts"
    shutil.copytree(service_artifacts, target)
    for path in [*target.glob("markets/*/ranker.json"), *target.glob("markets/*/neighbours-*")]:
        path.unlink()
    return target


@pytest.fixture
def artifacts_copy(service_artifacts: Path, tmp_path: Path) -> Path:
    """A private copy of the service artifacts for tests that change them."""
    target = tmp_path / "artifacts"
    shutil.copytree(service_artifacts, target)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A real redis-server on a fixed port that a test may stop and start again."""

    persistence: tuple[str, ...] = ("--appendonly", "no")  # nothing on disk by default

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *self.persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


R = TypeVar("R", bound=RedisProcess)


def running_redis(server: R) -> Iterator[R]:
    """Body of the redis-server fixtures: skip without the binary, start, always stop."""
    if not Path(REDIS_SERVER).is_file():
        pytest.skip(f"redis-server binary not found ({REDIS_SERVER}); install redis-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    yield from running_redis(RedisProcess(free_port(), tmp_path))


@pytest.fixture
def make_service_client(service_artifacts: Path):  # type: ignore[no-untyped-def]
    """`with make_service_client(**settings) as client:` a TestClient over the real app."""
    from contextlib import contextmanager

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    @contextmanager
    def make(**overrides: object) -> Iterator[TestClient]:
        values: dict[str, object] = {"artifacts": service_artifacts, "reload_on_sighup": False}
        values.update(overrides)
        with TestClient(create_app(Settings(**values))) as client:  # type: ignore[arg-type]
            yield client

    return make


# --- training fixtures: tiny synthetic markets, a tiny training config, the real data -------


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic markets (aa, bb, cc; 300 items, ~4K interactions), read-only.

    Each market has enough items for 99 sampled negatives per user (the `forec` protocol).
    """
    from training.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, SyntheticSpec())
    return out


TINY_CONFIG_TOML = """\
d_model = 16
n_layers = 1
n_heads = 2
d_ff = 32
dropout = 0.1
threads = 1

[pretrain]
max_epochs = 2
batch_size = 32

[finetune]
max_epochs = 1
batch_size = 32
"""


@pytest.fixture(scope="session")
def tiny_train_config(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A TrainConfig small enough that a whole experiment runs in seconds on one CPU thread
    (the TOML above, read the way `--config` reads it)."""
    from training.config import load_config

    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_CONFIG_TOML, encoding="utf-8")
    return load_config(path)


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    """The tiny training config as a TOML file, for CLI tests."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG_TOML, encoding="utf-8")
    return path


@pytest.fixture
def xmarket_dir() -> Path:
    """The real XMarket files from XMR_DATA_DIR; the test is skipped when it is unset."""
    import os

    value = os.environ.get("XMR_DATA_DIR")
    if not value:
        pytest.skip("XMR_DATA_DIR not set (the real XMarket files)")
    return Path(value)
