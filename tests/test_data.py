"""The interaction-file loader: ordering, de-duplication, options, and errors naming file:line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from training.data import DataError, LoaderOptions, read_dataset, read_market

HEADER = "userId itemId rate date\n"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_sequences_follow_date_then_file_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "de_5core.txt", HEADER + (
        "u1 i3 5.0 2020-01-03\n"
        "u1 i1 4.0 2020-01-01\n"
        "u1 i2 4.0 2020-01-02\n"
        "u1 i9 1.0 2020-01-02\n"  # same day as i2, later in the file
        "u2 i1 3.0 2019-05-05\n"
    ))
    log = read_market(path, "de")
    assert log.sequences == {"u1": ["i1", "i2", "i9", "i3"], "u2": ["i1"]}
    assert log.n_rows == 5 and log.n_interactions == 5


def test_repeated_user_item_rows_keep_the_first_occurrence(tmp_path: Path) -> None:
    path = _write(tmp_path / "de_5core.txt", HEADER + (
        "u1 i1 5.0 2020-01-01\n"
        "u1 i2 5.0 2020-01-02\n"
        "u1 i1 2.0 2020-01-03\n"
        "u1 i2 2.0 2020-01-04\n"
        "u1 i3 2.0 2020-01-05\n"
    ))
    log = read_market(path, "de")
    assert log.sequences["u1"] == ["i1", "i2", "i3"]
    assert log.n_rows == 5
    assert log.n_duplicates == 2
    assert log.n_interactions == 3


def test_dateless_files_keep_file_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "x_data.csv", "item,user\nb,u1\na,u1\nc,u1\na,u2\nb,u1\n")
    options = LoaderOptions(pattern="*_data.csv", sep=",", user_col="user", item_col="item",
                            date_col=None)
    log = read_market(path, "x", options)
    assert log.sequences == {"u1": ["b", "a", "c"], "u2": ["a"]}
    assert log.n_duplicates == 1


def test_headerless_files_with_named_columns_in_another_order(tmp_path: Path) -> None:
    _write(tmp_path / "ab.tsv", "2021-01-02\tz\tq\n2021-01-01\ty\tq\n")
    options = LoaderOptions(pattern="*.tsv", sep="\t", header=False,
                            columns=("when", "item", "who"), user_col="who", item_col="item",
                            date_col="when")
    dataset = read_dataset(tmp_path, options=options)
    assert dataset.market_codes == ["ab"]
    assert dataset.markets["ab"].sequences == {"q": ["y", "z"]}


def test_market_codes_come_from_file_names_and_fingerprint_tracks_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "de_5core.txt", HEADER + "u1 i1 5 2020-01-01\n")
    _write(tmp_path / "jp_5core.txt", HEADER + "u2 i1 5 2020-01-01\n")
    _write(tmp_path / "notes.txt", "not a market\n")
    first = read_dataset(tmp_path)
    assert first.market_codes == ["de", "jp"]
    assert read_dataset(tmp_path, ["jp"]).market_codes == ["jp"]
    _write(tmp_path / "jp_5core.txt", HEADER + "u2 i2 5 2020-01-01\n")
    assert read_dataset(tmp_path).fingerprint != first.fingerprint


def _error(path: Path, options: LoaderOptions | None = None) -> str:
    with pytest.raises(DataError) as caught:
        read_market(path, "de", options)
    return str(caught.value)


def test_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "de_5core.txt", HEADER + "u1 i1 5 2020-01-01\nu1 i2 5\n")
    message = _error(path)
    assert message.startswith(f"{path}:3:")
    assert "expected 4 columns, got 3" in message


def test_missing_column_names_file_and_header_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "de_5core.txt", "userId rate date\nu1 5 2020-01-01\n")
    message = _error(path)
    assert message.startswith(f"{path}:1:")
    assert "itemId" in message


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    assert "empty file" in _error(_write(tmp_path / "de_5core.txt", ""))
    assert "no interactions" in _error(_write(tmp_path / "de_5core.txt", HEADER))


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "de_5core.txt", HEADER.encode() + b"u1 \xff\xfe 5 2020-01-01\n")
    message = _error(path)
    assert message.startswith(str(path))
    assert "UTF-8" in message


def test_empty_date_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "de.csv", "userId,itemId,rate,date\nu1,i1,5,2020-01-01\nu1,i2,5,\n")
    message = _error(path, LoaderOptions(pattern="*.csv", sep=","))
    assert message.startswith(f"{path}:3:")


def test_unknown_market_is_an_error_listing_the_found_ones(tmp_path: Path) -> None:
    _write(tmp_path / "de_5core.txt", HEADER + "u1 i1 5 2020-01-01\n")
    with pytest.raises(DataError, match=r"\['zz'\].*\['de'\]"):
        read_dataset(tmp_path, ["zz"])


def test_directory_without_market_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no files matching"):
        read_dataset(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        read_dataset(tmp_path / "missing")


def test_upper_case_market_code_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "DE_5core.txt", HEADER + "u1 i1 5 2020-01-01\n")
    with pytest.raises(DataError, match="market code 'DE'"):
        read_dataset(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "data.txt"}, "must contain"),
        ({"header": False}, "need the column names"),
        ({"sep": ""}, "separator"),
    ],
)
def test_inconsistent_loader_options_are_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        LoaderOptions(**kwargs)  # type: ignore[arg-type]


def test_unknown_loader_option_is_an_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        LoaderOptions(delimiter=",")  # type: ignore[call-arg]


def _readme_counts(readme: Path) -> dict[str, tuple[int, int, int]]:
    counts = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| ([a-z]{2}) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", line)
        if match:
            users, items, rows = (int(g.replace(",", "")) for g in match.groups()[1:])
            counts[match.group(1)] = (users, items, rows)
    return counts


def test_real_xmarket_counts_match_its_readme(xmarket_dir: Path) -> None:
    expected = _readme_counts(xmarket_dir / "README.md")
    assert len(expected) == 7
    dataset = read_dataset(xmarket_dir)
    assert dataset.market_codes == sorted(expected)
    for market, (users, items, rows) in expected.items():
        log = dataset.markets[market]
        assert (len(log.sequences), len(log.items), log.n_rows) == (users, items, rows), market
    distinct = re.search(r"^\| all \| [\d,]+ \| ([\d,]+) distinct",
                         (xmarket_dir / "README.md").read_text(encoding="utf-8"), re.M)
    assert distinct is not None
    assert len(dataset.item_ids) == int(distinct.group(1).replace(",", ""))
