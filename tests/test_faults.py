"""Engine faults: an out-of-memory fails only the requests it hit; a dead engine makes /health say so."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import HOLD_TOKENS, long_generation, metric, wait_for_metric


@pytest.fixture(scope="module")
def fault_server(start_server, long_dir):
    return start_server("--model-path", long_dir, "--device", "cpu", "--testing-fault-injection")


def test_out_of_memory_fails_affected_requests_only(fault_server) -> None:
    url = fault_server.url
    long_url, long_body = long_generation(url, HOLD_TOKENS)
    with ThreadPoolExecutor(3) as pool:
        victims = [pool.submit(requests.post, long_url, json=long_body, timeout=60) for _ in range(3)]
        wait_for_metric(url, "minicpm_requests_running", lambda v: v == 3)
        releases = metric(url, "minicpm_cache_releases_total")
        assert requests.post(url + "/debug/fault", json={"kind": "oom"}).status_code == 202
        results = [f.result() for f in victims]
    assert [r.status_code for r in results] == [503] * 3, [r.text[:200] for r in results]
    assert "out of memory" in results[0].json()["error"]["message"]
    assert results[0].headers.get("Retry-After")
    after = requests.post(url, json={"prompt": "next", "max_new_tokens": 5})
    assert after.status_code == 200  # the next request is served normally
    assert metric(url, "minicpm_engine_failures_total") >= 1
    assert metric(url, "minicpm_cache_releases_total") > releases
    assert requests.get(url + "/health").status_code == 200


def test_dead_engine_makes_health_503(start_server, tiny_dir) -> None:
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--testing-fault-injection")
    requests.post(server.url + "/debug/fault", json={"kind": "fatal"})
    trigger = requests.post(server.url, json={"prompt": "x", "max_new_tokens": 3}, timeout=10)
    assert trigger.status_code == 503
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    again = requests.post(server.url, json={"prompt": "x", "max_new_tokens": 3}, timeout=10)
    assert again.status_code == 503  # answered at once, never hanging
