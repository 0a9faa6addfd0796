"""Load generation against a running server: closed-loop clients, streamed TTFT, /health probes."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

PROMPT = "山东省最高的山是哪座山, 它比黄山高还是矮？差距多少？"

# One request: (url, new_tokens, session) -> seconds it took. `one_request` below is POST /;
# other benchmarks pass their own (another endpoint, another server's body).
Send = Callable[[str, int, requests.Session], float]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def one_request(url: str, new_tokens: int, session: requests.Session) -> float:
    start = time.perf_counter()
    r = session.post(
        url, json={"prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True, "stop": []}, timeout=600
    )
    r.raise_for_status()
    return time.perf_counter() - start


def closed_loop(url: str, concurrency: int, per_client: int, new_tokens: int, send: Send = one_request) -> LoadResult:
    """`concurrency` clients, each sending `per_client` requests back to back."""

    def client(_: int) -> list[float]:
        with requests.Session() as s:
            return [send(url, new_tokens, s) for _ in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for batch in pool.map(client, range(concurrency)) for x in batch]
    seconds = time.perf_counter() - start
    return LoadResult(concurrency, len(latencies), len(latencies) * new_tokens, seconds, latencies)


def streamed_ttft(url: str, new_tokens: int) -> float:
    """Seconds to the first streamed chunk of POST / with stream=true (NDJSON)."""
    start = time.perf_counter()
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True, "stop": []}
    with requests.post(url, json=body, stream=True, timeout=600) as r:
        for line in r.iter_lines():
            if line and json.loads(line).get("response"):
                return time.perf_counter() - start
    raise RuntimeError("stream produced no text")


class BusyClients:
    """`clients` threads sending requests back to back until the block ends (load for probes)."""

    def __init__(self, url: str, clients: int, new_tokens: int, send: Send = one_request) -> None:
        self.url, self.new_tokens, self.send = url, new_tokens, send
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._done.is_set():
                self.send(self.url, self.new_tokens, session)

    def __enter__(self) -> BusyClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for t in self._threads:
            t.join()


class HealthProbe:
    """Polls /health every `interval` seconds on its own thread and keeps the latencies."""

    def __init__(self, base_url: str, interval: float = 0.05) -> None:
        self.url, self.interval = base_url + "/health", interval
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.is_set():
                start = time.perf_counter()
                s.get(self.url, timeout=600)
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(self.interval)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        xs = sorted(self.latencies)
        return {"n": len(xs), "median_ms": statistics.median(xs) * 1000, "max_ms": xs[-1] * 1000}
