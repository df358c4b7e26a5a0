"""`xmr index build`, `xmr serve` settings and `xmr demo` through the CLI and library calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from service.bundle import load_bundle
from service.cli import app
from service.errors import ArtifactsError
from service.index import read_index_manifest
from service.settings import Settings


def test_index_build_command_builds_the_named_markets(artifacts_copy: Path) -> None:
    for market in ("aa", "bb", "cc"):
        (artifacts_copy / "markets" / market / "index.json").unlink()
    result = CliRunner().invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                      "--market", "aa", "--market", "cc"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("aa: index ")
    assert read_index_manifest(artifacts_copy / "markets" / "cc").market == "cc"
    assert not (artifacts_copy / "markets" / "bb" / "index.json").exists()
    result = CliRunner().invoke(app, ["index", "build", "--artifacts", str(artifacts_copy)])
    assert result.exit_code == 0 and "bb: index" in result.output


def test_index_build_fails_in_one_line_on_bad_input(tmp_path: Path,
                                                    artifacts_copy: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["index", "build", "--artifacts", str(tmp_path)])
    assert missing.exit_code == 1 and "error:" in missing.output and "xmr train" in missing.output
    unknown = runner.invoke(app, ["index", "build", "--artifacts", str(artifacts_copy),
                                  "--market", "zz"])
    assert unknown.exit_code == 1 and "zz" in unknown.output


def test_settings_read_xmr_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMR_ARTIFACTS", "/srv/a")
    monkeypatch.setenv("XMR_PORT", "9001")
    monkeypatch.setenv("XMR_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("XMR_MARKETS", "de, fr")
    monkeypatch.setenv("XMR_MAX_K", "50")
    settings = Settings()
    assert settings.artifacts == Path("/srv/a") and settings.port == 9001
    assert settings.redis_url == "redis://r:6379/0" and settings.markets == ["de", "fr"]
    assert settings.max_k == 50 and settings.device == "cpu" and settings.threads == 1
    assert Settings(port=1).port == 1  # explicit values win over the environment


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_refused_clearly(service_artifacts: Path) -> None:
    with pytest.raises(ArtifactsError, match="no CUDA device"):
        load_bundle(service_artifacts, None, "faiss", "cuda")


def test_demo_trains_serves_and_recommends(tmp_path: Path) -> None:
    from service.demo import run_demo
    from training.config import FitConfig, TrainConfig
    from training.synthetic import SyntheticSpec

    tiny = TrainConfig(d_model=16, n_layers=1, d_ff=32, threads=1,
                       pretrain=FitConfig(max_epochs=1), finetune=FitConfig(max_epochs=1))
    result = run_demo(tmp_path, tiny, SyntheticSpec(n_items=80, users=(40, 30, 20)))
    assert result.response["market"] == result.market
    assert result.response["fallback"] is None
    assert len(result.response["items"]) == 5
    assert not {i["item_id"] for i in result.response["items"]} & set(result.request["items"])
    assert (result.artifacts / "markets" / result.market / "index.json").is_file()


@pytest.mark.slow
def test_xmr_demo_command_prints_a_recommendation(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output[result.output.index("{\n"):])
    assert body["fallback"] is None and len(body["items"]) == 5


def test_app_sets_up_logging_only_where_its_host_did_not(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`uvicorn --factory service.app:create_app` configures uvicorn's loggers alone."""
    import logging

    from service.app import create_app

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    create_app(Settings(artifacts=tmp_path, log_level="debug"))
    assert len(root.handlers) == 1 and root.level == logging.DEBUG
    create_app(Settings(artifacts=tmp_path))  # a host's (or the first app's) set-up stays
    assert len(root.handlers) == 1 and root.level == logging.DEBUG


def test_unknown_log_level_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from pydantic import ValidationError

    assert Settings(log_level="debug").log_level == "DEBUG"
    monkeypatch.setenv("XMR_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError, match="(?s)log_level.*unknown logging level 'loud'"):
        Settings()
    # the option's default is read from XMR_LOG_LEVEL at import, so pass the option here
    result = CliRunner().invoke(app, ["--log-level", "loud", "synthetic",
                                      "--out", str(tmp_path / "data")])
    assert result.exit_code == 2 and "unknown logging level 'loud'" in result.output
    assert not (tmp_path / "data").exists()  # refused before the command ran
