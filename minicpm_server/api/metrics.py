"""Prometheus metrics, on a registry of the app's own (no process-global state to collide in tests)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from minicpm_server.engine.protocol import Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("minicpm_requests_running", "Sequences being generated now", registry=r)
        self.requests_waiting = Gauge("minicpm_requests_waiting", "Requests queued for the engine", registry=r)
        self.prompt_tokens = Counter("minicpm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("minicpm_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "minicpm_time_to_first_token_seconds",
            "From request arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "minicpm_request_latency_seconds",
            "From request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "minicpm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )

    def watch_engine(self, engine: Engine) -> None:
        """The gauges and engine counters read the engine's stats at scrape time."""
        self.requests_running.set_function(lambda: engine.stats.running)
        self.requests_waiting.set_function(lambda: engine.stats.waiting)
        self.registry.register(_EngineCounters(engine))

    def observe_request(self, route: str | None, status: int) -> None:
        """Labelled by the matched route's path template; unmatched paths share "other", so stray
        URLs cannot blow up the label cardinality."""
        self.requests.labels(endpoint=route or "other", status=str(status)).inc()

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, latency: float
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        self.request_latency.observe(latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters:
    """What the engine keeps itself (failed steps, cache releases, KV memory), exposed as it stands."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._engine.stats
        yield CounterMetricFamily("minicpm_engine_failures", "Engine steps that failed", value=stats.failures)
        yield CounterMetricFamily(
            "minicpm_cache_releases", "Times cached GPU memory was released", value=stats.cache_releases
        )
        finished = CounterMetricFamily(
            "minicpm_requests_finished", "Generations ended, by reason (stop, length, cancelled)", labels=["reason"]
        )
        for reason, count in stats.finished.items():
            finished.add_metric([reason], count)
        yield finished
        if stats.prefix_hit_tokens is not None:
            yield CounterMetricFamily(
                "minicpm_prefix_cache_hit_tokens",
                "Prompt tokens whose KV a cached prefix supplied (not computed again)",
                value=stats.prefix_hit_tokens,
            )
        if stats.kv_used_tokens is not None and stats.kv_capacity_tokens is not None:
            yield GaugeMetricFamily(
                "minicpm_kv_cache_used_tokens",
                "KV token slots held by running requests or cached prefixes",
                value=stats.kv_used_tokens,
            )
            yield GaugeMetricFamily(
                "minicpm_kv_cache_capacity_tokens", "KV token slots in the pool", value=stats.kv_capacity_tokens
            )
