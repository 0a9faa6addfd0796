"""A replica's Prometheus metrics, copied into Ray's metrics export, labelled by replica.

Behind Ray's proxy, GET /metrics reaches one replica of many, so it cannot show the fleet. Each
replica therefore copies its registry (api/metrics.py) every few seconds into Ray Serve's metric
objects, which Ray tags with the application, deployment and replica and serves on every node's
metrics export port (`ray start --metrics-export-port=...`), next to Ray's own metrics. Counters
and histogram series travel as gauges holding the running totals, so rate() and
histogram_quantile() work on them as on the originals.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry
from ray.serve import metrics as serve_metrics

log = logging.getLogger("minicpm_server")


class RayMetricsExport:
    def __init__(self, registry: CollectorRegistry, period_s: float = 2.0) -> None:
        self._registry = registry
        self._period_s = period_s
        self._gauges: dict[tuple[str, tuple[str, ...]], serve_metrics.Gauge] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="minicpm-ray-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            try:
                self.export_once()
            except Exception:  # a scrape that fails must never take the replica down
                log.exception("copying metrics to Ray's export failed")

    def export_once(self) -> None:
        for family in self._registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps, not measurements
                    continue
                keys = tuple(sorted(sample.labels))
                # Ray is retiring ":" in metric names (vLLM's names have it): vllm:x travels as vllm_x.
                name = sample.name.replace(":", "_")
                self._gauge(name, keys, family.documentation).set(sample.value, tags=dict(sample.labels))

    def _gauge(self, name: str, keys: tuple[str, ...], documentation: str) -> serve_metrics.Gauge:
        gauge = self._gauges.get((name, keys))
        if gauge is None:
            gauge = serve_metrics.Gauge(name, description=documentation or name, tag_keys=keys)
            self._gauges[(name, keys)] = gauge
        return gauge
