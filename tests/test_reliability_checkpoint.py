"""Checkpoints as an attack surface: tampered, truncated or pickled weights are refused with a
clear error naming the path, nothing is ever unpickled, and the served models change only
through an admin reload that carries the token."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from training.checkpoint import MANIFEST, WEIGHTS, CheckpointError, file_sha256, load_checkpoint

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Payload:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest_sha(market_dir: Path) -> None:
    """What an attacker with write access does: make the manifest's hash match the new file."""
    manifest = json.loads((market_dir / MANIFEST).read_text())
    manifest["weights_sha256"] = file_sha256(market_dir / WEIGHTS)
    (market_dir / MANIFEST).write_text(json.dumps(manifest))


def tamper(market_dir: Path, how: str, marker: Path) -> None:
    weights = market_dir / WEIGHTS
    data = weights.read_bytes()
    if how == "flipped byte":
        weights.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        rewrite_manifest_sha(market_dir)
    elif how == "pickle (torch.save)":
        torch.save({"x": Payload(marker)}, weights)
        rewrite_manifest_sha(market_dir)
    elif how == "pickle (raw)":
        weights.write_bytes(pickle.dumps(Payload(marker)))
        rewrite_manifest_sha(market_dir)
    elif how == "empty":
        weights.write_bytes(b"")
        rewrite_manifest_sha(market_dir)
    else:
        raise ValueError(how)


TAMPERS = ["flipped byte", "truncated", "pickle (torch.save)", "pickle (raw)", "empty"]


@pytest.mark.parametrize("how", TAMPERS)
def test_tampered_checkpoint_is_refused_and_nothing_unpickled(artifacts_copy: Path,
                                                              tmp_path: Path, how: str) -> None:
    market_dir = artifacts_copy / "markets" / "aa"
    marker = tmp_path / "unpickled"
    tamper(market_dir, how, marker)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(market_dir)
    assert str(market_dir / WEIGHTS) in str(error.value)
    assert not marker.exists()


def test_loading_and_serving_never_call_an_unpickler(monkeypatch: pytest.MonkeyPatch,
                                                     make_service_client) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    with make_service_client(admin_token=TOKEN) as client:
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert client.post("/markets/aa/recommend", json={"items": []}).status_code == 200


@pytest.mark.parametrize("how", TAMPERS)
def test_reload_of_a_tampered_checkpoint_fails_clearly_and_keeps_serving(
    make_service_client, artifacts_copy: Path, tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "unpickled"
    with make_service_client(artifacts=artifacts_copy, admin_token=TOKEN) as client:
        before = client.get("/markets").json()["markets"]
        tamper(artifacts_copy / "markets" / "aa", how, marker)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 500, r.text
        assert r.json()["error"] == "reload_failed"
        assert str(artifacts_copy / "markets" / "aa" / WEIGHTS) in r.json()["message"]
        assert client.get("/markets").json()["markets"] == before
        assert client.post("/markets/aa/recommend", json={"items": []}).status_code == 200
    assert not marker.exists()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"bearer {TOKEN}", f"Bearer {TOKEN} ",
                                    f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}\u00e9"])
def test_reload_without_the_right_token_changes_nothing(make_service_client,
                                                        artifacts_copy: Path,
                                                        header: str | None) -> None:
    from tests.test_api_operations import retrain

    with make_service_client(artifacts=artifacts_copy, admin_token=TOKEN) as client:
        before = client.get("/markets").json()["markets"]
        retrain(artifacts_copy, "aa", 1.5)  # a valid new model is on disk
        headers = {} if header is None else {"Authorization": header.encode()}  # raw bytes
        r = client.post("/admin/reload", headers=headers)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert client.get("/markets").json()["markets"] == before
