"""Slow clients against a real server: are trickling connections let go, and do they slow others?

    python -m bench.slow_clients [--connections 3000] [--read-timeout 5] [--seconds 20]

Starts `api.py` on the tiny checkpoint, then, in one run:

1. a baseline: small POST / requests from 4 clients for a few seconds, latency per request;
2. the attack: `--connections` connections that each send a request's first bytes and then one
   byte every second (slowloris), with the same 4 clients measured meanwhile;
3. after `--seconds`: how many attack connections the server still holds open, when they were
   closed, and with what status.

Prints the clients' median and worst latency with and without the attack (the ratio) and the
attack connections' fate. The process raises its own open-files limit to fit.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.peers import CACHE
from minicpm_server.model.tiny import cached_tiny_checkpoint
from tests.harness import ServerProcess


async def _slow_connection(port: int, seconds: float, results: list) -> None:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        results.append(("connect-failed", 0.0, type(exc).__name__))
        return
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    while time.monotonic() - started < seconds:
        try:
            data = await asyncio.wait_for(reader.read(64), 1.0)
        except asyncio.TimeoutError:
            try:
                writer.write(b" ")
                await writer.drain()
            except OSError:
                break
            continue
        except OSError:
            data = b""
        status = data[9:12].decode(errors="replace") if data else "closed"
        results.append(("closed", time.monotonic() - started, status))
        writer.close()
        return
    results.append(("still-open", time.monotonic() - started, ""))
    writer.close()


def _attack(port: int, connections: int, seconds: float, results: list) -> None:
    async def run() -> None:
        await asyncio.gather(*(_slow_connection(port, seconds, results) for _ in range(connections)))

    asyncio.run(run())


def _client_latencies(url: str, seconds: float) -> list[float]:
    def one_client(n: int) -> list[float]:
        taken, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            answer = requests.post(url, json={"prompt": f"hi {n}", "max_length": 24}, timeout=120)
            assert answer.status_code == 200, answer.text[:200]
            taken.append(time.perf_counter() - start)
        return taken

    with ThreadPoolExecutor(4) as pool:
        return [t for part in pool.map(one_client, range(4)) for t in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--read-timeout", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections + 512)), hard))

    model = cached_tiny_checkpoint(CACHE, "tiny", seed=0)
    log = CACHE / "slow-clients-server.log"
    server = ServerProcess(
        ["--model-path", str(model), "--device", "cpu", "--read-timeout", str(args.read_timeout),
         "--max-connections", str(args.connections + 100)],
        log,
    ).wait_ready()  # fmt: skip
    try:
        baseline = _client_latencies(server.url, 5)
        results: list = []
        attack = threading.Thread(target=_attack, args=(server.port, args.connections, args.seconds, results))
        attack.start()
        time.sleep(1)
        under_attack = _client_latencies(server.url, 5)
        attack.join()
    finally:
        server.stop()

    closed = [r for r in results if r[0] == "closed"]
    open_ = [r for r in results if r[0] == "still-open"]
    statuses = sorted({r[2] for r in closed})
    print(f"attack: {args.connections} connections trickling a byte a second, --read-timeout {args.read_timeout:g}")
    print(
        f"  closed by the server: {len(closed)} (statuses {statuses}); still open after {args.seconds:g} s: {len(open_)}"
    )
    if closed:
        seconds = sorted(r[1] for r in closed)
        print(f"  closed after: median {statistics.median(seconds):.2f} s, max {seconds[-1]:.2f} s")
    for name, taken in (("baseline", baseline), ("under attack", under_attack)):
        print(f"  {name:>12}: {len(taken)} requests, median {statistics.median(taken) * 1000:.0f} ms, "
              f"max {max(taken) * 1000:.0f} ms")  # fmt: skip
    print(
        f"  median latency ratio, under attack / baseline: {statistics.median(under_attack) / statistics.median(baseline):.2f}x"
    )


if __name__ == "__main__":
    main()
