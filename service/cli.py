"""The `xmr` console script: training commands plus the service's index, serve and demo.
`xmr train` here publishes what it trains together with the indexes (`service.artifacts`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from service.index_manifest import EXACT_MAX_ITEMS
from training.cli import app as training_app
from training.cli import train_command

app = typer.Typer(
    no_args_is_help=True, add_completion=False,
    help="Cross-market recommendation: train Bert4XMR, build indexes, serve.",
)
index_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Per-market FAISS indexes.")
app.add_typer(index_app, name="index")


@app.callback()
def main(
    log_level: str = typer.Option(
        os.environ.get("XMR_LOG_LEVEL", "INFO"), "--log-level", help="Logging level."
    ),
) -> None:
    from service.settings import LOG_FORMAT, LOG_LEVELS

    if log_level.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"unknown logging level {log_level!r}; one of "
                                 f"{', '.join(LOG_LEVELS)} (--log-level or XMR_LOG_LEVEL)")
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def published(train: Callable[..., None]) -> Callable[..., None]:
    """`xmr train` (same options) that writes a new generation of ARTIFACTS, builds every
    market's index in it and only then publishes it: a reload sees the old set or the new one."""

    @functools.wraps(train)
    def command(*args: Any, out: Path, **kwargs: Any) -> None:
        from service.artifacts import CURRENT, index_generation, publish, staged_generation
        from service.errors import ServiceError
        from training.checkpoint import CheckpointError

        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes
            train(*args, out=out, **kwargs)
            return
        try:
            with staged_generation(out) as staging:
                train(*args, out=staging, **kwargs)
                markets = index_generation(staging)
                generation = publish(out, staging)
        except (ServiceError, CheckpointError) as e:
            raise _fail(f"nothing published: {getattr(e, 'message', str(e))}") from e
        typer.echo(f"published {generation} ({len(markets)} markets, indexes built) as "
                   f"{out / CURRENT}")

    command.__doc__ = ("Pre-train on all markets, fine-tune per market, build every market's "
                       "index, and publish them together as ARTIFACTS/current.")
    return command


for command in training_app.registered_commands:
    if command.callback is train_command:
        app.command("train")(published(train_command))
    else:
        app.registered_commands.append(command)


@index_app.command("build")
def index_build_command(
    artifacts: Annotated[Path, typer.Option("--artifacts", help="Directory from `xmr train`.")],
    market: Annotated[list[str] | None, typer.Option(
        "--market", help="Market to build (repeatable; default: every market).")] = None,
    index: Annotated[str, typer.Option(
        "--index", help="auto (exact flat up to --exact-max-items items, ivf-pq4 above, hnsw "
        "where that falls short of the floor), flat (exact), ivf, ivf-sq8 (8-bit codes, exact "
        "re-rank), ivf-pq4 (4-bit fast-scan codes, exact re-rank) or hnsw (approximate, tuned "
        "to --min-recall).")] = "auto",
    min_recall: Annotated[float, typer.Option(
        "--min-recall", help="Recall@10 against exact search an approximate index must reach; "
        "below it the index is refused and the current one keeps serving.")] = 0.95,
    exact_max_items: Annotated[int, typer.Option(
        "--exact-max-items", help="--index auto: the largest market indexed exactly.")
    ] = EXACT_MAX_ITEMS,
    nprobe: Annotated[int | None, typer.Option(
        "--nprobe", help="ivf: lists searched (default: the smallest reaching the floor).")
    ] = None,
    nlist: Annotated[int | None, typer.Option(
        "--nlist", help="ivf: lists (default: about sqrt(items), twice that for ivf-pq4).")
    ] = None,
    ef_search: Annotated[int | None, typer.Option(
        "--ef-search", help="hnsw: efSearch (default: the smallest reaching the floor).")
    ] = None,
    refine: Annotated[int | None, typer.Option(
        "--refine", help="ivf-sq8, ivf-pq4: hits re-ranked by their exact vectors per result "
        "wanted (default 4 and 24).")] = None,
    recall_queries: Annotated[int, typer.Option(
        "--recall-queries", help="Query vectors sampled to tune and check recall.")] = 1000,
    threads: Annotated[int, typer.Option(
        "--threads", min=1, help="FAISS and torch threads for building.")] = 1,
) -> None:
    """Build each market's FAISS index from its fine-tuned checkpoint (atomic, idempotent) and
    print its kind, recall@10 against exact search, and build time."""
    import torch

    from service.bundle import discover_markets
    from service.errors import IndexBuildError, ServiceError
    from service.index import build_index, set_search_threads
    from service.index_manifest import IndexOptions
    from training.checkpoint import CheckpointError, Tables

    try:
        options = IndexOptions(kind=index, min_recall=min_recall, exact_max_items=exact_max_items,
                               recall_queries=recall_queries, nlist=nlist, nprobe=nprobe,
                               ef_search=ef_search, refine=refine)
    except ValueError as e:
        raise _fail(str(e)) from e
    torch.set_num_threads(threads)
    set_search_threads(threads)
    refused = []
    tables: Tables = {}  # the global item table, read once for every market
    try:
        markets = market or discover_markets(artifacts)
        if not markets:
            raise _fail(f"{artifacts}: no market checkpoints")
        for name in markets:
            try:
                manifest = build_index(artifacts / "markets" / name, options, tables)
            except IndexBuildError as e:
                typer.echo(f"{name}: refused: {e.message}", err=True)
                refused.append(name)
                continue
            recall = ("1.000 (exact)" if manifest.recall_at_10 is None
                      else f"{manifest.recall_at_10:.3f}")
            params = "".join(f" {k}={v}" for k, v in manifest.params.items())
            typer.echo(f"{name}: index {manifest.version} kind={manifest.kind}{params} "
                       f"n_items={manifest.n_items} recall@10={recall} "
                       f"build_s={manifest.build_seconds:.2f} "
                       f"model_version={manifest.model_version}")
    except (ServiceError, CheckpointError) as e:
        raise _fail(getattr(e, "message", str(e))) from e
    if refused:
        raise _fail(f"refused for {', '.join(refused)} (above): their indexes were not "
                    "replaced")


@app.command("import")
def import_command(
    checkpoints: Annotated[Path, typer.Option(
        "--checkpoints", help="Checkpoints to import: global/ and markets/<m>/ (another run's "
        "artifacts).")],
    artifacts: Annotated[Path, typer.Option("--artifacts", help="Artifacts directory.")],
) -> None:
    """Copy checkpoints into a new generation, build its indexes and publish it."""
    from service.artifacts import copy_checkpoints, index_generation, publish, staged_generation
    from service.errors import ServiceError
    from training.checkpoint import CheckpointError

    try:
        with staged_generation(artifacts) as staging:
            copy_checkpoints(checkpoints, staging)
            markets = index_generation(staging)
            generation = publish(artifacts, staging)
    except (ServiceError, CheckpointError, OSError) as e:
        raise _fail(f"nothing published: {getattr(e, 'message', str(e))}") from e
    typer.echo(f"published {generation} ({len(markets)} markets) from {checkpoints}")


@app.command("serve")
def serve_command(
    artifacts: Annotated[Path | None, typer.Option(
        "--artifacts", help="Directory from `xmr train` (XMR_ARTIFACTS).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (XMR_HOST).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (XMR_PORT).")] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="Redis URL for sessions (XMR_REDIS_URL; default in-process).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Server processes, e.g. one per core (XMR_WORKERS; default 1); "
        "more than one needs Redis.")] = None,
) -> None:
    """Serve the recommendation API; other settings come from XMR_* environment variables."""
    from pydantic import ValidationError

    from service.settings import Settings
    from service.workers import WorkersError, check_workers, serve_workers

    overrides: dict[str, Any] = {
        k: v for k, v in
        {"artifacts": artifacts, "host": host, "port": port, "redis_url": redis_url,
         "workers": workers}.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
        check_workers(settings)
    except ValidationError as e:
        raise _fail(f"invalid settings: {e}") from e
    except WorkersError as e:
        raise _fail(str(e)) from e
    if settings.workers > 1:
        status = serve_workers(settings)
        if status:
            raise typer.Exit(code=status)
        return
    from service.server import serve

    serve(settings)


@app.command("demo")
def demo_command(
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Where to write data and artifacts (default: a temporary directory).")
    ] = None,
) -> None:
    """Synthetic markets -> train -> index -> serve, and print one real recommendation."""
    from service.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="xmr-demo-") as tmp:
        result = run_demo(workdir or Path(tmp))
        typer.echo(f"POST /markets/{result.market}/recommend {json.dumps(result.request)}")
        typer.echo(json.dumps(result.response, indent=2))


if __name__ == "__main__":
    app()
