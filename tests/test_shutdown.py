"""Timeouts and signals: a request past its deadline is cancelled; SIGTERM/SIGINT drain, then stop."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import HOLD_TOKENS, long_generation, metric, wait_for_health, wait_for_metric


def test_request_timeout_gives_504_and_cancels(start_server, long_dir) -> None:
    server = start_server("--model-path", long_dir, "--device", "cpu", "--request-timeout", "0.5")
    url, body = long_generation(server.url, HOLD_TOKENS)
    r = requests.post(url, json=body, timeout=300)
    assert r.status_code == 504 and "request-timeout" in r.json()["error"]["message"]
    wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 0)
    # Cut short by the deadline, not finished: no generation ran to its end.
    assert metric(server.url, "minicpm_requests_finished_total", 'reason="cancelled"') == 1
    assert metric(server.url, "minicpm_requests_finished_total", 'reason="length"') == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_in_flight(start_server, long_dir, sig) -> None:
    # 1,200 tokens: long enough to be still running when the signal lands after both have
    # started (about 12 s on a 2-core CI machine), short enough that the drain's wait is
    # not most of the suite. No request deadline: a busy machine may take longer than the default.
    server = start_server(
        "--model-path", long_dir, "--device", "cpu", "--shutdown-timeout", "600", "--request-timeout", "0"
    )
    url, body = long_generation(server.url, 1200)
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(requests.post, url, json=body, timeout=600) for _ in range(2)]
        wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 2)
        server.proc.send_signal(sig)
        draining = wait_for_health(server.url, "shutting_down")
        refused = requests.post(server.url, json={"prompt": "new", "max_new_tokens": 2}, timeout=30)
        results = [f.result() for f in in_flight]
    assert refused.status_code == 503
    assert draining["running"] == 2  # /health still counts what the drain is waiting for
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 1200 for r in results)
    assert server.proc.wait(60) == 0


def test_shutdown_timeout_cancels_the_rest(start_server, long_dir) -> None:
    server = start_server("--model-path", long_dir, "--device", "cpu", "--shutdown-timeout", "0.5")
    url, body = long_generation(server.url, HOLD_TOKENS)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, url, json=body, timeout=300)
        wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 1)
        server.proc.send_signal(signal.SIGTERM)
        result = pending.result()
    assert result.status_code == 503
    assert "shutting down" in result.json()["error"]["message"]
    assert server.proc.wait(60) == 0


def test_second_signal_stops_at_once_with_json_503(start_server, long_dir) -> None:
    """With a drain that would wait ten minutes, the second Ctrl-C answers the request in flight
    with a JSON 503 and the process exits 0, without tracebacks."""
    server = start_server("--model-path", long_dir, "--device", "cpu", "--shutdown-timeout", "600")
    url, body = long_generation(server.url, HOLD_TOKENS)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, url, json=body, timeout=300)
        wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 1)
        server.proc.send_signal(signal.SIGINT)
        wait_for_health(server.url, "shutting_down")
        server.proc.send_signal(signal.SIGINT)
        result = pending.result()
    assert result.status_code == 503 and result.headers["content-type"].startswith("application/json")
    assert server.proc.wait(120) == 0
    assert "Traceback" not in server.log()
