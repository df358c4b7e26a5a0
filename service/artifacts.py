"""The artifact set on disk: whole generations (checkpoints + indexes of every market) under
`ARTIFACTS/generations/`, and `ARTIFACTS/current`, a symbolic link to the one being served.

    ARTIFACTS/current -> generations/<id>           swapped by rename(2): atomic
    ARTIFACTS/generations/<id>/global/               the pre-trained checkpoint
    ARTIFACTS/generations/<id>/markets/<m>/          checkpoint + index.json + index/encoder files
    ARTIFACTS/global -> current/global               for tools and people; the service resolves
    ARTIFACTS/markets -> current/markets             `current` once per load instead

A generation is written in full under a staging name, then published: renamed into place, and
`current` swapped in one step. A loader that resolves `current` once sees the old set or the new
one, never a mix. A directory without `current` (a hand-made layout, `train_markets` output) is
served as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from service.errors import ArtifactsError

logger = logging.getLogger(__name__)

CURRENT = "current"
GENERATIONS = "generations"
STAGING_PREFIX = ".staging-"
LINKS = ("global", "markets")  # ARTIFACTS/<name> -> current/<name>
KEEP = 2  # generations kept: the current one and the one a slow loader may still be reading


def resolve_set(artifacts: Path) -> Path:
    """The directory that holds `global/` and `markets/` now: the target of `current`, read
    once, or `artifacts` itself where there is no `current`."""
    link = artifacts / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise ArtifactsError(f"{link}: not a symbolic link to a generation")
        return artifacts
    target = artifacts / os.readlink(link)
    if not target.is_dir():
        raise ArtifactsError(f"{link}: points to {os.readlink(link)}, which is missing")
    return target.resolve()


@contextmanager
def staged_generation(artifacts: Path) -> Iterator[Path]:
    """An empty directory to write a whole generation into; deleted when the block fails or
    leaves it unpublished, with the folders it made for it (a failed first run writes nothing)."""
    name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"  # sorts by time
    staging = artifacts / GENERATIONS / f"{STAGING_PREFIX}{name}"
    made = [p for p in (artifacts, staging.parent) if not p.exists()]
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty: something was published
                folder.rmdir()


def _swap_link(link: Path, target: str) -> None:
    """Point `link` at `target` in one rename(2), whatever `link` was (a directory is moved
    aside first: the layout of before generations)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    if link.is_dir() and not link.is_symlink():
        old = link.with_name(f".{link.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(link, old)
        os.replace(tmp, link)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("replaced the directory %s with a link to %s", link, target)
        return
    os.replace(tmp, link)


def publish(artifacts: Path, staging: Path, keep: int = KEEP) -> Path:
    """Make the fully written `staging` generation the current set; returns its directory.
    Generations beyond the newest `keep` go."""
    if not (staging / "global").is_dir() or not any((staging / "markets").glob("*")):
        raise ArtifactsError(f"{staging}: not a whole generation (global/ and markets/<m>/)")
    generation = staging.with_name(staging.name.removeprefix(STAGING_PREFIX))
    os.replace(staging, generation)
    _fsync_dir(generation.parent)
    _swap_link(artifacts / CURRENT, f"{GENERATIONS}/{generation.name}")
    _fsync_dir(artifacts)
    for name in LINKS:
        link = artifacts / name
        if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
            _swap_link(link, f"{CURRENT}/{name}")
    logger.info("published generation=%s", generation.name)
    for old in generations(artifacts)[:-keep]:
        if old == generation:  # a set staged before another one but published after it
            continue
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed generation=%s", old.name)
    return generation


def generations(artifacts: Path) -> list[Path]:
    """Published generations, oldest first (their names start with the UTC time)."""
    root = artifacts / GENERATIONS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def index_generation(staging: Path) -> list[str]:
    """Build the index of every market checkpoint in a staged generation; its markets."""
    from service.index import build_index

    markets = sorted(p.parent.name for p in (staging / "markets").glob("*/manifest.json"))
    for market in markets:
        build_index(staging / "markets" / market)
    return markets


def copy_checkpoints(source: Path, staging: Path) -> None:
    """Copy a checkpoint set (`global/`, `markets/<m>/`: another run's artifacts, generations
    or not) into a staged generation."""
    source = resolve_set(source)
    if not (source / "global" / "manifest.json").is_file():
        raise ArtifactsError(f"{source}: no global/manifest.json to import")
    shutil.copytree(source / "global", staging / "global")
    for market_dir in sorted((source / "markets").glob("*/manifest.json")):
        shutil.copytree(market_dir.parent, staging / "markets" / market_dir.parent.name)
