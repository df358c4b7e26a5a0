"""`xmr train` and `xmr import` publish whole generations: checkpoints and indexes of every
market together, or nothing; a load resolves `current` once and never mixes two sets."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service import artifacts as artifact_set
from service.artifacts import CURRENT, generations, publish, resolve_set, staged_generation
from service.bundle import load_bundle
from service.cli import app
from service.errors import ArtifactsError

runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMR_LOG_LEVEL", "WARNING")


def train(data: Path, artifacts: Path, config: Path) -> str:
    done = runner.invoke(app, ["train", "--data", str(data), "--out", str(artifacts),
                               "--config", str(config)])
    assert done.exit_code == 0, done.output
    return done.output


def versions(artifacts: Path) -> dict[str, str]:
    """(market -> model version) of what a load serves now."""
    return {m: model.model_version
            for m, model in load_bundle(artifacts, None, "faiss", "cpu").markets.items()}


def test_train_publishes_a_servable_set_and_keeps_two_generations(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    output = train(synthetic_data_dir, artifacts, tiny_config_file)
    assert "3 markets, indexes built" in output
    first = resolve_set(artifacts)
    assert (artifacts / CURRENT).is_symlink() and first.parent == artifacts / "generations"
    assert sorted(versions(artifacts)) == ["aa", "bb", "cc"]  # no `xmr index build` needed
    # the tools' paths follow `current`
    assert (artifacts / "markets" / "aa" / "index.json").is_file()

    # A second run (another seed: other weights) replaces the whole set; the first is kept
    # for loaders that resolved it just before the swap; a third removes the first.
    assert artifact_set.KEEP == 2
    done = runner.invoke(app, ["train", "--data", str(synthetic_data_dir), "--out",
                               str(artifacts), "--config", str(tiny_config_file), "--seed", "1"])
    assert done.exit_code == 0, done.output
    second = resolve_set(artifacts)
    assert second != first and first.is_dir()
    assert set(versions(artifacts).values()).isdisjoint(
        {model.model_version for model in load_bundle(first, None, "faiss", "cpu")
         .markets.values()})
    train(synthetic_data_dir, artifacts, tiny_config_file)
    assert not first.exists() and second.is_dir()
    assert len(generations(artifacts)) == 2
    assert not list((artifacts / "generations").glob(".staging-*"))


def test_everything_training_writes_is_published(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Files that training adds beside a checkpoint (a re-ranker, say) travel with it."""
    import training.train

    real = training.train.train_markets

    def with_extra_files(dataset, out, *args, **kwargs):  # type: ignore[no-untyped-def]
        results = real(dataset, out, *args, **kwargs)
        for market_dir in (out / "markets").iterdir():
            (market_dir / "ranker.json").write_text('{"weights": [1.0]}')
        (out / "global" / "notes.txt").write_text("trained")
        return results

    monkeypatch.setattr(training.train, "train_markets", with_extra_files)
    artifacts = tmp_path / "artifacts"
    train(synthetic_data_dir, artifacts, tiny_config_file)
    current = resolve_set(artifacts)
    assert (current / "global" / "notes.txt").read_text() == "trained"
    for market in ("aa", "bb", "cc"):
        assert (current / "markets" / market / "ranker.json").is_file()


def test_failed_training_publishes_nothing(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    train(synthetic_data_dir, artifacts, tiny_config_file)
    before = (resolve_set(artifacts), versions(artifacts))
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_data_dir, broken)
    with (broken / "bb_5core.txt").open("a") as f:
        f.write("only-two columns\n")
    done = runner.invoke(app, ["train", "--data", str(broken), "--out", str(artifacts),
                               "--config", str(tiny_config_file)])
    assert done.exit_code == 1
    assert "bb_5core.txt" in done.output
    assert (resolve_set(artifacts), versions(artifacts)) == before
    assert not list((artifacts / "generations").glob(".staging-*"))


def test_a_failed_index_build_publishes_nothing(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.index
    from service.errors import IndexLoadError

    real = service.index.build_index

    def fail_on_cc(market_dir: Path):  # type: ignore[no-untyped-def]
        if market_dir.name == "cc":
            raise IndexLoadError(f"{market_dir}: disk full")
        return real(market_dir)

    monkeypatch.setattr(service.index, "build_index", fail_on_cc)
    artifacts = tmp_path / "artifacts"
    done = runner.invoke(app, ["train", "--data", str(synthetic_data_dir), "--out",
                               str(artifacts), "--config", str(tiny_config_file)])
    assert done.exit_code == 1
    assert "nothing published" in done.output and "disk full" in done.output
    assert not (artifacts / CURRENT).exists() and generations(artifacts) == []
    assert not list((artifacts / "generations").glob(".staging-*"))


def test_import_publishes_checkpoints_of_another_run(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    train(synthetic_data_dir, source, tiny_config_file)
    artifacts = tmp_path / "artifacts"
    done = runner.invoke(app, ["import", "--checkpoints", str(source), "--artifacts",
                               str(artifacts)])
    assert done.exit_code == 0, done.output
    assert versions(artifacts) == versions(source)
    missing = runner.invoke(app, ["import", "--checkpoints", str(tmp_path / "none"),
                                  "--artifacts", str(artifacts)])
    assert missing.exit_code == 1 and "no global/manifest.json" in missing.output


def test_loads_during_publishes_see_one_whole_set(
    synthetic_data_dir: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    """Two sets published in turn while another thread loads: every load is one of them."""
    artifacts, other = tmp_path / "artifacts", tmp_path / "other"
    train(synthetic_data_dir, artifacts, tiny_config_file)
    done = runner.invoke(app, ["train", "--data", str(synthetic_data_dir), "--out", str(other),
                               "--config", str(tiny_config_file), "--seed", "1"])
    assert done.exit_code == 0, done.output
    first = tmp_path / "first"
    shutil.copytree(resolve_set(artifacts), first)
    sets = [versions(first), versions(other)]
    assert sets[0] != sets[1]
    stop = threading.Event()
    seen: list[dict[str, str]] = []

    def load_until_stopped() -> None:
        while not stop.is_set():
            seen.append(versions(artifacts))

    loader = threading.Thread(target=load_until_stopped)
    loader.start()
    try:
        for n in range(8):
            with staged_generation(artifacts) as staging:
                source = resolve_set(other) if n % 2 == 0 else first
                shutil.copytree(source, staging, dirs_exist_ok=True)
                publish(artifacts, staging, keep=20)  # none removed under a slow load here
    finally:
        stop.set()
        loader.join(timeout=60)
    assert len(seen) > 1
    assert all(s in sets for s in seen)


def test_a_dangling_current_is_named(tmp_path: Path) -> None:
    (tmp_path / "generations").mkdir()
    os.symlink("generations/gone", tmp_path / CURRENT)
    with pytest.raises(ArtifactsError, match="points to generations/gone, which is missing"):
        resolve_set(tmp_path)
    with pytest.raises(ArtifactsError, match="current: points to"):
        load_bundle(tmp_path, None, "faiss", "cpu")
