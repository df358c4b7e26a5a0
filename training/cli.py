"""`xmr train` (and the other training commands): thin typer bodies over library functions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config
from training.data import DataError, LoaderOptions
from training.split import SPLITS

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True, add_completion=False)

DataOpt = Annotated[Path, typer.Option("--data", help="Directory of <market>_5core.txt files.")]
MarketsOpt = Annotated[
    str | None, typer.Option("--markets", help="Comma-separated market codes (default: all).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML training config.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
SepOpt = Annotated[str | None, typer.Option("--sep", help="Column separator (default whitespace).")]
PatternOpt = Annotated[str, typer.Option("--pattern", help="File name pattern; * is the market.")]
ColumnsOpt = Annotated[
    str | None,
    typer.Option("--columns", help="Comma-separated column names for header-less files."),
]
UserColOpt = Annotated[str, typer.Option("--user-col", help="User id column.")]
ItemColOpt = Annotated[str, typer.Option("--item-col", help="Item id column.")]
DateColOpt = Annotated[
    str, typer.Option("--date-col", help="Date column; '' for files without dates (file order).")
]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def loader_options(
    pattern: str, sep: str | None, columns: str | None, user_col: str, item_col: str, date_col: str
) -> LoaderOptions:
    names = tuple(c.strip() for c in columns.split(",")) if columns else ()
    return LoaderOptions(
        pattern=pattern, sep=sep, header=not names, columns=names,
        user_col=user_col, item_col=item_col, date_col=date_col or None,
    )


def parse_markets(markets: str | None) -> list[str] | None:
    if not markets:
        return None
    return [m.strip() for m in markets.split(",") if m.strip()]


def set_threads(threads: int) -> None:
    import torch  # here, not at import: `xmr serve` on the CPU image runs without torch

    torch.set_num_threads(max(1, threads))


@app.command("train")
def train_command(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Artifacts directory to write.")],
    markets: MarketsOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="full, acmr or none (production).")
    ] = "none",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: ConfigOpt = None,
    device: DeviceOpt = "cpu",
    pattern: PatternOpt = "*_5core.txt",
    sep: SepOpt = None,
    columns: ColumnsOpt = None,
    user_col: UserColOpt = "userId",
    item_col: ItemColOpt = "itemId",
    date_col: DateColOpt = "date",
) -> None:
    """Pre-train on all markets, fine-tune per market, write ARTIFACTS/global and markets/<m>."""
    from training.data import read_dataset

    try:
        from training.distributed import Distributed, device_for
        from training.train import train_markets
    except ModuleNotFoundError as e:  # the serving image has no torch
        raise fail(f"xmr train needs {e.name}: pip install 'xmr[train]' (or use the train "
                   "image)") from e
    if split not in SPLITS:
        raise fail(f"--split must be one of {list(SPLITS)}, not {split!r}")
    try:
        train_config = load_config(config).with_overrides(seed=seed)
        options = loader_options(pattern, sep, columns, user_col, item_col, date_col)
        dataset = read_dataset(data, parse_markets(markets), options)
    except (ConfigError, DataError) as e:
        raise fail(str(e)) from e
    set_threads(train_config.threads)
    resolved = device_for(device)
    dist = Distributed.from_env(resolved)
    try:
        results = train_markets(dataset, out, train_config, split, resolved, dist)
    except (DataError, CheckpointError) as e:
        raise fail(str(e)) from e
    finally:
        dist.close()
    if dist.is_main:
        for name, result in results.items():
            metric = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
            typer.echo(f"{name}: valid_ndcg@10={metric} "
                       f"epochs={result.epochs_run} seconds={result.seconds:.1f}")
        typer.echo(f"wrote {out}")


@app.command("synthetic")
def synthetic_command(
    out: Annotated[Path, typer.Option("--out", help="Directory to write <market>_5core.txt to.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    items: Annotated[int | None, typer.Option(
        "--items", min=1, help="Catalogue size: writes the scale workload (default 100000 "
        "when another size option is given).")] = None,
    markets: Annotated[int | None, typer.Option(
        "--markets", min=1, help="Markets of the scale workload (default 7).")] = None,
    users: Annotated[int | None, typer.Option(
        "--users", min=1, help="Users over all markets (default 50000).")] = None,
    popularity_exponent: Annotated[float | None, typer.Option(
        "--popularity-exponent", help="Item popularity ~ rank^-a (default 1.0).")] = None,
    overlap: Annotated[float | None, typer.Option(
        "--overlap", help="Share of the catalogue every market sells (default 0.3).")] = None,
) -> None:
    """Write deterministic synthetic markets: without size options the demo's three small
    markets (aa, bb, cc); with any of them the scale workload (markets m00, m01, ...):
    power-law popularity, overlapping catalogues, sessions drawn from latent topics."""
    from training.synthetic import ScaleSpec, SyntheticSpec, write_scale, write_synthetic

    given = {"n_items": items, "n_markets": markets, "n_users": users,
             "popularity_exponent": popularity_exponent, "overlap": overlap}
    scale = {k: v for k, v in given.items() if v is not None}
    if not scale:
        for path in write_synthetic(out, SyntheticSpec(seed=seed)):
            typer.echo(f"wrote {path}")
        return
    try:
        spec = ScaleSpec(seed=seed, **scale)  # type: ignore[arg-type]
    except ValueError as e:
        raise fail(str(e)) from e
    written = write_scale(out, spec)
    for path, n_users, n_rows in written:
        typer.echo(f"wrote {path} users={n_users} interactions={n_rows}")
    typer.echo(f"{spec.n_items} items, {spec.n_markets} markets, "
               f"{sum(n for _, n, _ in written)} users, {sum(r for *_, r in written)} "
               "interactions")


@app.command("experiment")
def experiment_command(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory for results, reports and plots.")],
    protocol: Annotated[
        list[str],
        typer.Option("--protocol", help="full, forec or acmr; repeat it or give a comma list."),
    ],
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Run seeds 0..N-1.")] = 5,
    markets: MarketsOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "cpu",
    jobs: Annotated[
        int, typer.Option("--jobs", min=1, help="Worker processes for (split, seed) runs.")
    ] = 1,
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Models to run (comma list; default all)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Keep trained models here and reuse them when the data, "
                     "split, seed and training config match (rescoring without retraining)."),
    ] = None,
    pattern: PatternOpt = "*_5core.txt",
    sep: SepOpt = None,
    columns: ColumnsOpt = None,
    user_col: UserColOpt = "userId",
    item_col: ItemColOpt = "itemId",
    date_col: DateColOpt = "date",
) -> None:
    """Train and score Bert4XMR and the baselines per market; write results, report and plots.

    With one protocol the outputs go to OUT; with several to OUT/<protocol>. `full` and `forec`
    share a split, so their models are trained once per seed.
    """
    from training.data import read_dataset
    from training.distributed import device_for
    from training.experiment import ExperimentError, parse_protocols, run_experiment
    from training.report import output_dirs, write_outputs

    try:
        protocols = parse_protocols(protocol)
        train_config = load_config(config)
        options = loader_options(pattern, sep, columns, user_col, item_col, date_col)
        dataset = read_dataset(data, parse_markets(markets), options)
        set_threads(train_config.threads)
        dirs = output_dirs(out, protocols)
        results = run_experiment(
            dataset, protocols, list(range(seeds)), train_config,
            {p: d / "negatives" for p, d in dirs.items()}, device_for(device), jobs,
            models, cache,
        )
        for name, result in results.items():
            for path in write_outputs(result, dirs[name]):
                typer.echo(f"wrote {path}")
    except (ConfigError, DataError, ExperimentError) as e:
        raise fail(str(e)) from e
