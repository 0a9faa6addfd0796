"""Prompt scoring speed, ours against vLLM's prompt logprobs: same checkpoint, same prompts, one run.

    python -m bench.scoring                  # medium checkpoint, 512- and 128-token prompts, 1 and 4 clients, 3 rounds
    python -m bench.scoring --quick          # 1 round, few requests: a smoke run
    python -m bench.scoring --requests 4     # requests per client in each measurement (default 8)
    python -m bench.scoring --json out.json  # also keep every measurement's raw numbers (written as they come)

What is measured: prompt tokens scored per second. Every request is `POST /v1/completions` with
`{"prompt": [[ids]], "max_tokens": 0, "echo": true, "logprobs": 1}` (vLLM also gets `"model"`),
and its answer must carry `choices[0].logprobs.token_logprobs` for every prompt token (the first
null) and `usage.prompt_tokens` equal to the prompt's length; vLLM's must also carry
`prompt_logprobs` of that length. vLLM serves `max_tokens: 0` with echo by generating one token
and dropping it, so it does one decode step more
than ours per request. Should a vLLM refuse `max_tokens: 0`, the run starts again with
`max_tokens: 1` for both servers (`--max-tokens 1` asks for that from the start); the printed
header says which was sent.

Prompts: token ids drawn from a seeded generator, uniformly from 1000..vocab-1000 (ordinary
pieces, no control tokens; a smaller range on smaller vocabularies). vLLM keeps prefix caching on,
as bench.peers starts it, and our engine has a prefix cache too, so no two requests of a server's
run share a prompt: the warm-up and each (length, clients) measurement have their own prompts.
Both servers get the same prompts, and a server is restarted each round, so no round starts warm.

Load: closed-loop clients (each sends its requests back to back, non-streamed) at each
`--concurrency` (default 1 and 4) for each `--lengths` (default 512 and 128 tokens). Each client
sends `--requests` requests (default 8, `--quick` 2); on this 2-core machine a measurement of ours
takes about 15-60 s (128-token prompts are not given more requests: a request's fixed cost
dominates them). Throughput is the prompt tokens of all requests over the measurement's wall time.

Servers (from bench.peers, each alone on the machine while it is measured: start, warm up, measure
every setting, stop): ours is `python api.py --engine native --device cpu`; vLLM is its OpenAI
server on the Granite-format copy of the checkpoint (model/export.py), float32, both cores.
They take turns (ours, vLLM, ours, vLLM, ...) for `--repeats` rounds; the table shows medians,
the ratio ours/vLLM against the target (at least 1.0), and each median's min-max over rounds
(the shared machine's noise). Warm-up per server: two requests of each length, then one per client
at the highest concurrency.

Correctness, in the same run: the first prompt of each (length, clients) setting is scored by
both servers each round; their token_logprobs must agree within 1e-3 (float32 weights on both).
The largest difference is printed; a disagreement makes the exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.compare import wait_healthy
from bench.load import closed_loop
from bench.peers import (
    CACHE,
    Server,
    granite_dir_for,
    our_server,
    port_free,
    start_server,
    stop_server,
    versions,
    vllm_server,
)
from minicpm_server.model.tiny import SIZES, cached_tiny_checkpoint

SERVERS = ("ours", "vllm")
LABELS = {"ours": "ours", "vllm": "vLLM"}
TARGET = 1.0  # ours/vLLM in prompt tokens scored per second
TOLERANCE = 1e-3  # largest |difference| of a token's logprob between the servers
DEFAULT_REQUESTS, QUICK_REQUESTS = 8, 2


class MaxTokensZeroRefused(RuntimeError):
    """vLLM answered `max_tokens: 0` (with echo) with an error."""


# --------------------------------------------------------------------------- prompts


def id_range(vocab_size: int) -> tuple[int, int]:
    """Ordinary pieces: 1000..vocab-1000 on the benchmark's vocabularies, a middle half on small ones."""
    margin = min(1000, vocab_size // 4)
    return margin, vocab_size - margin


def random_prompts(tag: str, seed: int, count: int, length: int, vocab_size: int) -> list[list[int]]:
    """`count` prompts of `length` ids, the same for a given (tag, seed): both servers score these."""
    rng = random.Random(f"{tag}-{seed}")  # a string seed is hashed the same in every process
    low, high = id_range(vocab_size)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


# --------------------------------------------------------------------------- requests


def score_body(server: Server, ids: list[int], max_tokens: int) -> dict:
    body = {"prompt": [ids], "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0.0}
    if "model" in server.extra_body:  # vLLM's served model name
        body["model"] = server.extra_body["model"]
    return body


def score(server: Server, url: str, ids: list[int], max_tokens: int, session: requests.Session) -> list[float]:
    """The prompt's token_logprobs (its first token's null left out), every field of the answer checked."""
    r = session.post(url + "/v1/completions", json=score_body(server, ids, max_tokens), timeout=600)
    if r.status_code != 200:
        if server.name == "vllm" and max_tokens == 0 and r.status_code in (400, 422):
            raise MaxTokensZeroRefused(f"vLLM refused max_tokens 0: {r.text[:300]}")
        raise RuntimeError(f"{server.name}: {r.status_code} {r.text[:300]}")
    answer = r.json()
    choice = answer["choices"][0]
    n = len(ids)
    if answer["usage"]["prompt_tokens"] != n:
        raise RuntimeError(f"{server.name}: usage {answer['usage']} for a {n}-token prompt")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if len(logprobs) != n + max_tokens or logprobs[0] is not None or None in logprobs[1:]:
        raise RuntimeError(
            f"{server.name}: {len(logprobs)} token_logprobs for a {n}-token prompt and {max_tokens} new tokens"
            f" (first {logprobs[:2]})"
        )
    if server.name == "vllm":
        prompt_logprobs = choice.get("prompt_logprobs") or []
        if len(prompt_logprobs) != n or prompt_logprobs[0] is not None:
            raise RuntimeError(f"vllm: {len(prompt_logprobs)} prompt_logprobs for a {n}-token prompt")
    return [float(x) for x in logprobs[1:n]]


class PromptFeed:
    """Hands the clients of one measurement its prompts in order; keeps the first one's logprobs."""

    def __init__(self, server: Server, prompts: list[list[int]], max_tokens: int) -> None:
        self.server, self.max_tokens = server, max_tokens
        self._prompts = iter(enumerate(prompts))
        self._lock = threading.Lock()
        self.first: list[float] | None = None

    def send(self, url: str, _new_tokens: int, session: requests.Session) -> float:
        with self._lock:
            index, ids = next(self._prompts)
        start = time.perf_counter()
        logprobs = score(self.server, url, ids, self.max_tokens, session)
        seconds = time.perf_counter() - start
        if index == 0:
            self.first = logprobs
        return seconds


# --------------------------------------------------------------------------- one server, one round


def setting_key(length: int, clients: int) -> str:
    return f"{length} tokens, {clients} client{'s' if clients > 1 else ''}"


def warm_up(server: Server, url: str, args, vocab_size: int) -> None:
    with requests.Session() as session:
        for length in args.lengths:
            for ids in random_prompts(f"warm-{length}", args.seed, 2, length, vocab_size):
                score(server, url, ids, args.max_tokens, session)
    clients = max(args.concurrency)
    warm = random_prompts("warm-clients", args.seed, clients, max(args.lengths), vocab_size)
    feed = PromptFeed(server, warm, args.max_tokens)
    closed_loop(url, clients, 1, max(args.lengths), feed.send)


def measure(server: Server, url: str, args, vocab_size: int, prompts: dict) -> list[dict]:
    warm_up(server, url, args, vocab_size)
    rows = []
    for length, clients in itertools.product(args.lengths, args.concurrency):
        feed = PromptFeed(server, prompts[length, clients], args.max_tokens)
        # closed_loop counts its `new_tokens` argument per request: here, each request's prompt tokens.
        result = closed_loop(url, clients, args.requests, length, feed.send)
        rows.append(
            {
                "length": length,
                "clients": clients,
                "requests": result.requests,
                "tokens": result.tokens,
                "seconds": result.seconds,
                "tok/s": result.tokens_per_second,
                "median latency (s)": statistics.median(result.latencies),
                "first logprobs": feed.first,
            }
        )
        print(
            f"    {LABELS[server.name]:4s} {setting_key(length, clients):20s} {result.tokens_per_second:8.0f} tok/s"
            f"  ({result.requests} requests in {result.seconds:.1f} s, median latency"
            f" {statistics.median(result.latencies) * 1000:.0f} ms)",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- the run


def run(args) -> dict:
    model = Path(args.model_path) if args.model_path else cached_tiny_checkpoint(CACHE, args.size, seed=0)
    config = json.loads((model / "config.json").read_text())
    vocab_size, window = config["vocab_size"], config["max_position_embeddings"]
    if max(args.lengths) + 1 > window:
        raise SystemExit(f"prompts of {max(args.lengths)} tokens do not fit the {window}-token window")
    makers = {
        "ours": functools.partial(our_server, "ours", args.ours_python, args.ours_engine, model),
        "vllm": functools.partial(vllm_server, "vllm", args.vllm_venv, granite_dir_for(model), window),
    }
    prompts = {
        (length, clients): random_prompts(
            f"measure-{length}-{clients}", args.seed, clients * args.requests, length, vocab_size
        )
        for length, clients in itertools.product(args.lengths, args.concurrency)
    }
    low, high = id_range(vocab_size)
    print(f"checkpoint {model} (vocabulary {vocab_size}, window {window})")
    for name, version in versions(["vllm"], args.vllm_venv).items():
        print(f"{name}: {version}")
    print(
        f"prompts: random ids in {low}..{high - 1} (seed {args.seed}), {args.lengths} tokens; clients"
        f" {args.concurrency}; requests per client {args.requests};"
        f" {args.repeats} round(s)"
    )
    while True:
        print(f'request: {{"prompt": [[ids]], "max_tokens": {args.max_tokens}, "echo": true, "logprobs": 1}}')
        try:
            return rounds(args, makers, vocab_size, prompts)
        except MaxTokensZeroRefused as exc:
            print(f"{exc}\nstarting again with max_tokens 1 for both servers", flush=True)
            args.max_tokens = 1


def rounds(args, makers: dict, vocab_size: int, prompts: dict) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="minicpm-scoring-"))
    results: dict = {"max_tokens": args.max_tokens, "rounds": {name: [] for name in SERVERS}}
    port = args.port
    for repeat in range(1, args.repeats + 1):
        print(f"round {repeat}/{args.repeats}", flush=True)
        for name in SERVERS:
            while not port_free(port):
                port += 1
            server = makers[name](port)
            log_file = logs / f"{name}-{repeat}.log"
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            proc = start_server(server, log_file)
            try:
                wait_healthy(url, proc, timeout=1200)
                print(f"  {LABELS[name]}: ready in {time.perf_counter() - started:.0f} s (log {log_file})", flush=True)
                results["rounds"][name].append(measure(server, url, args, vocab_size, prompts))
            except MaxTokensZeroRefused:
                raise
            except Exception as exc:  # one failed round leaves a gap, not a lost run
                print(f"  {name} failed in round {repeat}: {exc}; its log: {log_file}", file=sys.stderr, flush=True)
            finally:
                stop_server(proc)
            if args.json:  # what is measured so far survives an interrupted run
                Path(args.json).write_text(json.dumps(results, indent=2))
            port += 1
    return results


# --------------------------------------------------------------------------- the report


def by_setting(runs: list[list[dict]]) -> dict[tuple[int, int], list[dict]]:
    out: dict[tuple[int, int], list[dict]] = {}
    for rows in runs:
        for row in rows:
            out.setdefault((row["length"], row["clients"]), []).append(row)
    return out


def logprob_difference(results: dict) -> dict[tuple[int, int], float]:
    """Per setting, the largest |ours - vLLM| over the first prompt's token logprobs, all rounds paired."""
    ours, vllm = (by_setting(results["rounds"][name]) for name in SERVERS)
    out = {}
    for key in ours.keys() & vllm.keys():
        diffs = [
            abs(a - b)
            for x in ours[key]
            for y in vllm[key]
            if x["first logprobs"] and y["first logprobs"]
            for a, b in zip(x["first logprobs"], y["first logprobs"], strict=True)
        ]
        if diffs:
            out[key] = max(diffs)
    return out


def report(results: dict) -> bool:
    """Prints the table and the checks; False when the servers' logprobs disagree."""
    ours, vllm = (by_setting(results["rounds"][name]) for name in SERVERS)
    print(f'\nscoring: {{"max_tokens": {results["max_tokens"]}, "echo": true, "logprobs": 1}}, prompt tokens/s')
    header = [
        "prompt tokens",
        "clients",
        "ours",
        "vLLM",
        "ours/vLLM",
        f"target ≥ {TARGET}",
        "ours min-max",
        "vLLM min-max",
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for key in sorted(ours.keys() | vllm.keys(), key=lambda k: (-k[0], k[1])):
        speeds = {
            name: [r["tok/s"] for r in side.get(key, [])] for name, side in zip(SERVERS, (ours, vllm), strict=True)
        }
        med = {name: statistics.median(v) if v else None for name, v in speeds.items()}
        cells = [str(key[0]), str(key[1])]
        cells += [f"{m:.0f}" if m else "-" for m in med.values()]
        if med["ours"] and med["vllm"]:
            ratio = med["ours"] / med["vllm"]
            cells += [f"{ratio:.2f}", "met" if ratio >= TARGET else "missed"]
        else:
            cells += ["-", "-"]
        cells += [f"{min(v):.0f}-{max(v):.0f}" if v else "-" for v in speeds.values()]
        print("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{LABELS[n]} {len(results['rounds'][n])}" for n in SERVERS)
    print(f"\nmedians over rounds (measured: {counts}); min-max: the spread of one server's rounds")
    diffs = logprob_difference(results)
    if not diffs:
        print("logprobs: nothing to compare (a server has no measurements)")
        return True
    worst = max(diffs.values())
    per = ", ".join(
        f"{setting_key(*k)} {v:.1e}" for k, v in sorted(diffs.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    )
    ok = worst <= TOLERANCE
    print(
        f"logprobs of each setting's first prompt, ours vs vLLM: max |difference| {worst:.2e}"
        f" ({'agree' if ok else 'DISAGREE'}, tolerance {TOLERANCE:g}; {per})"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", default="medium", choices=sorted(SIZES), help="tiny checkpoint shape (medium: 28 M parameters)"
    )
    parser.add_argument("--model-path", help="an existing MiniCPM checkpoint instead of a built one")
    parser.add_argument("--lengths", default="512,128", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, help="requests per client in each measurement (default 8; --quick 2)")
    parser.add_argument("--repeats", type=int, help="rounds of both servers in turn (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 2 requests per client")
    parser.add_argument("--max-tokens", type=int, default=0, choices=(0, 1), help="sent with echo (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--ours-python", default=sys.executable, help="python that runs our api.py")
    parser.add_argument("--ours-engine", default="native", help="our server's --engine")
    parser.add_argument("--vllm-venv", type=Path, default=CACHE / "vllm-venv")
    parser.add_argument("--port", type=int, default=6351, help="first port to try (127.0.0.1)")
    parser.add_argument("--json", help="also write the raw results here (as they come)")
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    args.repeats = args.repeats or (1 if args.quick else 3)
    results = run(args)
    ok = report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
