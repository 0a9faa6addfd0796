"""The connection layer on an open port: a read deadline (408), a connection cap (503), and neither
cutting a stream or a normal request short.

The deadline checks bound the time from below exactly (never before the deadline) and from above
loosely (the deadline plus a few seconds, for a busy 2-core machine): what matters is that a
trickling client is let go at all, where before it was held for as long as it kept trickling.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import HOLD_TOKENS, long_generation

READ_TIMEOUT = 2.0
SLACK = 4.0  # seconds past the deadline a busy machine may take to close


@pytest.fixture(scope="module")
def guarded(start_server, long_dir):
    return start_server(
        "--model-path", long_dir, "--device", "cpu", "--read-timeout", READ_TIMEOUT, "--max-connections", 700
    )


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    return conn


def _trickle_until_closed(conn: socket.socket, first: bytes) -> tuple[float, bytes]:
    """Send `first`, then (if it was not empty) one byte every 0.5 s, until the server closes;
    (seconds, what it sent)."""
    started = time.monotonic()
    if first:
        conn.sendall(first)
    conn.settimeout(0.5)
    received = b""
    while time.monotonic() - started < 60:
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            try:
                if first:
                    conn.sendall(b" ")
            except OSError:
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    conn.close()
    return time.monotonic() - started, received


def _error_of(raw: bytes) -> tuple[str, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return status_line, headers, json.loads(body)


@pytest.mark.parametrize(
    "first",
    [
        b"",  # connects and sends nothing
        b"POST / HTTP/1.1\r\nHost: x\r\n",  # headers that never end
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",  # a body
    ],
    ids=["silent", "slow-headers", "slow-body"],
)
def test_slow_client_gets_408_and_is_closed(guarded, first) -> None:
    seconds, raw = _trickle_until_closed(_open(guarded.url), first)
    assert READ_TIMEOUT <= seconds < READ_TIMEOUT + SLACK, seconds
    status, headers, body = _error_of(raw)
    assert status.startswith("HTTP/1.1 408"), raw[:200]
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "request_timeout" and "--read-timeout" in body["error"]["message"]
    assert body["error"]["request_id"] == headers["x-request-id"]


def test_slow_body_is_logged_as_408(guarded) -> None:
    first = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 90\r\n\r\n{"
    _trickle_until_closed(_open(guarded.url), first)
    assert guarded.log_lines("POST /v1/completions status=408")


def test_kept_alive_connection_gets_a_fresh_deadline_per_request(guarded) -> None:
    """Two requests on one connection, the second sent after longer than the read timeout from the
    connection's start: each request's own clock counts, so both are answered."""
    with requests.Session() as session:
        assert session.get(guarded.url + "/health").status_code == 200
        time.sleep(READ_TIMEOUT * 0.6)
        assert session.get(guarded.url + "/health").status_code == 200
        time.sleep(READ_TIMEOUT * 0.6)
        assert session.get(guarded.url + "/health").status_code == 200


async def _hold_slow_connections(url: str, count: int, stop: threading.Event, results: list) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
        started = time.monotonic()
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.5)
            except asyncio.TimeoutError:
                writer.write(b" ")
                continue
            except OSError:
                data = b""
            results.append((time.monotonic() - started, data[:12]))
            break
        writer.close()

    await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)


def test_500_slow_connections_do_not_disturb_requests_or_streams(guarded) -> None:
    stop, results = threading.Event(), []
    attack = threading.Thread(
        target=lambda: asyncio.run(_hold_slow_connections(guarded.url, 500, stop, results)), daemon=True
    )
    attack.start()
    url, body = long_generation(guarded.url, HOLD_TOKENS, stream=True)
    try:
        with requests.post(url, json=body, stream=True, timeout=30) as stream:
            assert stream.status_code == 200
            started, late_chunks = time.monotonic(), 0
            with ThreadPoolExecutor(4) as pool:
                answers = [
                    pool.submit(requests.post, guarded.url, json={"prompt": f"q{i}", "max_length": 20}, timeout=60)
                    for i in range(8)
                ]
                for _ in stream.iter_lines():
                    elapsed = time.monotonic() - started
                    late_chunks += elapsed > READ_TIMEOUT + 1  # well past the read deadline
                    if elapsed > 10:
                        break
                assert [a.result().status_code for a in answers] == [200] * 8
        assert late_chunks > 0  # the stream went on for 10 s: the read deadline does not cut answers
    finally:
        attack.join(READ_TIMEOUT + 30)
        stop.set()
    assert len(results) == 500  # every slow connection was let go...
    assert all(data.startswith(b"HTTP/1.1 408") for _, data in results)  # ...with a 408
    assert max(seconds for seconds, _ in results) < READ_TIMEOUT + 20  # not held on (loose: 500 at once)


def test_connections_past_the_cap_get_503(start_server, tiny_dir) -> None:
    server = start_server("--model-path", tiny_dir, "--device", "cpu", "--max-connections", 5, "--read-timeout", 30)
    held = [_open(server.url) for _ in range(5)]
    try:
        time.sleep(0.3)
        seconds, raw = _trickle_until_closed(_open(server.url), b"")
        status, headers, body = _error_of(raw)
        assert status.startswith("HTTP/1.1 503") and headers["retry-after"] == "1"
        assert body["error"]["code"] == "too_many_connections" and "--max-connections 5" in body["error"]["message"]
        assert seconds < READ_TIMEOUT + SLACK  # answered at once, not after a read deadline
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while requests.get(server.url + "/health", timeout=5).status_code != 200:  # freed: served again
        assert time.monotonic() < deadline
        time.sleep(0.1)
    refused = requests.get(server.url + "/metrics").text
    assert 'minicpm_connections_refused_total{reason="too_many_connections"} 1.0' in refused
