"""Our server vs the tutorial's design, same checkpoint, same load, one run; prints ratios.

    python -m bench.compare                      # medium CPU checkpoint, 1/4/16/32 clients, 48 tokens
    python -m bench.compare --size tiny --concurrency 1,4 --new-tokens 16     # a quick look

Each server runs alone on the machine while it is measured. Every request asks for exactly
`--new-tokens` tokens (ignore_eos), so tokens/s compares equal work. Our token counts come from
the server's own /metrics, so an early stop would not inflate them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.load import BusyClients, HealthProbe, closed_loop, streamed_ttft
from minicpm_server.model.tiny import cached_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def start(kind: str, model: Path, port: int, device: str, extra: list[str]) -> subprocess.Popen:
    if kind == "ours":
        cmd = [
            sys.executable,
            "api.py",
            "--model-path",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            device,
            "--log-level",
            "warning",
            *extra,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "bench.tutorial_server",
            "--model-path",
            str(model),
            "--port",
            str(port),
            "--device",
            device,
        ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def generated_tokens(url: str) -> float | None:
    text = requests.get(url + "/metrics", timeout=10).text if url else ""
    match = re.search(r"^minicpm_generation_tokens_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def per_client(concurrency: int) -> int:
    return max(1, 8 // concurrency) if concurrency < 8 else 1


def measure(kind: str, url: str, concurrencies: list[int], new_tokens: int) -> dict:
    out: dict = {"throughput": {}, "latency": {}}
    closed_loop(url, 2, 1, new_tokens)  # warm-up
    for c in concurrencies:
        before = generated_tokens(url) if kind == "ours" else None
        if c == 16:
            with HealthProbe(url) as probe:
                result = closed_loop(url, c, per_client(c), new_tokens)
            out["health_under_16"] = probe.summary()
        else:
            result = closed_loop(url, c, per_client(c), new_tokens)
        tokens = result.tokens if before is None else generated_tokens(url) - before
        out["throughput"][c] = tokens / result.seconds
        out["latency"][c] = statistics.median(result.latencies)
        print(
            f"  {kind:8s} c={c:<3d} {out['throughput'][c]:8.1f} tok/s  median latency {out['latency'][c]:.2f} s",
            flush=True,
        )
    out["ttft_under_16"] = ttft_under_load(kind, url, new_tokens)
    return out


def ttft_under_load(kind: str, url: str, new_tokens: int) -> float:
    """Median time to first token of a request sent while 16 clients keep the server busy.
    The tutorial design cannot stream, so its first token arrives with the whole answer."""
    samples = []
    with BusyClients(url, 16, new_tokens):
        time.sleep(1.0)
        for _ in range(3 if kind == "ours" else 1):
            if kind == "ours":
                samples.append(streamed_ttft(url, new_tokens))
            else:
                samples.append(closed_loop(url, 1, 1, new_tokens).latencies[0])
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--model-path", help="an existing checkpoint instead of a built one")
    parser.add_argument(
        "--tokenizer-from", help="build the checkpoint on this directory's tokenizer.model (MiniCPM-2B's real one)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ours-args", default="", help="extra api.py flags, e.g. '--max-batch 64'")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpm-server"
    model = (
        Path(args.model_path)
        if args.model_path
        else cached_tiny_checkpoint(cache, args.size, seed=0, tokenizer_from=args.tokenizer_from)
    )
    print(f"checkpoint {model}, {args.new_tokens} new tokens per request, device {args.device}", flush=True)
    results = {}
    for kind, port in (("ours", 6201), ("tutorial", 6202)):
        proc = start(kind, model, port, args.device, args.ours_args.split())
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            results[kind] = measure(kind, url, concurrencies, args.new_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    report(results, concurrencies)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(results: dict, concurrencies: list[int]) -> None:
    ours, base = results["ours"], results["tutorial"]
    print("\n| clients | ours tok/s | tutorial tok/s | ratio | ours median latency | tutorial median latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in concurrencies:
        ratio = ours["throughput"][c] / base["throughput"][c]
        print(
            f"| {c} | {ours['throughput'][c]:.1f} | {base['throughput'][c]:.1f} | {ratio:.2f}x "
            f"| {ours['latency'][c]:.2f} s | {base['latency'][c]:.2f} s |"
        )
    if 1 in concurrencies:
        print(f"\nsingle request latency, ours / tutorial: {ours['latency'][1] / base['latency'][1]:.2f}")
    print(
        f"time to first token under 16-client load: ours {ours['ttft_under_16']:.2f} s (streamed), "
        f"tutorial {base['ttft_under_16']:.2f} s (whole answer)"
    )
    for kind in ("ours", "tutorial"):
        h = results[kind].get("health_under_16")
        if h:
            print(
                f"/health under 16-client load, {kind}: median {h['median_ms']:.1f} ms, max {h['max_ms']:.1f} ms (n={h['n']})"
            )


if __name__ == "__main__":
    main()
