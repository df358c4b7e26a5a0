"""`xmr train` on tiny crafted files: truncated files, wrong columns, empty markets, a market
with one user, duplicate rows. Bad input is one clear line naming the file (and line) and exit
1 with nothing written; the documented handlings train and serve.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from training.checkpoint import file_sha256, load_checkpoint, read_checkpoint_info

runner = CliRunner()
HEADER = "userId itemId rate date\n"


@pytest.fixture(autouse=True)
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMR_LOG_LEVEL", "WARNING")


def market_rows(n_users: int, n_items: int = 40, per_user: int = 6, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [f"u{u} i{i} 5 2020-01-{d + 1:02d}\n"
             for u in range(n_users) for d, i in enumerate(rng.sample(range(n_items), per_user))]
    return "".join(lines)


def data_dir(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    """A good market `aa` plus the given files (name -> text or bytes)."""
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "aa_5core.txt").write_text(HEADER + market_rows(30))
    for name, content in files.items():
        path = data / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return data


def train(data: Path, out: Path, config: Path) -> tuple[int, str]:
    done = runner.invoke(app, ["train", "--data", str(data), "--out", str(out),
                               "--config", str(config)])
    return done.exit_code, done.output


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


GOOD = HEADER + market_rows(10, seed=1)
BAD_INPUT = [
    ("truncated mid-row", GOOD + "u99 i3 5", "bb_5core.txt:{last}: expected 4 columns, got 3"),
    ("truncated mid-character", (GOOD + "u99 i\u00e9").encode()[:-1], "not UTF-8 text"),
    ("zero bytes", b"", "empty file (expected a header)"),
    ("header only: an empty market", HEADER, "bb_5core.txt: no interactions"),
    ("wrong column names", "user item rating time\nu1 i1 5 2020\n",
     "missing column(s) ['userId', 'itemId', 'date']"),
    ("no date column", "userId itemId rate\nu1 i1 5\n", "missing column(s) ['date']"),
    ("extra column in a row", GOOD + "u1 i1 5 2020-01-01 extra\n", "expected 4 columns, got 5"),
    ("no file matches the pattern", "userId,itemId,rate,date\n", "no files matching"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_training_input_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, tiny_config_file: Path, name: str, content: str | bytes, message: str
) -> None:
    if name == "no file matches the pattern":
        data = tmp_path / "data"
        data.mkdir()
        (data / "bb.csv").write_text(content)  # type: ignore[arg-type]
    else:
        data = data_dir(tmp_path, {"bb_5core.txt": content})
    out = tmp_path / "artifacts"
    code, output = train(data, out, tiny_config_file)
    if isinstance(content, str):
        message = message.format(last=len(content.splitlines()))
    assert code == 1, output
    assert output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert message in output, output
    assert nothing_written(out)


def test_failed_retrain_leaves_the_served_artifacts_untouched(tmp_path: Path,
                                                              tiny_config_file: Path) -> None:
    data = data_dir(tmp_path, {"bb_5core.txt": GOOD})
    out = tmp_path / "artifacts"
    assert train(data, out, tiny_config_file)[0] == 0
    before = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    (data / "bb_5core.txt").write_text(GOOD + "u5 i1 5\n")
    code, output = train(data, out, tiny_config_file)
    assert code == 1 and "expected 4 columns" in output
    after = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.rglob(".*")]  # no temporary directories left behind


def test_market_with_one_user_is_trained_and_served(tmp_path: Path, tiny_config_file: Path,
                                                    make_service_client) -> None:
    """Documented handling: a one-user market is fine-tuned from the global model on that user's
    items and served; it has at most one validation user, so its metric is not a measurement.
    With a single interaction there is nothing to fine-tune on: the market gets the global
    weights with its own market embedding."""
    from service.index import build_index

    solo = HEADER + "".join(f"solo i{i} 5 2020-01-0{d + 1}\n" for d, i in enumerate([1, 2, 3, 4]))
    data = data_dir(tmp_path, {"bb_5core.txt": solo,
                               "cc_5core.txt": HEADER + "solo i7 5 2020-01-01\n"})
    out = tmp_path / "artifacts"
    code, output = train(data, out, tiny_config_file)
    assert code == 0, output
    for market, items in (("bb", {"i1", "i2", "i3", "i4"}), ("cc", {"i7"})):
        ckpt = load_checkpoint(out / "markets" / market)
        assert ckpt.market_items is not None and set(ckpt.market_items) == items
        build_index(out / "markets" / market)
    build_index(out / "markets" / "aa")
    with make_service_client(artifacts=out) as client:
        bb = client.post("/markets/bb/recommend", json={"items": ["i1"], "k": 10}).json()
        cc = client.post("/markets/cc/recommend", json={"items": ["i7"], "k": 10,
                                                         "exclude_seen": False}).json()
    assert {i["item_id"] for i in bb["items"]} == {"i2", "i3", "i4"}
    assert [i["item_id"] for i in cc["items"]] == ["i7"]


def test_duplicate_rows_are_dropped_and_counted_once(tmp_path: Path,
                                                     tiny_config_file: Path) -> None:
    """Documented handling: a user's repeated item keeps its first occurrence only."""
    rows = market_rows(10, seed=1).splitlines(keepends=True)
    plain = data_dir(tmp_path / "plain", {"bb_5core.txt": HEADER + "".join(rows)})
    doubled = data_dir(tmp_path / "doubled",
                       {"bb_5core.txt": HEADER + "".join(rows) + "".join(rows[::3])})
    counts = []
    for data in (plain, doubled):
        out = data.parent / "artifacts"
        code, output = train(data, out, tiny_config_file)
        assert code == 0, output
        counts.append(read_checkpoint_info(out / "markets" / "bb").market_items)
    assert counts[0] == counts[1]
    assert len(rows) - sum(counts[0].values()) <= 1  # 1 user's last item held out (split none)
