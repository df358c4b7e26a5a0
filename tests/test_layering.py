"""Dependencies point one way: `service` may import `training`, never the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_training_module_imports_service_anywhere_in_its_source() -> None:
    modules = sorted(TRAINING.glob("*.py"))
    assert len(modules) > 5
    offenders = {
        path.name: sorted(n for n in _imported_modules(path) if n.split(".")[0] == "service")
        for path in modules
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_every_training_module_loads_no_service_module() -> None:
    names = [f"training.{p.stem}" for p in sorted(TRAINING.glob("*.py")) if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'service' or m.startswith('service.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=TRAINING.parent, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
