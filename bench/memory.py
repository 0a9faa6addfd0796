"""Memory and start-up of the full-size model on CPU: our server against llama.cpp's llama-server.

    flock /tmp/fullsize.lock python -m bench.memory --model ~/.cache/minicpm-server/minicpm-full-seed0-real-tokenizer
    ... --precisions float32,bfloat16,int8 --caches warm,cold --rounds 1
    ... --before /tmp/base     # also run another checkout of ours (e.g. `git archive` of main) as "before"
    ... --at-load              # also ours with --packing at-load (layers packed before ready) as "ours-at-load"

Each server is started alone, on the same checkpoint at the same precision (llama-server on a
GGUF that llama.cpp's converter makes from it: F32 or BF16, bench/peers.py), and measured:

* ready: seconds from starting the process to its /health answering 200 (both servers answer
  503 while they load);
* peak RSS: the process's VmHWM after the load and two requests (the kernel's own high-water
  mark of its resident memory, so nothing between two samples is missed);
* steady RSS after the second request (below), split from /proc/PID/smaps_rollup into private
  (anonymous) memory and file-backed pages (a mapped checkpoint counts there: llama-server maps its GGUF and
  computes from the mapping, by design);
* first token and decode speed of a streamed request sent once ready (the 78-token prompt of
  bench/peers.py, 32 tokens, the tutorial's sampling, ignore_eos): a check that lowering memory
  did not cost speed, not the benchmark of record for speed (bench/peers.py is);
* settled: seconds from the start until the weights are in their final form (the ready time,
  or for ours with --packing after-start, the default, when its log says the layers packed after
  start-up are all packed), then a second request's first token and decode speed.

"warm" starts with the checkpoint in the OS page cache (read once before the round), "cold"
drops the page cache first (`echo 1 > /proc/sys/vm/drop_caches`; when that is not permitted the
output says so and cold rounds are skipped). Servers take turns within each round so the shared
machine's noise hits all alike; the table shows medians over rounds, and ratios ours / llama-server.

KV cache: llama-server holds one 4096-token slot (-np 1 -c 4096, KV in the weights' precision),
and allocates and clears it at start, so its pages are resident. Ours keeps its default pool
(2 GiB on CPU, pages touched only when written): that difference is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import requests

from bench.peers import (
    LLAMA_SERVER,
    Prompts,
    Server,
    ensure_llama_built,
    gguf_for,
    llama_server,
    our_server,
    port_free,
    start_server,
    stop_server,
)
from minicpm_server.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
# precision -> (the GGUF's --outtype, llama-server's KV cache type); int8 is ours with
# --quantization int8 (weight-only, per channel) beside Q8_0, KV in float32 on both sides.
GGUF_TYPES = {
    "float32": ("f32", "f32"),
    "bfloat16": ("bf16", "bf16"),
    "int8": ("q8_0", "f32"),
    "int8-head": ("q8_0", "f32"),  # ours with --quantize-head too
}
NEW_TOKENS = 32
WINDOW = 4096


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and friends in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Anonymous, Private_*, Shared_* ... in bytes, summed over the process's mappings."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def warm_page_cache(paths: list[Path]) -> None:
    """Read the files once so they sit in the page cache (as after a previous start)."""
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(64 << 20):
                pass


# --------------------------------------------------------------------------- one start


@dataclass
class Start:
    ready_s: float
    peak_gb: float
    steady_gb: float
    private_gb: float
    file_gb: float
    ttft_s: float
    decode_tps: float
    settled_s: float  # until the weights are in their final form: ready, or packed after start-up
    settled_ttft_s: float  # a second request, once settled
    settled_tps: float
    timeline: list[str]


def log_timeline(log_file: Path, started_wall: float) -> list[str]:
    """The server log's timestamped lines as seconds since its process started (where the
    start-up time went); lines without a timestamp (llama-server's) are left out."""
    out = []
    for line in log_file.read_text(errors="replace").splitlines():
        stamp = log_stamp(line)
        if stamp is not None:
            out.append(f"{stamp - started_wall:6.1f} s  {line[24:][:150]}")
    return out


def log_stamp(line: str) -> float | None:
    """The wall-clock time our server's log line starts with, or None."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def wait_ready(url: str, proc: subprocess.Popen, started: float, timeout: float = 900) -> float:
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout} s")


def one_request(server: Server, url: str, prompts: Prompts, new_tokens: int) -> tuple[float, float]:
    """(first token seconds, decode tokens/s) of one streamed request of `new_tokens` tokens.
    The first chunk that carries a choice marks the first token: random weights may well
    generate a first token whose text is still empty (a partial UTF-8 byte sequence)."""
    body = server.body(prompts.next(), new_tokens, True)
    start = time.perf_counter()
    first = None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if json.loads(line[6:]).get("choices"):
                first = first or time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{server.name}: the stream carried no tokens")
    return first - start, (new_tokens - 1) / max(end - first, 1e-9)


# Our weights line when layers are packed (oneDNN) or copied (our kernels) after start-up: "...
# mapped to pack after start-up (...)", "... mapped and read where they are until copied after
# start-up (...)"; and the line once they all are: "packed N linear layers for oneDNN after
# start-up in X s", "copied N weight matrices out of the checkpoint's mapping after start-up in X s".
DEFERRED = "after start-up ("
PACKED = "after start-up in "


def wait_settled(log_file: Path, proc: subprocess.Popen, started_wall: float, timeout: float = 900) -> float | None:
    """Seconds from the start until the server's weights were in their final form, from the time
    stamp of its log line saying so; None for a server that packs nothing after start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_file.read_text(errors="replace").splitlines()
        if not any(DEFERRED in line for line in lines):
            return None
        done = next((log_stamp(line) for line in lines if PACKED in line), None)
        if done is not None:
            return done - started_wall
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while packing")
        time.sleep(0.1)
    raise RuntimeError(f"not packed after {timeout} s")


def measure_start(server: Server, port: int, prompts: Prompts, log_file: Path, new_tokens: int) -> Start:
    if not port_free(port):
        raise RuntimeError(f"port {port} is busy")
    url = f"http://127.0.0.1:{port}"
    started, started_wall = time.monotonic(), time.time()
    proc = start_server(server, log_file)
    try:
        ready = wait_ready(url, proc, started)
        ttft, tps = one_request(server, url, prompts, new_tokens)
        settled = wait_settled(log_file, proc, started_wall) or ready
        settled_ttft, settled_tps = one_request(server, url, prompts, new_tokens)
        status, rollup = proc_status(proc.pid), smaps_rollup(proc.pid)
    finally:
        stop_server(proc)
    private = rollup.get("Anonymous", 0)
    return Start(
        ready_s=ready,
        peak_gb=status["VmHWM"] / 1e9,
        steady_gb=status["VmRSS"] / 1e9,
        private_gb=private / 1e9,
        file_gb=(rollup.get("Rss", 0) - private) / 1e9,
        ttft_s=ttft,
        decode_tps=tps,
        settled_s=settled,
        settled_ttft_s=settled_ttft,
        settled_tps=settled_tps,
        timeline=log_timeline(log_file, started_wall),
    )


# --------------------------------------------------------------------------- the runs


def ours_at(tree: Path, name: str, model: Path, precision: str, port: int, *extra: str) -> Server:
    """Our server from the checkout at `tree`, logging at info level: its log says when each
    start-up phase ended (weights, KV cache, decode step)."""
    server = our_server(name, sys.executable, "native", model, port, packing=None)  # the server's default
    server.argv[1] = str(tree / "api.py")
    server.argv[server.argv.index("--log-level") + 1] = "info"
    if precision.startswith("int8"):
        server.argv += ["--quantization", "int8", *(["--quantize-head"] if precision == "int8-head" else [])]
    else:
        server.argv += ["--dtype", precision]
    server.argv += list(extra)
    server.env = {**server.env, "PYTHONPATH": str(tree)}
    return server


def servers_for(args, precision: str, port: int) -> dict[str, tuple[Server, list[Path]]]:
    """name -> (server, the files its start reads)."""
    model = Path(args.model).expanduser()
    weights = sorted(model.glob("*.bin")) + sorted(model.glob("*.safetensors"))
    out = {}
    out["ours"] = (ours_at(REPO, "ours", model, precision, port), weights)
    if args.at_load:
        out["ours-at-load"] = (ours_at(REPO, "ours-at-load", model, precision, port, "--packing", "at-load"), weights)
    if args.before:
        out["before"] = (ours_at(Path(args.before), "before", model, precision, port), weights)
    if "llama" in args.peers:
        outtype, kv = GGUF_TYPES[precision]
        gguf = gguf_for(model, outtype)
        llama = llama_server("llama", gguf, 1, WINDOW, port)
        llama.argv = [a if a != "f32" else kv for a in llama.argv]  # KV in the weights' precision
        out["llama"] = (llama, [gguf])
    return out


def run(args) -> dict[tuple[str, str, str], list[Start]]:
    model = Path(args.model).expanduser()
    prompts = Prompts(load_tokenizer(model), "unique")
    results: dict[tuple[str, str, str], list[Start]] = {}
    cold_ok = True
    logs = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    print(f"server logs in {logs}; load average {os.getloadavg()}", flush=True)
    for round_no in range(args.rounds):
        for precision in args.precisions:
            servers = servers_for(args, precision, args.port)
            for cache in args.caches:
                for name, (server, files) in servers.items():
                    if cache == "cold":
                        cold_ok = drop_page_cache()
                        if not cold_ok:
                            print("cold: dropping the page cache is not permitted here; skipped", flush=True)
                            continue
                    else:
                        warm_page_cache(files)
                    log_file = logs / f"{name}-{precision}-{cache}-{round_no}.log"
                    try:
                        start = measure_start(server, args.port, prompts, log_file, args.new_tokens)
                    except RuntimeError as exc:  # e.g. an old checkout that cannot load this precision
                        print(
                            f"round {round_no} {precision} {cache} {name}: FAILED: {exc} (log {log_file})", flush=True
                        )
                        continue
                    results.setdefault((name, precision, cache), []).append(start)
                    print(f"round {round_no} {precision} {cache} {name}:", flush=True)
                    print("\n".join(f"    {line}" for line in start.timeline), flush=True)
                    print(f"    {replace(start, timeline=[])}", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    return results


def median(starts: list[Start], field: str) -> float:
    return statistics.median(getattr(s, field) for s in starts)


def report(results: dict[tuple[str, str, str], list[Start]]) -> None:
    fields = (
        "peak_gb",
        "steady_gb",
        "private_gb",
        "file_gb",
        "ready_s",
        "ttft_s",
        "decode_tps",
        "settled_s",
        "settled_ttft_s",
        "settled_tps",
    )
    print(
        "\n| server | precision | page cache | peak RSS GB | steady RSS GB | private GB | file-backed GB "
        "| ready s | first token s | decode tok/s | settled s | then first token s | then decode tok/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, precision, cache), starts in results.items():
        cells = " | ".join(f"{median(starts, f):.2f}" for f in fields)
        print(f"| {name} | {precision} | {cache} | {cells} |")
    ratio_table(results, "llama", ("ours", "ours-at-load", "before"))
    ratio_table(results, "before", ("ours",))


def ratio_table(results: dict[tuple[str, str, str], list[Start]], baseline: str, names: tuple[str, ...]) -> None:
    fields = ("peak_gb", "steady_gb", "ready_s", "ttft_s", "decode_tps", "settled_s")
    rows = []
    for (name, precision, cache), starts in results.items():
        base = results.get((baseline, precision, cache))
        if name in names and base:
            ratios = " | ".join(f"{median(starts, f) / median(base, f):.2f}x" for f in fields)
            rows.append(f"| {name} | {precision} | {cache} | {ratios} |")
    if rows:
        print(
            f"\n| server | precision | page cache | peak RSS / {baseline} | steady RSS / {baseline} "
            f"| ready / {baseline} | first token / {baseline} | decode tok/s / {baseline} | settled / {baseline} |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--precisions", default="float32,bfloat16", type=lambda s: s.split(","))
    parser.add_argument("--caches", default="warm,cold", type=lambda s: s.split(","))
    parser.add_argument("--peers", default="llama", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--before", default=None, help="another checkout of ours, measured as 'before'")
    parser.add_argument(
        "--at-load", action="store_true", help="also ours with --packing at-load, measured as 'ours-at-load'"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--port", type=int, default=18431)
    args = parser.parse_args()
    if "llama" in args.peers and not LLAMA_SERVER.is_file():
        ensure_llama_built()
    report(run(args))


if __name__ == "__main__":
    main()
