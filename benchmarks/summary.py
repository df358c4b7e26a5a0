"""The load benchmark's numbers: phases merged per endpoint and concurrency, percentiles, the
issue's targets, and the plain-text table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from client import NOOP, RECOMMEND, PhaseResult

ALL = "all"
# From the issue: at concurrency 8, recommend p50 <= 1.5x the no-op's, throughput >= 0.5x.
TARGET_CONCURRENCY = 8
MAX_P50_RATIO = 1.5
MIN_RPS_RATIO = 0.5


@dataclass(frozen=True)
class Row:
    endpoint: str
    kind: str  # ALL, or a request kind of the workload
    concurrency: int
    n: int
    errors: int
    p50_ms: float
    p99_ms: float
    rps: float
    client_cpu: float  # share of one core, over the phases' wall time
    server_cpu: float


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _row(endpoint: str, kind: str, concurrency: int, phases: list[PhaseResult]) -> Row:
    kinds = [k for p in phases for k in p.latencies_ms] if kind == ALL else [kind]
    values = sorted(v for p in phases for k in set(kinds) for v in p.latencies_ms.get(k, []))
    errors = sum(n for p in phases for key, n in p.errors.items()
                 if kind == ALL or key.startswith(f"{kind}:"))
    wall = sum(p.wall_s for p in phases)
    return Row(
        endpoint, kind, concurrency, len(values), errors, percentile(values, 50),
        percentile(values, 99), len(values) / wall if wall else math.nan,
        sum(p.client_cpu_s for p in phases) / wall if wall else math.nan,
        sum(p.server_cpu_s for p in phases) / wall if wall else math.nan,
    )


def summarize(results: list[PhaseResult]) -> list[Row]:
    """One row per (endpoint, concurrency) over the measured phases, plus one per request kind
    for recommend (the kinds share its phases, so their req/s add up to its total)."""
    measured = [r for r in results if not r.warmup]
    rows = []
    for concurrency in sorted({r.concurrency for r in measured}):
        for endpoint in dict.fromkeys(r.endpoint for r in measured):
            phases = [r for r in measured
                      if r.endpoint == endpoint and r.concurrency == concurrency]
            if not phases:
                continue
            rows.append(_row(endpoint, ALL, concurrency, phases))
            if endpoint == RECOMMEND:
                kinds = sorted({k for p in phases for k in p.latencies_ms}
                               | {key.split(":")[0] for p in phases for key in p.errors})
                rows.extend(_row(endpoint, k, concurrency, phases) for k in kinds)
    return rows


def targets(rows: list[Row]) -> dict[str, Any]:
    """The issue's three targets, each with its measured value and PASS/FAIL."""

    def find(endpoint: str) -> Row | None:
        return next((r for r in rows if r.endpoint == endpoint and r.kind == ALL
                     and r.concurrency == TARGET_CONCURRENCY), None)

    rec, noop = find(RECOMMEND), find(NOOP)
    if rec is None or noop is None:
        return {"error": f"no recommend and no-op rows at concurrency {TARGET_CONCURRENCY}"}
    p50_ratio = rec.p50_ms / noop.p50_ms
    rps_ratio = rec.rps / noop.rps
    errors = sum(r.errors for r in rows if r.kind == ALL)
    return {
        "p50_ratio": {"value": round(p50_ratio, 2), "target": f"<= {MAX_P50_RATIO}",
                      "pass": p50_ratio <= MAX_P50_RATIO},
        "rps_ratio": {"value": round(rps_ratio, 2), "target": f">= {MIN_RPS_RATIO}",
                      "pass": rps_ratio >= MIN_RPS_RATIO},
        "errors": {"value": errors, "target": "0", "pass": errors == 0},
    }


def _fmt(value: float, digits: int = 2) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def table(rows: list[Row], goals: dict[str, Any]) -> str:
    lines = [f"{'endpoint':<10} {'kind':<8} {'conc':>4} {'requests':>8} {'errors':>6} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'client cpu':>10} {'server cpu':>10}"]
    for r in rows:
        lines.append(
            f"{r.endpoint:<10} {r.kind:<8} {r.concurrency:>4} {r.n:>8} {r.errors:>6} "
            f"{_fmt(r.p50_ms):>8} {_fmt(r.p99_ms):>8} {_fmt(r.rps, 1):>8} "
            f"{_fmt(100 * r.client_cpu, 0) + '%':>10} {_fmt(100 * r.server_cpu, 0) + '%':>10}"
        )
    lines.append("")
    if "error" in goals:
        lines.append(f"targets: {goals['error']}")
        return "\n".join(lines)
    names = {"p50_ratio": f"recommend p50 / no-op p50 at concurrency {TARGET_CONCURRENCY}",
             "rps_ratio": f"recommend req/s / no-op req/s at concurrency {TARGET_CONCURRENCY}",
             "errors": "errors, all endpoints and concurrencies"}
    for key, name in names.items():
        goal = goals[key]
        verdict = "PASS" if goal["pass"] else "FAIL"
        lines.append(f"{name:<55} {goal['value']!s:>6}  target {goal['target']:<7} {verdict}")
    return "\n".join(lines)
