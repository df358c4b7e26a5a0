"""Prometheus metrics of one app, in its own CollectorRegistry (tests build many apps).

Under `xmr serve --workers N` (PROMETHEUS_MULTIPROC_DIR set by `service.workers` before the
workers start) each worker writes its values to files in that directory and `/metrics`, from
whichever worker answers, adds them up: counters and histograms summed over the workers,
`xmr_model_info` one series per worker pid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "xmr_request_duration_seconds", "Request latency by route template and market.",
            ["route", "method", "market"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "xmr_requests_total", "Requests by route, market and status.",
            ["route", "method", "market", "status"], registry=self.registry,
        )
        self.errors = Counter(
            "xmr_errors_total", "Responses with status >= 400 by route, market and status.",
            ["route", "market", "status"], registry=self.registry,
        )
        self.fallbacks = Counter(
            "xmr_fallbacks_total", "Recommendations served from a fallback (no known item).",
            ["market", "kind"], registry=self.registry,
        )
        self.unknown_items = Counter(
            "xmr_unknown_items_total", "Item ids in requests that the market does not know.",
            ["market"], registry=self.registry,
        )
        self.batch_size = Histogram(
            "xmr_encoder_batch_size", "Requests merged into one encoder call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.rerank = Histogram(
            "xmr_rerank_seconds", "The served ranking's second stage per request (the deeper "
            "index search and the ranker).", ["market"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=self.registry,
        )
        self.reloads = Counter(
            "xmr_reloads_total", "Reloads of models and indexes by outcome.", ["outcome"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "xmr_model_info", "1 for the model and index version served per market.",
            ["market", "model_version", "index_version"], registry=self.registry,
            multiprocess_mode="liveall",
        )
        self._served: list[tuple[str, str, str]] = []

    def observe_request(
        self, route: str, method: str, market: str, status: int, seconds: float
    ) -> None:
        self.latency.labels(route, method, market).observe(seconds)
        self.requests.labels(route, method, market, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, market, str(status)).inc()

    def set_models(self, versions: Iterable[tuple[str, str, str]]) -> None:
        """(market, model_version, index_version) of the bundle now served."""
        if os.environ.get(MULTIPROCESS_DIR):  # a worker's file keeps every series it had
            for labels in self._served:
                self.model_info.labels(*labels).set(0)
        else:
            self.model_info.clear()
        self._served = list(versions)
        for labels in self._served:
            self.model_info.labels(*labels).set(1)

    def render(self) -> bytes:
        directory = os.environ.get(MULTIPROCESS_DIR)
        if not directory:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)
        return generate_latest(merged)
