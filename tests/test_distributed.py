"""`xmr train` under `torchrun` (2 CPU processes, gloo) and as one plain process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.artifacts import CURRENT, STAGING_PREFIX, resolve_set
from training.distributed import Distributed, device_for, partition
from training.synthetic import SyntheticSpec, write_synthetic

REPO = Path(__file__).resolve().parents[1]
FIT_LINE = re.compile(
    r"rank=(?P<rank>\w+) .*fit=(?P<fit>\S+) epoch=(?P<epoch>\d+) "
    r"loss=(?P<loss>[\d.]+) valid_ndcg@10=(?P<ndcg>[\d.]+)"
)

TINY_CONFIG = """\
d_model = 16
n_layers = 1
n_heads = 2
d_ff = 32
dropout = 0.1
threads = 1

[pretrain]
lr = 0.01
batch_size = 64
max_epochs = 5
patience = 10

[finetune]
batch_size = 64
max_epochs = 2
patience = 10
"""

# Runs the real `xmr` app in each rank, with every checkpoint write recorded together with the
# rank that made it. A write from a rank other than 0 also fails that rank, so torchrun fails.
DRIVER = """\
import logging, os, sys

rank = os.environ.get("RANK", "single")
logging.basicConfig(level=logging.INFO, format=f"rank={rank} %(name)s %(message)s")

import training.train as train_module

save_checkpoint = train_module.save_checkpoint

def recorded_save(path, *args, **kwargs):
    with open(os.environ["XMR_TEST_SAVES"], "a", encoding="utf-8") as f:
        f.write(f"{rank} {path}\\n")
    if rank not in ("0", "single"):
        raise RuntimeError(f"rank {rank} tried to write {path}")
    return save_checkpoint(path, *args, **kwargs)

train_module.save_checkpoint = recorded_save

from service.cli import app

app(sys.argv[1:], prog_name="xmr")
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    write_synthetic(root / "data", SyntheticSpec(seed=0))
    (root / "tiny.toml").write_text(TINY_CONFIG, encoding="utf-8")
    (root / "driver.py").write_text(DRIVER, encoding="utf-8")
    return root


def run_train(workdir: Path, name: str, launcher: list[str]) -> tuple[Path, list[str], str]:
    """Train into workdir/name; returns the artifacts dir, the recorded saves and the log."""
    out, saves = workdir / name, workdir / f"{name}.saves"
    env = {**os.environ, "XMR_TEST_SAVES": str(saves), "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        *launcher, str(workdir / "driver.py"), "train", "--data", str(workdir / "data"),
        "--out", str(out), "--split", "full", "--config", str(workdir / "tiny.toml"),
        "--device", "cpu",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{log[-4000:]}"
    recorded = saves.read_text(encoding="utf-8").splitlines() if saves.exists() else []
    return out, recorded, log


def fit_history(log: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(rank, fit) -> [(loss, valid_ndcg@10) per epoch], from the `fit=... epoch=...` lines."""
    history: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for match in FIT_LINE.finditer(log):
        key = (match["rank"], match["fit"])
        history.setdefault(key, []).append((float(match["loss"]), float(match["ndcg"])))
    return history


def test_torchrun_two_cpu_processes_converge_and_only_rank_0_writes(workdir: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    out, saves, log = run_train(workdir, "ddp", torchrun)

    assert "distributed rank=0 world_size=2" in log
    assert "distributed rank=1 world_size=2" in log
    expected = {"global", "markets/aa", "markets/bb", "markets/cc"}
    generation = resolve_set(out)  # rank 0 trained into a staged generation, then published it
    staging = generation.with_name(STAGING_PREFIX + generation.name)
    assert sorted(saves) == sorted(f"0 {staging / name}" for name in expected), saves
    assert {p.name for p in out.iterdir()} == {CURRENT, "generations", "global", "markets"}
    assert [p.name for p in (out / "generations").iterdir()] == [generation.name]  # no strays
    assert {p.name for p in (out / "markets").iterdir()} == {"aa", "bb", "cc"}
    for name in expected:
        assert (out / name / "manifest.json").is_file()
        assert (out / name / "weights.safetensors").is_file()

    history = fit_history(log)
    for fit in ("global", "finetune-aa", "finetune-bb", "finetune-cc"):
        rank0, rank1 = history[("0", fit)], history[("1", fit)]
        # DDP keeps the replicas identical, so both ranks score the same validation NDCG.
        assert [ndcg for _, ndcg in rank0] == [ndcg for _, ndcg in rank1], fit
        assert all(loss > 0 for loss, _ in rank0 + rank1), f"{fit}: a rank ran no batches"
    losses = [loss for loss, _ in history[("0", "global")]]
    ndcgs = [ndcg for _, ndcg in history[("0", "global")]]
    assert len(losses) == 5
    assert losses[-1] < 0.85 * losses[0], losses
    assert max(ndcgs[1:]) > ndcgs[0], ndcgs


def test_train_runs_as_one_plain_process(workdir: Path) -> None:
    out, saves, log = run_train(workdir, "single", [sys.executable])

    assert "distributed rank=" not in log
    generation = resolve_set(out)
    staging = generation.with_name(STAGING_PREFIX + generation.name)
    assert sorted(saves) == sorted(
        f"single {staging / name}" for name in ("global", "markets/aa", "markets/bb", "markets/cc")
    )
    assert (out / "global" / "manifest.json").is_file()
    losses = [loss for loss, _ in fit_history(log)[("single", "global")]]
    assert losses[-1] < losses[0], losses


def test_partition_covers_every_batch_with_equal_counts() -> None:
    batches = list(range(7))
    shards = [partition(batches, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    assert set().union(*shards) == set(batches)
    assert [partition([9], rank, 2) for rank in range(2)] == [[9], [9]]
    assert partition([], 1, 2) == []


def test_single_process_shard_keeps_the_batches() -> None:
    assert Distributed.single().shard([1, 2, 3]) == [1, 2, 3]


def test_device_under_torchrun_is_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_for("cuda") == "cuda:1"
    assert device_for("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert device_for("cuda") == "cuda"
