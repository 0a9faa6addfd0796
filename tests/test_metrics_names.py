"""Metrics under vLLM's names, beside ours: what vLLM's router, the Gateway API inference extension
and Grafana dashboards read. Every series the repository's dashboard (deploy/grafana/) queries must
exist, labelled with the model, and mean what vLLM documents. The vLLM backend's half is in
test_backends.py (test_vllm_metric_names_on_both_backends)."""

from __future__ import annotations

import json

import requests

from tests.harness import DASHBOARD, check_vllm_metric_names, dashboard_metric_names, long_generation


def test_the_dashboard_is_grafana_json_reading_vllm_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(panel["targets"] for panel in dashboard["panels"])
    names = dashboard_metric_names()
    for wanted in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    ):  # fmt: skip
        assert wanted in names, wanted


def test_every_series_the_dashboard_reads_exists_and_counts(server) -> None:
    model = requests.get(server.url + "/v1/models").json()["data"][0]["id"]
    before = check_vllm_metric_names(server.url, model)
    prompt = "the same long prompt, twice over, so that its blocks are cached " * 4
    url, body = long_generation(server.url, 9, prompt=prompt)
    for _ in range(2):
        assert requests.post(url, json=body, timeout=120).status_code == 200
    after = check_vllm_metric_names(server.url, model)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("vllm:generation_tokens_total") == 18
    assert grew("vllm:prompt_tokens_total") >= 2 * 40
    assert grew("vllm:e2e_request_latency_seconds_count") == 2
    assert grew("vllm:time_to_first_token_seconds_count") == 2
    assert grew("vllm:inter_token_latency_seconds_count") == 2 * 8  # the gaps after each first token
    assert 0 < grew("vllm:prefix_cache_hits_total") <= grew("vllm:prefix_cache_queries_total")
    assert 0.0 <= after["vllm:kv_cache_usage_perc"] <= 1.0
    ours = requests.get(server.url + "/metrics").text
    assert "minicpm_generation_tokens_total" in ours  # our own names stay
