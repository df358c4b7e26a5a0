"""Reading per-market interaction files into time-ordered user sequences.

The default format is XMarket's `<market>_5core.txt`: whitespace-separated, header
`userId itemId rate date`. Other separators, column names or orders and files without dates are
explicit options. A malformed file fails with one error naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MARKET_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class DataError(ValueError):
    """Malformed or unusable input data; the message names the file (and line)."""


@dataclass(frozen=True)
class LoaderOptions:
    """How to read interaction files.

    `sep=None` splits on runs of whitespace. Without a header, `columns` names the columns in
    order. `date_col=None` means the file has no dates: file order is time order.
    """

    pattern: str = "*_5core.txt"
    sep: str | None = None
    header: bool = True
    columns: tuple[str, ...] = ()
    user_col: str = "userId"
    item_col: str = "itemId"
    date_col: str | None = "date"

    def __post_init__(self) -> None:
        if "*" not in self.pattern:
            raise DataError(f"file pattern {self.pattern!r} must contain '*' (the market code)")
        if not self.header and not self.columns:
            raise DataError("files without a header need the column names (columns=...)")
        if self.sep == "":
            raise DataError("separator must not be empty")

    def market_of(self, path: Path) -> str | None:
        prefix, _, suffix = self.pattern.partition("*")
        name = path.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            return None
        return name[len(prefix) : len(name) - len(suffix)] or None


@dataclass
class MarketLog:
    """One market's interactions: each user's distinct items in time order."""

    market: str
    sequences: dict[str, list[str]]
    n_rows: int
    n_duplicates: int = 0

    @property
    def items(self) -> set[str]:
        return {item for seq in self.sequences.values() for item in seq}

    @property
    def n_interactions(self) -> int:
        return sum(len(seq) for seq in self.sequences.values())


@dataclass
class Dataset:
    """All markets read from one directory, with a fingerprint of the files' bytes."""

    markets: dict[str, MarketLog]
    fingerprint: str
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def market_codes(self) -> list[str]:
        return sorted(self.markets)

    @property
    def item_ids(self) -> set[str]:
        return {item for log in self.markets.values() for item in log.items}


def _split_line(line: str, sep: str | None) -> list[str]:
    if sep is None:
        return line.split()
    return next(csv.reader([line], delimiter=sep)) if len(sep) == 1 else line.split(sep)


def read_market(path: Path, market: str, options: LoaderOptions | None = None) -> MarketLog:
    """Read one market file. Users' items are ordered by (date, row in file), duplicates dropped.

    A user's repeated item is kept at its first occurrence only: every protocol treats a session
    as a set of distinct items, and the held-out item must never also be a training item.
    """
    options = options or LoaderOptions()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = text.splitlines()
    line_no = 0
    if options.header:
        while line_no < len(lines) and not lines[line_no].strip():
            line_no += 1
        if line_no == len(lines):
            raise DataError(f"{path}: empty file (expected a header)")
        columns = _split_line(lines[line_no].strip(), options.sep)
        line_no += 1
    else:
        columns = list(options.columns)
    wanted = [options.user_col, options.item_col]
    if options.date_col is not None:
        wanted.append(options.date_col)
    missing = [c for c in wanted if c not in columns]
    if missing:
        where = f"{path}:{line_no}" if options.header else str(path)
        raise DataError(f"{where}: missing column(s) {missing}; columns are {columns}")
    user_at, item_at = columns.index(options.user_col), columns.index(options.item_col)
    date_at = columns.index(options.date_col) if options.date_col is not None else None

    # Columns of strings, sorted by index below: no container object per row, which the
    # cyclic GC would walk again and again while millions of rows are read.
    users: list[str] = []
    items: list[str] = []
    dates: list[str] = []
    n_columns = len(columns)
    for offset, raw in enumerate(lines[line_no:], start=line_no + 1):
        if options.sep is None:
            fields = raw.split()  # splitting on whitespace strips the fields too
            if not fields:
                continue
        else:
            line = raw.strip()
            if not line:
                continue
            fields = _split_line(line, options.sep)
        if len(fields) != n_columns:
            raise DataError(f"{path}:{offset}: expected {n_columns} columns, got {len(fields)}")
        user, item = fields[user_at].strip(), fields[item_at].strip()
        if not user or not item:
            raise DataError(f"{path}:{offset}: empty user or item id")
        if date_at is not None:
            date = fields[date_at].strip()
            if not date:
                raise DataError(f"{path}:{offset}: empty date")
            dates.append(date)
        users.append(user)
        items.append(item)
    if not users:
        raise DataError(f"{path}: no interactions")
    # by (date, row in file): the sort is stable; a date-less file keeps file order
    order = sorted(range(len(users)), key=dates.__getitem__) if dates else range(len(users))

    sequences: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    n_duplicates = 0
    for i in order:
        user, item = users[i], items[i]
        user_items = seen.get(user)
        if user_items is None:
            seen[user] = {item}
            sequences[user] = [item]
        elif item in user_items:
            n_duplicates += 1
        else:
            user_items.add(item)
            sequences[user].append(item)
    return MarketLog(market, sequences, n_rows=len(users), n_duplicates=n_duplicates)


def read_dataset(
    data_dir: Path, markets: list[str] | None = None, options: LoaderOptions | None = None
) -> Dataset:
    """Read every market file in `data_dir` (or only `markets`), market code from the file name."""
    options = options or LoaderOptions()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    found: dict[str, Path] = {}
    for path in sorted(data_dir.glob(options.pattern)):
        market = options.market_of(path)
        if market is None or not path.is_file():
            continue
        if not MARKET_CODE.match(market):
            raise DataError(f"{path}: market code {market!r} must be lower-case [a-z0-9_]")
        found[market] = path
    if not found:
        raise DataError(f"{data_dir}: no files matching {options.pattern!r}")
    if markets:
        unknown = [m for m in markets if m not in found]
        if unknown:
            raise DataError(f"{data_dir}: no file for market(s) {unknown}; found {sorted(found)}")
        found = {m: found[m] for m in markets}
    digest = hashlib.sha256()
    logs: dict[str, MarketLog] = {}
    files: dict[str, str] = {}
    for market in sorted(found):
        path = found[market]
        data = path.read_bytes()
        file_digest = hashlib.sha256(data).hexdigest()
        digest.update(f"{market}:{file_digest}\n".encode())
        files[market] = file_digest
        logs[market] = read_market(path, market, options)
        log = logs[market]
        logger.info(
            "read market=%s users=%d interactions=%d duplicates_dropped=%d",
            market,
            len(log.sequences),
            log.n_interactions,
            log.n_duplicates,
        )
    return Dataset(logs, digest.hexdigest(), source=str(data_dir), files=files)
