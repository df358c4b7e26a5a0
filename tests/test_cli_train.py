"""`xmr train` then `xmr experiment` end to end through the real console-script app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from training.checkpoint import load_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMR_LOG_LEVEL", "WARNING")


def test_train_then_experiment_with_two_seeds(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    trained = runner.invoke(app, ["train", "--data", str(synthetic_data_dir), "--out",
                                  str(artifacts), "--config", str(tiny_config_file)])
    assert trained.exit_code == 0, trained.output
    assert load_checkpoint(artifacts / "markets" / "cc").manifest.market == "cc"

    out = tmp_path / "experiment"
    args = ["experiment", "--data", str(synthetic_data_dir), "--out", str(out), "--protocol",
            "full", "--protocol", "forec", "--seeds", "2", "--config", str(tiny_config_file),
            "--markets", "aa,cc"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    for protocol in ("full", "forec"):
        data = json.loads((out / protocol / "results.json").read_text())
        assert data["protocol"] == protocol
        assert data["seeds"] == [0, 1]
        assert set(data["markets"]) == {"aa", "cc"}
        stds = [stat["std"] for stat in data["markets"]["aa"]["bert4xmr"].values()]
        assert any(std > 0 for std in stds)  # the seed changes the model
        report = (out / protocol / "report.md").read_text()
        assert "validation items only" in report
        assert f"wrote {out / protocol / 'ndcg10.png'}" in done.output
    assert sorted(p.name for p in (out / "forec" / "negatives").iterdir()) == [
        "aa-seed0.npz", "aa-seed1.npz", "cc-seed0.npz", "cc-seed1.npz"]


def test_experiment_with_one_protocol_writes_into_out(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    done = runner.invoke(app, ["experiment", "--data", str(synthetic_data_dir), "--out",
                               str(tmp_path), "--protocol", "acmr", "--seeds", "1",
                               "--config", str(tiny_config_file), "--markets", "bb"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "acmr"
    assert (tmp_path / "negatives" / "bb-seed0.npz").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--protocol", "random"], "unknown protocol"),
        (["--protocol", "full", "--markets", "zz"], "no file for market"),
    ],
)
def test_experiment_errors_are_one_line_and_nonzero(
    synthetic_data_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    done = runner.invoke(app, ["experiment", "--data", str(synthetic_data_dir), "--out",
                               str(tmp_path), *extra])
    assert done.exit_code == 1
    assert done.output.startswith("error: ") and message in done.output
    assert done.output.count("\n") == 1


def test_unknown_cli_option_is_an_error(synthetic_data_dir: Path, tmp_path: Path) -> None:
    done = runner.invoke(app, ["experiment", "--data", str(synthetic_data_dir), "--out",
                               str(tmp_path), "--protocol", "full", "--delimiter", ","])
    assert done.exit_code == 2
    assert "--delimiter" in done.output


def test_bad_config_key_is_a_clean_error(
    synthetic_data_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("d_modle = 16\n")
    done = runner.invoke(app, ["experiment", "--data", str(synthetic_data_dir), "--out",
                               str(tmp_path), "--protocol", "full", "--config", str(config)])
    assert done.exit_code == 1
    assert "d_modle" in done.output


def test_malformed_data_file_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "de_5core.txt").write_text("userId itemId rate date\nu1 i1 5\n")
    done = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "a")])
    assert done.exit_code == 1
    assert f"{data / 'de_5core.txt'}:2: expected 4 columns" in done.output
