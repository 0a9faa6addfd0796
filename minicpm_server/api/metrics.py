"""Prometheus metrics, on a registry of the app's own (no process-global state to collide in tests).

Two families, from the same observations, for both engine backends:

* ours, `minicpm_*`, as they have been since the first release;
* vLLM's names, `vllm:*`, labelled `model_name`, because the tools around vLLM read those:
  its production-stack router, the Gateway API inference extension's endpoint picker, and the
  community's Grafana dashboards (ours is deploy/grafana/minicpm-server.json). They mean what
  vLLM documents: `vllm:kv_cache_usage_perc` is a fraction (1.0 is full), prefix-cache queries
  and hits count prompt tokens, latencies are seconds from the request's arrival.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from minicpm_server.engine.protocol import Engine, EngineStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
# vLLM's request end reasons; our "cancelled" is its "abort"
_VLLM_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "minicpm") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
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
        self.connections_refused = Counter(
            "minicpm_connections_refused",
            "Connections closed before a request reached the app (read_timeout: 408; too_many_connections: 503)",
            ["reason"],
            registry=r,
        )
        self.vllm = _VllmNames(r, model_name)

    def watch_engine(self, engine: Engine) -> None:
        """The gauges and engine counters read the engine's stats at scrape time."""
        self.requests_running.set_function(lambda: engine.stats.running)
        self.requests_waiting.set_function(lambda: engine.stats.waiting)
        self.registry.register(_EngineCounters(engine, self.model_name))

    def refused(self, reason: str) -> None:
        self.connections_refused.labels(reason=reason).inc()

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
        self.vllm.observe_generation(prompt_tokens, completion_tokens, ttft, latency)

    def observe_token_gap(self, seconds: float, tokens: int) -> None:
        """Time between a request's successive tokens: `seconds` since its last delta, which
        brought `tokens` tokens (a step can bring several), so each counts seconds / tokens."""
        for _ in range(tokens):
            self.vllm.inter_token_latency.observe(seconds / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _VllmNames:
    """The histograms and counters under vLLM's names that the HTTP side observes."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        label = ["model_name"]

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, text, label, buckets=buckets, registry=registry).labels(model_name)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between successive tokens in seconds", _TOKEN_GAP_BUCKETS
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds", _LATENCY_BUCKETS
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", label, registry=registry).labels(
            model_name
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed", label, registry=registry
        ).labels(model_name)

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, latency: float
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        self.e2e_latency.observe(latency)


def kv_cache_usage(stats: EngineStats) -> float | None:
    """The share of the KV cache in use (0-1), however the backend reports it."""
    if stats.kv_usage is not None:
        return stats.kv_usage
    if stats.kv_used_tokens is not None and stats.kv_capacity_tokens:
        return stats.kv_used_tokens / stats.kv_capacity_tokens
    return None


class _EngineCounters:
    """What the engine keeps itself (failed steps, cache releases, KV memory), exposed as it stands,
    under our names and, where vLLM has one, under vLLM's."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._engine.stats
        yield from self._ours(stats)
        yield from self._vllms(stats)

    def _ours(self, stats: EngineStats) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
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

    def _vllms(self, stats: EngineStats) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        label, name = ["model_name"], [self._model_name]

        def gauge(metric: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, text, labels=label)
            family.add_metric(name, value)
            return family

        def counter(metric: str, text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, text, labels=label)
            family.add_metric(name, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches", stats.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed", stats.waiting)
        usage = kv_cache_usage(stats)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent usage", usage or 0.0)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in prompt tokens looked up",
            stats.prefix_query_tokens or 0,
        )
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in prompt tokens", stats.prefix_hit_tokens or 0)
        success = CounterMetricFamily(
            "vllm:request_success", "Finished requests, by finish reason", labels=["model_name", "finished_reason"]
        )
        for reason, count in stats.finished.items():
            success.add_metric([self._model_name, _VLLM_REASONS.get(reason, reason)], count)
        yield success
