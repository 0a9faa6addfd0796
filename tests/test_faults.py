"""Engine faults: an out-of-memory fails only the requests it hit; an engine that cannot generate
fails the start-up; one that dies while serving answers what was in flight and ends the process
with a non-zero status, so that a supervisor restarts it."""

from __future__ import annotations

import json
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


def test_a_failure_inside_a_stream_names_the_request(fault_server) -> None:
    url, body = long_generation(fault_server.url, HOLD_TOKENS, stream=True)
    with requests.post(url, json=body, stream=True, headers={"X-Request-Id": "streamed-42"}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: {"))  # the stream has begun
        assert requests.post(fault_server.url + "/debug/fault", json={"kind": "oom"}).status_code == 202
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    error = events[-1]["error"]
    assert "out of memory" in error["message"] and error["request_id"] == "streamed-42"


@pytest.mark.parametrize("kind", ["oom", "fatal"])
def test_an_engine_that_cannot_generate_fails_the_start_up(start_server, tiny_dir, kind) -> None:
    """The warm-up generation runs before "ready": a first step that fails stops the start-up with
    one clear line and exit status 2, instead of a server that answers 503 to everything."""
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--testing-start-fault", kind, wait=False)
    assert server.proc.wait(120) == 2
    log = server.log()
    assert "error: the engine loaded but could not generate (warm-up)" in log, log[-2000:]
    assert "Traceback" not in log


def test_an_engine_that_dies_while_serving_ends_the_process(start_server, long_dir) -> None:
    """In-flight requests get their 503, then the process exits 3 (a supervisor restarts it)."""
    server = start_server("--model-path", long_dir, "--device", "cpu", "--testing-fault-injection")
    assert "warm-up generation" in server.log_lines("ready:")[0]
    url, body = long_generation(server.url, HOLD_TOKENS)
    with ThreadPoolExecutor(2) as pool:
        victims = [pool.submit(requests.post, url, json=body, timeout=60) for _ in range(2)]
        wait_for_metric(server.url, "minicpm_requests_running", lambda v: v == 2)
        assert requests.post(server.url + "/debug/fault", json={"kind": "fatal"}).status_code == 202
        results = [f.result() for f in victims]
    assert [r.status_code for r in results] == [503, 503]
    assert server.proc.wait(60) == 3
    assert "the generation engine stopped unexpectedly" in server.log()
