"""House rules of service/: core modules never import fastapi, only index.py imports faiss,
training never imports service, modules stay short."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTTP_MODULES = {"app.py", "api.py", "middleware.py", "server.py", "cli.py", "demo.py"}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_modules_do_not_import_fastapi() -> None:
    for path in (ROOT / "service").glob("*.py"):
        if path.name not in HTTP_MODULES:
            assert not imported(path) & {"fastapi", "starlette"}, path.name


def test_only_index_module_imports_faiss() -> None:
    users = {p.name for p in (ROOT / "service").glob("*.py") if "faiss" in imported(p)}
    assert users == {"index.py"}


def test_training_never_imports_service() -> None:
    for path in (ROOT / "training").glob("*.py"):
        assert "service" not in imported(path), path.name


def test_service_modules_stay_short() -> None:
    for path in (ROOT / "service").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 300, path.name
