"""The `xmr` console script: training commands plus the service's index, serve and demo."""

from __future__ import annotations

import logging
import os

import typer

from training.cli import app as training_app

app = typer.Typer(
    no_args_is_help=True, add_completion=False,
    help="Cross-market recommendation: train Bert4XMR, build indexes, serve.",
)


@app.callback()
def main(
    log_level: str = typer.Option(
        os.environ.get("XMR_LOG_LEVEL", "INFO"), "--log-level", help="Logging level."
    ),
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )


for command in training_app.registered_commands:
    app.registered_commands.append(command)
