"""The Ray Serve application (minicpm_server/deploy) on a local Ray cluster, on the CPU, with the
tiny model: replicas answer what one server answers, prefix routing keeps chats on their replica,
a SIGKILLed replica costs only its in-flight requests and comes back, autoscaling follows load.

Ray is heavy, so the default test command skips these where it is not installed;
`bash scripts/test-ray.sh` (which CI runs) makes a cached venv with ray[serve] and runs
`pytest -m ray`. One Ray cluster serves the whole module (it takes ~10 s to start here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

RAY = importlib.util.find_spec("ray") is not None
NEEDS_RAY = pytest.mark.skipif(
    not RAY, reason="Ray is not installed here; `bash scripts/test-ray.sh` runs these in a venv with ray[serve]"
)
CLIENTS = 8
REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the application, unstarted


@NEEDS_RAY
@pytest.mark.ray
@pytest.mark.parametrize("config", ["ray-serve.yaml", "ray-serve-cpu.yaml"])
def test_sample_configs_are_valid_serve_configs(config: str) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from minicpm_server.deploy.ray_serve import build_app

    parsed = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / config).read_text()))
    for app in parsed.applications:
        assert app.import_path == "minicpm_server.deploy.ray_serve:build_app"
        build_app(app.args)  # settings and Ray args as the config gives them


@NEEDS_RAY
@pytest.mark.ray
def test_unknown_or_invalid_args_are_refused_at_build() -> None:
    from pydantic import ValidationError

    from minicpm_server.deploy.ray_serve import build_app

    with pytest.raises(ValueError, match=r"unknown args.*modle_path"):
        build_app({"modle_path": "/x"})
    with pytest.raises(ValidationError):
        build_app({"max_batch": 0})
    with pytest.raises(ValidationError):
        build_app({"routing": "random"})


# --------------------------------------------------------------------------- a local Ray cluster


@pytest.fixture(scope="module")
def cluster():
    if not RAY:
        pytest.skip("Ray is not installed here; `bash scripts/test-ray.sh` runs these in a venv with ray[serve]")
    from bench.ray_serve import LocalCluster

    started = LocalCluster(num_cpus=8)
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def settings(tiny_dir: Path) -> dict:
    # Fault injection (POST /debug/fault) lets a test kill a replica's engine as a GPU fault would.
    return {
        "model_path": str(tiny_dir),
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 16,
        "testing_fault_injection": True,
    }


@pytest.fixture(scope="module")
def apps(cluster, settings) -> dict[str, str]:
    """Two 2-replica applications side by side, one per router, started together."""
    from bench.ray_serve import FAST_METRICS

    return cluster.deploy(
        {r: (settings, {"routing": r, "num_replicas": 2, **FAST_METRICS}) for r in ("prefix", "power_of_two")}
    )


def _tutorial(url: str, n: int) -> tuple[str, str]:
    r = requests.post(
        url + "/", json={"prompt": f"tutorial {n} hello", "do_sample": False, "max_new_tokens": 8}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()["response"], r.headers.get("x-minicpm-replica", "")


def _completion(url: str, n: int) -> tuple[str, str]:
    body = {"prompt": f"completion {n} the model", "max_tokens": 8, "temperature": 0}
    r = requests.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers.get("x-minicpm-replica", "")


def _streamed_chat(url: str, n: int) -> tuple[str, str]:
    from bench.ray_serve import chat_turn

    answer, _, replica = chat_turn(url, [{"role": "user", "content": f"chat {n} how are you"}], 8)
    return answer, replica


KINDS = [_tutorial, _completion, _streamed_chat]


@NEEDS_RAY
@pytest.mark.ray
def test_two_replicas_answer_like_one_server(apps, server) -> None:
    """40 requests from 8 clients, three kinds (one streamed): all answered, both replicas used,
    and every greedy answer equals the single api.py server's."""
    jobs = [(KINDS[n % len(KINDS)], n) for n in range(40)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        over_ray = list(pool.map(lambda job: job[0](apps["prefix"], job[1]), jobs))
    alone = [kind(server.url, n)[0] for kind, n in jobs]
    assert [answer for answer, _ in over_ray] == alone
    assert len({replica for _, replica in over_ray}) == 2


@NEEDS_RAY
@pytest.mark.ray
def test_same_surface_through_the_proxy(apps, server) -> None:
    """Errors, health and the chat page come from the app itself, in its shapes."""
    url = apps["prefix"]
    for path, body in (("/v1/completions", b"{bad"), ("/", b"{}"), ("/api/generate", b"[]")):
        via_ray = requests.post(url + path, data=body, timeout=60)
        direct = requests.post(server.url + path, data=body, timeout=60)
        assert via_ray.status_code == direct.status_code and via_ray.status_code in (400, 422)
        assert via_ray.json().keys() == direct.json().keys()
    assert requests.get(url + "/health", timeout=60).json()["status"] == "ok"
    page = requests.get(url + "/", headers={"Accept": "text/html"}, timeout=60)
    assert page.status_code == 200 and "<html" in page.text.lower()
    models = [requests.get(base + "/v1/models", timeout=60).json() for base in (url, server.url)]
    assert models[0]["data"][0]["id"] == models[1]["data"][0]["id"]


@NEEDS_RAY
@pytest.mark.ray
def test_prefix_routing_keeps_chats_on_their_replica(cluster, apps) -> None:
    """5-turn chats from 8 clients over 2 replicas under each router, one after the other: prefix
    routing sends (nearly) every follow-up where its history is cached, and the engines' prefix
    caches hit more than under Ray's default router."""
    from bench.ray_serve import HITS, PROMPT_TOKENS, affinity, chat_sessions

    names = [HITS, PROMPT_TOKENS]
    before = cluster.settled_totals(names, list(apps))
    turns = {routing: chat_sessions(url, CLIENTS, 5, 8) for routing, url in apps.items()}
    after = cluster.settled_totals(names, list(apps))
    made = {key: after[key] - before[key] for key in after}
    rates = {r: made[HITS, r] / made[PROMPT_TOKENS, r] for r in apps}
    print(f"affinity: { {r: affinity(t) for r, t in turns.items()} }, prefix-cache hit rates: {rates}")
    assert affinity(turns["prefix"]) >= 0.9
    assert affinity(turns["prefix"]) > affinity(turns["power_of_two"])
    assert rates["prefix"] > rates["power_of_two"]


@NEEDS_RAY
@pytest.mark.ray
def test_replica_metrics_reach_rays_export_by_replica(cluster, apps) -> None:
    _completion(apps["prefix"], 1)
    deadline = time.monotonic() + 60
    while len(by_replica := cluster.metric_by_replica("minicpm_generation_tokens_total", "prefix")) < 2:
        assert time.monotonic() < deadline, by_replica
        time.sleep(1)
    assert sum(by_replica.values()) > 0


def _outcome(url: str, n: int) -> str:
    """A streamed chat or a plain completion: "ok", "503", "cut" (the connection dropped
    mid-answer), "timeout", or another status."""
    stream = n % 2 == 0
    body = {"messages": [{"role": "user", "content": f"kill {n}"}], "max_tokens": 24, "stream": stream}
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=120) as r:
            if r.status_code != 200:
                return str(r.status_code)
            text = r.text
    except requests.exceptions.Timeout:
        return "timeout"
    except requests.exceptions.RequestException:
        return "cut"
    complete = text.rstrip().endswith("data: [DONE]") if stream else "choices" in json.loads(text)
    return "ok" if complete else "cut"


@NEEDS_RAY
@pytest.mark.ray
def test_sigkilled_replica_costs_only_its_requests_and_comes_back(cluster, apps) -> None:
    """Under load from 8 clients, SIGKILL one replica: no request hangs (clients time out at 120 s,
    and none does), failures are only requests in flight at the kill (503 or a cut stream), every
    request sent after it succeeds, and Ray starts a replacement."""
    from bench.ray_serve import replica_pids

    url = apps["prefix"]
    stop = threading.Event()
    outcomes: list[tuple[float, float, str]] = []  # (sent, finished, outcome)

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.monotonic()
            outcome = _outcome(url, n * 1000 + i)
            outcomes.append((sent, time.monotonic(), outcome))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(outcomes) < 16:
        time.sleep(0.05)
    before = set(replica_pids("prefix"))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while len([o for o in outcomes if o[0] > killed + 1]) < 24:  # load goes on after the kill
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a request hung"
    failed = [o for o in outcomes if o[2] != "ok"]
    print(f"{len(outcomes)} requests, {len(failed)} failed: {sorted({o[2] for o in failed})}")
    assert all(o[2] in ("503", "cut") for o in failed), failed
    assert all(sent <= killed for sent, _, _ in failed), "a request sent after the kill failed"
    assert len(failed) <= CLIENTS
    cluster.wait_replaced("prefix", before, 2, timeout=240)
    assert victim not in replica_pids("prefix")
    assert _completion(url, 99999)[0]


@NEEDS_RAY
@pytest.mark.ray
def test_replica_whose_engine_died_is_replaced(cluster, apps) -> None:
    """The engine thread dies (as on a GPU fault) while the process lives: /health and Ray's
    check_health report it, and Ray replaces the replica; the others keep answering."""
    from bench.ray_serve import replica_pids

    url = apps["prefix"]
    before = set(replica_pids("prefix"))
    armed = requests.post(url + "/debug/fault", json={"kind": "fatal"}, timeout=60)
    assert armed.status_code == 202, armed.text
    doomed = armed.headers["x-minicpm-replica"]
    # The engine dies on its next step: send work until Ray has replaced the doomed replica. Its
    # 503s are retried on the other replica, so every request is answered.
    statuses: list[int] = []
    deadline = time.monotonic() + 240
    while not (before - set(replica_pids("prefix"))):
        assert time.monotonic() < deadline, "the replica with the dead engine was not replaced"
        r = requests.post(
            url + "/v1/completions", json={"prompt": f"fault {len(statuses)}", "max_tokens": 4}, timeout=120
        )
        statuses.append(r.status_code)
        time.sleep(0.2)
    assert set(statuses) == {200}, statuses
    cluster.wait_replaced("prefix", before, 2, timeout=240)
    assert doomed not in {_completion(url, 424242 + n)[1] for n in range(6)}


@NEEDS_RAY
@pytest.mark.ray
def test_autoscaling_follows_a_load_step(cluster, apps, settings) -> None:
    """The prefix app redeployed with autoscaling (1 to 2 replicas, target 2 ongoing requests
    each): Ray keeps one replica while idle, adds the second under 8 clients' long generations,
    and goes back to one when they stop."""
    from ray import serve

    from bench.ray_serve import AUTOSCALING, FAST_METRICS, load_until

    serve.delete("power_of_two")  # the machine's cores to this test
    url = cluster.deploy({"prefix": (settings, {"autoscaling_config": AUTOSCALING, **FAST_METRICS})})["prefix"]
    cluster.wait_running("prefix", 1)
    stop = threading.Event()
    statuses: list[int] = []

    def body(n: int) -> dict:
        return {"prompt": f"{n} load", "max_tokens": 200, "ignore_eos": True}

    loader = threading.Thread(target=lambda: statuses.extend(load_until(stop, url, CLIENTS, body)), daemon=True)
    loader.start()
    try:
        cluster.wait_running("prefix", 2, timeout=240)
    finally:
        stop.set()
        loader.join(300)
    assert statuses and set(statuses) == {200}
    cluster.wait_running("prefix", 1, timeout=240)
