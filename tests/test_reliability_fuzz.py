"""Property-based fuzzing of the whole OpenAPI schema against the real app (schemathesis).

Every operation gets schema-valid (positive) and schema-invalid (negative) cases; each
response must be no server error (5xx other than a documented 503), have a declared status,
content type and body schema, and valid data must be accepted. `XMR_FUZZ_EXAMPLES` sets the
cases per operation and mode (default 25); the long run is `benchmarks/fuzz.py`.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

TOKEN = "fuzz-token"


@dataclass
class FuzzRun:
    cases: Counter[str] = field(default_factory=Counter)  # operation -> cases run
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # "op mode status" -> first report


def fuzz_operation(run: FuzzRun, operation: Any, mode: GenerationMode,
                   fixed: dict[str, str] | None, examples: int, derandomize: bool) -> None:
    label = operation.label

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def one(case: schemathesis.Case) -> None:
        run.cases[label] += 1
        response = case.call()
        run.statuses[response.status_code] += 1
        try:
            case.validate_response(response)
        except BaseException as e:  # FailureGroup: keep going, report all at the end
            run.failures.setdefault(f"{label} {mode.value} {response.status_code}", str(e)[:2000])

    with contextlib.suppress(Unsatisfiable):  # nothing to negate (no parameters, no body)
        one()


def fuzz_app(app: object, examples: int, market: str, derandomize: bool = True) -> FuzzRun:
    """Run every operation of the app's schema in both modes, and positive cases once more with
    a served market in the path (random codes are nearly all 404); collect all failures."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    run = FuzzRun()
    for result in schema.get_all_operations():
        operation = result.ok()
        fuzz_operation(run, operation, GenerationMode.POSITIVE, None, examples, derandomize)
        fuzz_operation(run, operation, GenerationMode.NEGATIVE, None, examples, derandomize)
        if "{market}" in operation.path:
            fuzz_operation(run, operation, GenerationMode.POSITIVE, {"market": market}, examples,
                           derandomize)
    return run


def test_schema_fuzz_finds_no_server_error_or_violation(service_artifacts: Path) -> None:
    from service.app import create_app
    from service.settings import Settings

    examples = int(os.environ.get("XMR_FUZZ_EXAMPLES", "25"))
    app = create_app(Settings(artifacts=service_artifacts, admin_token=TOKEN,
                              reload_on_sighup=False))
    run = fuzz_app(app, examples, market="aa")
    n_cases = sum(run.cases.values())
    print(f"fuzz: {n_cases} cases over {len(run.cases)} operations; statuses "
          f"{dict(sorted(run.statuses.items()))}; failures {len(run.failures)}")
    assert not run.failures, "\n\n".join(f"{k}\n{v}" for k, v in run.failures.items())
    assert not [s for s in run.statuses if s >= 500]
    assert len(run.cases) == 11 and n_cases >= 10 * examples
