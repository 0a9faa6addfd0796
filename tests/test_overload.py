"""Overload: a burst past the queue bound gets 200 or 429 for every request, and the server stays healthy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from tests.harness import long_generation


def test_overload_every_request_answered(start_server, window128_dir) -> None:
    """Four times the queue bound at once: each gets 200 or 429, none hangs or is lost."""
    server = start_server("--model-path", window128_dir, "--device", "cpu", "--max-batch", "2", "--max-queue", "4")
    url, body = long_generation(server.url, 60)

    def call(_: int) -> int:
        return requests.post(url, json=body, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
    assert len(codes) == 16 and set(codes) <= {200, 429}
    # At least the queue's 4 places are accepted; how many more depends on how fast the engine
    # moves queued requests into its batch of 2 while the burst arrives.
    assert codes.count(429) >= 1 and codes.count(200) >= 4
    assert requests.get(server.url + "/health").json()["status"] == "ok"
    assert requests.post(server.url, json={"prompt": "after", "max_new_tokens": 3}).status_code == 200
