"""The Ray Serve application on a local Ray cluster: throughput at 1 and 2 replicas, 5-turn chats
routed by prefix vs Ray's default (power of two choices), and recovery from a killed replica.

    bash scripts/test-ray.sh --collect-only -q >/dev/null   # makes the Ray venv once
    ~/.cache/minicpm-server/ray-venv/bin/python -m bench.ray_serve            # tiny model, ~6 min
    ~/.cache/minicpm-server/ray-venv/bin/python -m bench.ray_serve --size medium

Everything runs in one Ray cluster in one run, so the machine's load hits all arms alike. The
helpers here (a local cluster, the chat workload, replica processes, Ray's metrics export) are
also what tests/test_ray.py drives.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
REPLICA_DEPLOYMENT = "MiniCPMReplica"
HITS = "minicpm_prefix_cache_hit_tokens_total"
PROMPT_TOKENS = "minicpm_prompt_tokens_total"
# Replicas copy their metrics to Ray's export every second here (2 s by default).
FAST_METRICS = {"metrics_export_period_s": 1.0}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray cluster in this process, Serve's proxy on a loopback port, and Ray's metrics export.

    Each engine replica gets one torch thread: on a small machine, replicas that each take every
    core fight over them."""

    def __init__(self, num_cpus: int = 4) -> None:
        import ray
        from ray import serve

        self.metrics_port = _free_port()
        # Ray's own metric reports every second (default 10 s), so a measurement's totals settle fast.
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
        env = {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
        }
        ray.init(
            address="local",  # a cluster of its own, never one that `ray start` left running here
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            _metrics_export_port=self.metrics_port,
            logging_level="warning",
            log_to_driver=False,
        )
        self.port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, apps: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, str]:
        """Applications by name, each under /NAME, from (settings, Ray args), deployed together;
        returns once all are running, with their base URLs."""
        from ray import serve

        from minicpm_server.deploy.ray_serve import build_app

        targets = [
            serve.RunTarget(target=build_app({**settings, **ray_args}), name=name, route_prefix=f"/{name}")
            for name, (settings, ray_args) in apps.items()
        ]
        serve.run_many(targets)
        return {name: f"{self.url}/{name}" for name in apps}

    def wait_running(self, name: str, replicas: int, timeout: float = 300) -> None:
        """Until the app's engine deployment has exactly `replicas` running and no others."""
        deadline = time.monotonic() + timeout
        while (states := replica_states(name)) != {"RUNNING": replicas}:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: replicas {states}, wanted {replicas} running")
            time.sleep(0.5)

    def wait_replaced(self, name: str, old_pids: set[int], replicas: int, timeout: float = 300) -> None:
        """Until a replica process not among `old_pids` exists and Ray runs `replicas` replicas
        in `replicas` processes (right after a kill, Ray still counts the dead one as running)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = set(replica_pids(name))
            if pids - old_pids and len(pids) == replicas and replica_states(name) == {"RUNNING": replicas}:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: not replaced; processes {pids}, states {replica_states(name)}")
            time.sleep(0.2)

    def metric_by_replica(self, name: str, app: str) -> dict[str, float]:
        """A replica metric from Ray's export, per replica of the app (the `replica` label)."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(f"ray_{name}{{") and f'application="{app}"' in line:
                labels, value = line.rsplit(" ", 1)
                replica = labels.split('replica="', 1)[1].split('"', 1)[0]
                found[replica] = float(value)
        return found

    def settled_totals(self, names: list[str], apps: list[str], timeout: float = 60) -> dict[tuple[str, str], float]:
        """Each metric's total over each app's replicas, once two reads 2.5 s apart agree (the
        replicas copy every second, Ray reports every second)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            totals = {(n, a): sum(self.metric_by_replica(n, a).values()) for n in names for a in apps}
            if totals == last or time.monotonic() > deadline:
                return totals
            last = totals
            time.sleep(2.5)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def replica_states(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or REPLICA_DEPLOYMENT not in status.deployments:
        return {}
    return {
        str(k.value if hasattr(k, "value") else k): v
        for k, v in status.deployments[REPLICA_DEPLOYMENT].replica_states.items()
        if v
    }


def replica_pids(app: str) -> list[int]:
    """Engine replicas' processes, by the title Ray gives them."""
    title = f"ray::ServeReplica:{app}:{REPLICA_DEPLOYMENT}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


# --------------------------------------------------------------------------- workloads


@dataclass
class Turn:
    client: int
    turn: int
    ttft: float
    replica: str
    prompt_chars: int


def question(chat: str, turn: int) -> str:
    """A distinct opening per chat (its name first), so chats share no prefix with each other."""
    body = "what is the highest mountain and the longest river near the city, how are you, hello world " * 3
    return f"CHAT-{chat} TURN-{turn} {body}"


def chat_turn(url: str, messages: list[dict], answer_tokens: int, timeout: float = 120) -> tuple[str, float, str]:
    """One streamed greedy chat turn: its answer, time to first token, and the replica."""
    body = {"messages": messages, "max_tokens": answer_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    ttft, parts = None, []
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        replica = response.headers.get("x-minicpm-replica", "")
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and ttft is None:
                ttft = time.perf_counter() - start
            parts.append(delta)
    return "".join(parts), ttft if ttft is not None else time.perf_counter() - start, replica


def chat_sessions(url: str, clients: int = 8, turns: int = 5, answer_tokens: int = 8, run: str = "") -> list[Turn]:
    """`clients` chats at once, each `turns` turns resending its history, as chat clients do.
    Chats are named by `run` and client, so a repeated run does not find its chats cached."""

    def one_chat(client: int) -> list[Turn]:
        messages: list[dict] = []
        done = []
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": question(f"{run}{client}", turn)})
            answer, ttft, replica = chat_turn(url, messages, answer_tokens)
            prompt_chars = sum(len(m["content"]) for m in messages)
            done.append(Turn(client, turn, ttft, replica, prompt_chars))
            messages.append({"role": "assistant", "content": answer})
        return done

    with ThreadPoolExecutor(clients) as pool:
        return [t for chat in pool.map(one_chat, range(clients)) for t in chat]


def affinity(turns: list[Turn]) -> float:
    """Share of follow-up turns served by the replica that served the chat's previous turn."""
    by_chat: dict[int, list[Turn]] = {}
    for t in sorted(turns, key=lambda t: (t.client, t.turn)):
        by_chat.setdefault(t.client, []).append(t)
    pairs = [(a.replica, b.replica) for chat in by_chat.values() for a, b in itertools.pairwise(chat)]
    return sum(a == b for a, b in pairs) / len(pairs)


def completions_load(url: str, clients: int, requests_each: int, tokens: int) -> tuple[float, int]:
    """Seconds for `clients` clients to finish `requests_each` greedy completions each; tokens made."""

    def client(n: int) -> int:
        made = 0
        for i in range(requests_each):
            body = {"prompt": f"{n} {i} the model answers", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            r = requests.post(url + "/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            made += r.json()["usage"]["completion_tokens"]
        return made

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        made = sum(pool.map(client, range(clients)))
    return time.perf_counter() - start, made


def recovery_seconds(cluster: LocalCluster, app: str, url: str, replicas: int) -> tuple[float, float]:
    """SIGKILL one replica; seconds until a request succeeds (the ingress retries, so at once),
    and until a new replica runs in its place."""
    before = set(replica_pids(app))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    body = {"prompt": "after the kill", "max_tokens": 4, "temperature": 0}
    while requests.post(url + "/v1/completions", json=body, timeout=60).status_code != 200:
        time.sleep(0.1)
    serving = time.monotonic() - killed
    cluster.wait_replaced(app, before, replicas)
    return serving, time.monotonic() - killed


def load_until(stop: threading.Event, url: str, clients: int, make_body: Callable[[int], dict]) -> list[int]:
    """Statuses of requests sent by `clients` threads until `stop` is set."""
    statuses: list[int] = []

    def client(n: int) -> None:
        while not stop.is_set():
            statuses.append(requests.post(url + "/v1/completions", json=make_body(n), timeout=300).status_code)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(300)
    return statuses


AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
}


def autoscaling_step(cluster: LocalCluster, settings: dict[str, Any], clients: int) -> tuple[float, float]:
    """A fresh autoscaled app; `clients` long generations at once: seconds until Ray runs 2
    replicas, then, load stopped, until it is back to 1."""
    url = cluster.deploy({"auto": (settings, {"autoscaling_config": AUTOSCALING, **FAST_METRICS})})["auto"]
    cluster.wait_running("auto", 1)
    stop = threading.Event()
    loader = threading.Thread(
        target=load_until,
        args=(stop, url, clients, lambda n: {"prompt": f"{n} load", "max_tokens": 200, "ignore_eos": True}),
        daemon=True,
    )
    began = time.monotonic()
    loader.start()
    try:
        cluster.wait_running("auto", 2)
        up = time.monotonic() - began
    finally:
        stop.set()
        loader.join(300)
    stopped = time.monotonic()
    cluster.wait_running("auto", 1)
    return up, time.monotonic() - stopped


# --------------------------------------------------------------------------- the benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "medium"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion in the throughput arm")
    parser.add_argument("--requests", type=int, default=6, help="completions per client in the throughput arm")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the throughput arm")
    parser.add_argument("--answer-tokens", type=int, default=8, help="tokens per chat answer")
    args = parser.parse_args()
    from ray import serve

    from minicpm_server.model.tiny import cached_tiny_checkpoint, demo_cache_dir

    model = cached_tiny_checkpoint(demo_cache_dir(), args.size, seed=0)
    settings = {"model_path": str(model), "device": "cpu", "dtype": "float32"}
    print(f"model {model.name}; load average before: {os.getloadavg()}")
    cluster = LocalCluster(num_cpus=8)
    try:
        # Both routers' apps side by side, 2 replicas each; the 1-replica arm is the prefix app
        # scaled down after.
        urls = cluster.deploy(
            {r: (settings, {"routing": r, "num_replicas": 2, **FAST_METRICS}) for r in ("prefix", "power_of_two")}
        )
        print(
            "\n5-turn chats,", args.clients, "clients, 2 replicas each (alternating runs: prefix, pow2, prefix, pow2)"
        )
        results: dict[str, list[list[Turn]]] = {r: [] for r in urls}
        for repeat in range(2):
            for arm, (routing, url) in enumerate(urls.items()):
                # Names of equal length: both arms' prompts have the same number of tokens.
                results[routing].append(chat_sessions(url, args.clients, 5, args.answer_tokens, f"{repeat}{arm}-"))
        totals = cluster.settled_totals([HITS, PROMPT_TOKENS], list(urls))
        for routing in urls:
            hits, prompt = totals[HITS, routing], totals[PROMPT_TOKENS, routing]
            turn5 = [t.ttft for run in results[routing] for t in run if t.turn == 5]
            same = statistics.mean(affinity(run) for run in results[routing])
            split = sorted(Counter(t.replica for run in results[routing] for t in run).values(), reverse=True)
            print(
                f"  {routing:>12}: turn-5 TTFT median {statistics.median(turn5) * 1000:.0f} ms, "
                f"prefix-cache hit rate {hits / prompt:.1%} ({hits:.0f}/{prompt:.0f} prompt tokens), "
                f"follow-ups on the previous turn's replica {same:.0%}, turns per replica {split}"
            )

        # Throughput: the prefix app keeps 2 replicas, the other drops to 1 (with one replica the
        # router has no choice to make); rounds alternate between them.
        print(
            f"\nthroughput: {args.clients} clients x {args.requests} completions of {args.tokens} tokens, alternating"
        )
        cluster.deploy({"power_of_two": (settings, {"routing": "power_of_two", "num_replicas": 1, **FAST_METRICS})})
        cluster.wait_running("power_of_two", 1)
        runs: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for replicas, app in ((2, "prefix"), (1, "power_of_two")):
                secs, made = completions_load(urls[app], args.clients, args.requests, args.tokens)
                runs[replicas].append(made / secs)
        rate = {n: statistics.median(r) for n, r in runs.items()}
        print(
            f"  1 replica: {rate[1]:.0f} tokens/s; 2 replicas: {rate[2]:.0f} tokens/s; ratio {rate[2] / rate[1]:.2f}x"
        )
        print(f"  rounds (tokens/s): 1 replica {[round(r) for r in runs[1]]}, 2 replicas {[round(r) for r in runs[2]]}")

        serving, replaced = recovery_seconds(cluster, "prefix", urls["prefix"], 2)
        print(
            f"\nSIGKILL of one of 2 replicas: requests answered again after {serving:.2f} s; replaced after {replaced:.1f} s"
        )
        serve.delete("prefix")
        serve.delete("power_of_two")
        up, down = autoscaling_step(cluster, settings, args.clients)
        print(
            f"\nautoscaling 1-2 replicas, target 2 ongoing: 2 running {up:.1f} s after {args.clients} clients "
            f"began, 1 again {down:.1f} s after they stopped"
        )
    finally:
        print(f"load average after: {os.getloadavg()}")
        cluster.shutdown()


if __name__ == "__main__":
    main()
