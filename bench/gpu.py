"""Both engine backends on one GPU, on MiniCPM-2B-shaped random bf16 weights; prints one table.

    python -m bench.gpu                                  # native and vllm, default loads
    python -m bench.gpu --engines native --native-extra=--no-compile   # one backend, extra flags
    python -m bench.gpu --bandwidth-gbs 936              # an RTX 3090, if nvidia-smi's name is not known below
    python -m bench.gpu --device cpu --size tiny --concurrency 1,4 --prompt-tokens 300   # smoke test of this script, no GPU
    python -m bench.gpu --quick                          # native only, 1/8/32 streams, 128 tokens: ~3 minutes
    bash scripts/test-gpu.sh                             # pytest -m gpu, then this --quick: a bare GPU machine in < 8 minutes

Measured per backend, each server alone on the GPU:
- batch-1 decode tokens/s (one streamed request of 256 tokens, first token excluded) and that as
  a fraction of the bandwidth ceiling: every decoded token reads all weights once, so a GPU
  with B GB/s cannot decode faster than B / (weight GB) tokens/s at batch 1;
- aggregate tokens/s at 1/8/32/64 concurrent streams of 256 tokens (`--max-batch 64` on both);
- time to first token of a ~1,000-token prompt at idle (median of 5);
- peak GPU memory in use while serving (nvidia-smi).

The weights are random, so answers are noise, but the shapes, the dtype and therefore the cost
per token are MiniCPM-2B's (`--size full` in minicpm_server/model/tiny.py, with the real
tokenizer when MINICPM_REAL_TOKENIZER names it). Needs CUDA; for vllm, `pip install vllm`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bench.compare import REPO, wait_healthy
from bench.load import closed_loop

# Peak memory bandwidth in GB/s by the name nvidia-smi prints (makers' data sheets).
BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100-SXM4-40GB": 1555,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "L40S": 864,
    "A10": 600,
}
STREAM_TOKENS = 256
QUICK_TOKENS = 128
CONCURRENCY = (1, 8, 32, 64)  # the streams of the vLLM issue's GPU measurement


def gpu_name(device: str) -> str:
    if device != "cuda":
        return device
    return subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]


def gpu_memory_used_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    return int(out.stdout.split()[0]) if out.returncode == 0 else 0


def bandwidth_for(name: str) -> float | None:
    return next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in name), None)


def checkpoint(cache: Path, size: str) -> tuple[Path, float]:
    """The MiniCPM-2B-shaped (`full`) bf16 checkpoint, built once, and its weight size in GB."""
    import torch

    from minicpm_server.model.tiny import build_tiny_checkpoint

    real = os.environ.get("MINICPM_REAL_TOKENIZER")
    path = cache / (f"minicpm-{size}-bf16" + ("-real-tokenizer" if real else ""))
    if not (path / ".complete").exists():
        print(f"building {path} (random bf16 weights; 5.5 GB for full) ...", flush=True)
        build_tiny_checkpoint(path, size, seed=0, dtype=torch.bfloat16, tokenizer_from=real)
        (path / ".complete").write_text("ok")
    size = sum(p.stat().st_size for p in path.glob("*.bin")) / 1e9
    return path, size


class MemoryPeak:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode != 0:
            return
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, gpu_memory_used_mib())

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def decode_rate(url: str, tokens: int) -> float:
    """Tokens/s after the first token, for one streamed request at batch 1."""
    body = {"prompt": "hi", "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    stamps = []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def long_prompt_ttft(url: str, prompt_tokens: int = 1000, repeats: int = 5) -> float:
    words = " ".join(f"word{i}" for i in range(prompt_tokens // 3))  # about 3 tokens per word
    times = []
    for i in range(repeats):
        body = {"prompt": f"{i} {words}", "max_tokens": 2, "ignore_eos": True, "stream": True}
        start = time.perf_counter()
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter() - start)
                    break
    return statistics.median(times)


def measure(
    engine: str,
    model: Path,
    port: int,
    device: str,
    extra: list[str],
    concurrency: list[int],
    prompt_tokens: int,
    tokens: int,
    repeats: int,
) -> dict:
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "api.py", "--model-path", str(model), "--engine", engine, "--host", "127.0.0.1"]
    cmd += [
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        "bfloat16",
        "--max-batch",
        "64",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen([*cmd, *extra], cwd=REPO)
    try:
        started = time.perf_counter()
        wait_healthy(url, proc, timeout=1800)
        result: dict = {"start_s": time.perf_counter() - started}
        with MemoryPeak() as memory:
            closed_loop(url + "/", 2, 1, 16)  # warm-up
            result["decode_1"] = decode_rate(url, tokens)
            result["ttft_1000"] = long_prompt_ttft(url, prompt_tokens, repeats)
            for c in concurrency:
                load = closed_loop(url + "/", c, 2, tokens)
                result[f"tps_{c}"] = load.tokens_per_second
                print(f"  {engine} c={c}: {load.tokens_per_second:.0f} tok/s", flush=True)
        result["gpu_mib"] = memory.peak
        return result
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="native,vllm")
    parser.add_argument("--bandwidth-gbs", type=float, help="the GPU's memory bandwidth (default: from its name)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "minicpm-server")
    parser.add_argument("--port", type=int, default=6210)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length for the TTFT measurement")
    parser.add_argument("--size", default="full", help="a size from minicpm_server/model/tiny.py (full: MiniCPM-2B's)")
    parser.add_argument("--native-extra", action="append", default=[], help="extra api.py flags for native")
    parser.add_argument("--vllm-extra", action="append", default=[], help="extra api.py flags for vllm")
    parser.add_argument(
        "--quick", action="store_true", help="native only, 1/8/32 streams of 128 tokens, 3 TTFT samples"
    )
    args = parser.parse_args()
    tokens, repeats = STREAM_TOKENS, 5
    if args.quick:
        args.engines, args.concurrency, tokens, repeats = "native", "1,8,32", QUICK_TOKENS, 3

    concurrency = [int(c) for c in args.concurrency.split(",")]
    name = gpu_name(args.device)
    bandwidth = args.bandwidth_gbs or bandwidth_for(name)
    model, weight_gb = checkpoint(args.cache, args.size)
    ceiling = bandwidth / weight_gb if bandwidth else None
    print(f"GPU: {name}; weights {weight_gb:.2f} GB; batch-1 ceiling {ceiling or float('nan'):.0f} tok/s", flush=True)
    results = {}
    for engine in args.engines.split(","):
        extra = args.native_extra if engine == "native" else args.vllm_extra
        results[engine] = measure(
            engine, model, args.port, args.device, extra, concurrency, args.prompt_tokens, tokens, repeats
        )
    print()
    print("| engine | batch-1 decode tok/s | of ceiling | " + " | ".join(f"{c} streams tok/s" for c in concurrency)
          + " | TTFT long prompt | GPU memory | start-up |")  # fmt: skip
    print("| --- " * (6 + len(concurrency)) + "|")
    for engine, r in results.items():
        share = f"{r['decode_1'] / ceiling:.0%}" if ceiling else "?"
        streams = " | ".join(f"{r[f'tps_{c}']:.0f}" for c in concurrency)
        print(
            f"| {engine} | {r['decode_1']:.1f} | {share} | {streams} | {r['ttft_1000'] * 1000:.0f} ms "
            f"| {r['gpu_mib'] / 1024:.1f} GiB | {r['start_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
