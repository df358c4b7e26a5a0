"""The container scripts of deploy/docker: the artifacts job (`xmr-prepare`) and the replica
reload after a rebuild (`xmr-reload-replicas`), run as the image runs them."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "deploy" / "docker" / "xmr-prepare"
RELOAD = REPO / "deploy" / "docker" / "xmr-reload-replicas"

TINY_CONFIG = """\
d_model = 16
n_layers = 1
n_heads = 2
d_ff = 32
threads = 1

[pretrain]
max_epochs = 2

[finetune]
max_epochs = 1
"""


def run_prepare(tmp: Path, artifacts: Path, **env: str) -> subprocess.CompletedProcess[str]:
    config = tmp / "tiny.toml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp),
        "XMR_ARTIFACTS": str(artifacts),
        "XMR_DATA_DIR": str(tmp / "no-data"),
        "XMR_IMPORT_DIR": str(tmp / "no-import"),
        "XMR_TRAIN_CONFIG": str(config),
        **env,
    }
    return subprocess.run(["sh", str(PREPARE)], env=full_env, capture_output=True, text=True,
                          timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run of the job on an empty volume: synthetic data, training, indexes."""
    tmp = tmp_path_factory.mktemp("prepare")
    artifacts = tmp / "artifacts"
    done = run_prepare(tmp, artifacts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training on the synthetic demo data" in done.stderr
    return tmp, artifacts


def test_prepare_trains_on_synthetic_data_and_builds_every_index(
    prepared: tuple[Path, Path],
) -> None:
    _, artifacts = prepared
    assert (artifacts / "global" / "manifest.json").is_file()
    markets = sorted(p.name for p in (artifacts / "markets").iterdir())
    assert markets == ["aa", "bb", "cc"]
    for market in markets:
        assert (artifacts / "markets" / market / "index.json").is_file()
        assert list((artifacts / "markets" / market).glob("index-*.faiss"))


def test_prepare_again_keeps_the_checkpoints_and_rebuilds_indexes(
    prepared: tuple[Path, Path],
) -> None:
    tmp, artifacts = prepared
    weights = artifacts / "markets" / "aa" / "weights.safetensors"
    before = digest(weights)
    done = run_prepare(tmp, artifacts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoints present" in done.stderr
    assert digest(weights) == before


def test_prepare_imports_checkpoints_instead_of_training(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    _, source = prepared
    artifacts = tmp_path / "imported"
    done = run_prepare(tmp_path, artifacts, XMR_IMPORT_DIR=str(source))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "importing checkpoints" in done.stderr
    assert "fit=global" not in done.stderr
    for name in ("global", "markets/aa", "markets/bb", "markets/cc"):
        assert digest(artifacts / name / "weights.safetensors") == digest(
            source / name / "weights.safetensors"
        )
    assert (artifacts / "markets" / "cc" / "index.json").is_file()
    assert not list(artifacts.rglob("*.importing"))


def test_prepare_refuses_synthetic_data_when_real_data_is_required(tmp_path: Path) -> None:
    done = run_prepare(tmp_path, tmp_path / "artifacts", XMR_REQUIRE_DATA="1")
    assert done.returncode == 1
    assert "XMR_REQUIRE_DATA=1" in done.stderr
    assert not (tmp_path / "artifacts" / "global").exists()


class ReloadHandler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server hook name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def replica() -> Iterator[int]:
    ReloadHandler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReloadHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_reload(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RELOAD)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_reload_posts_the_admin_token_to_each_replica(replica: int) -> None:
    done = run_reload(XMR_RELOAD_SERVICE="127.0.0.1", XMR_RELOAD_PORT=str(replica),
                      XMR_ADMIN_TOKEN="s3cret")
    assert done.returncode == 0, done.stderr
    assert ReloadHandler.seen == [("/admin/reload", "Bearer s3cret")]
    assert "replicas=1 failed=0" in done.stderr


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reload_fails_when_a_replica_does_not_answer() -> None:
    done = run_reload(XMR_RELOAD_SERVICE="127.0.0.1", XMR_RELOAD_PORT=str(closed_port()),
                      XMR_ADMIN_TOKEN="s3cret")
    assert done.returncode == 1
    assert "failed=1" in done.stderr


def test_reload_needs_a_token() -> None:
    done = run_reload(XMR_RELOAD_SERVICE="127.0.0.1", XMR_ADMIN_TOKEN="")
    assert done.returncode == 2
