"""What the tests share besides fixtures: real servers on loopback, /metrics and /health readers,
and an engine run on requests with its results collected. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from minicpm_server.engine.native.engine import NativeEngine
from minicpm_server.engine.protocol import Completion, GenerationRequest, SamplingParams, TextDelta
from minicpm_server.model import chat

REPO = Path(__file__).resolve().parent.parent

# Long enough that no generation in a test can run to its end before the test cancels it, on
# however fast a machine: tests of cancellation, timeouts and shutdown use it.
LONG_WINDOW = 65536
HOLD_TOKENS = 60000

# The window of conftest's window256_dir, which a few long_question()s outgrow.
SMALL_WINDOW = 256

# What an answer must never show a client: a traceback, source paths, the machine's directories.
LEAKS = re.compile(r"Traceback|File \"|/root/|site-packages|\.py\"")


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python api.py ...` as a user runs it, on a free loopback port, with its log in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, str(REPO / "api.py"), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or os.environ.copy(),
        )

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self, needle: str, at_least: int = 1, timeout: float = 120) -> list[str]:
        """The log's lines containing `needle`, once there are `at_least` of them. A request's line
        is written just after its answer is sent, so a test that has its answer may be early."""
        deadline = time.monotonic() + timeout
        while len(found := [line for line in self.log().splitlines() if needle in line]) < at_least:
            assert time.monotonic() < deadline, (
                f"fewer than {at_least} log lines with {needle!r}:\n{self.log()[-2000:]}"
            )
            time.sleep(0.05)
        return found

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[ServerProcess]) -> None:
    """Signal every server first, then wait for each: they drain in parallel (a suite's servers
    stopped one by one took over a minute), and one still up 15 s later is killed."""
    running = [s for s in servers if s.proc.poll() is None]
    for server in running:
        server.proc.terminate()
    deadline = time.monotonic() + 15
    for server in running:
        try:
            server.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    for server in servers:
        server._log.close()


def real_tokenizer_dir() -> Path | None:
    """MiniCPM-2B's real tokenizer.model, where this machine has it (CI does): the directory named
    by MINICPM_REAL_TOKENIZER, which scripts/test.sh points at the team's shared copy."""
    found = os.environ.get("MINICPM_REAL_TOKENIZER")
    return Path(found) if found and (Path(found) / "tokenizer.model").is_file() else None


def long_question(n: int) -> str:
    """A question of about 80 tokens, numbered: three of them alone overflow SMALL_WINDOW."""
    return (
        f"QUESTION-{n} "
        + "what is the highest mountain and the longest river near the city, how are you, hello world " * 4
    )


def long_generation(base_url: str, tokens: int, **extra) -> tuple[str, dict]:
    """URL and body of a request that surely generates `tokens` tokens: a raw completion (chat
    requests stop at MiniCPM's turn markers, which a random model emits now and then)."""
    return base_url + "/v1/completions", {"prompt": "long", "max_tokens": tokens, "ignore_eos": True, **extra}


# --------------------------------------------------------------------------- /metrics and /health


def metric(base_url: str, name: str, labels: str = "", required: bool = False) -> float:
    """One sample from /metrics; `labels` as Prometheus prints them, e.g. 'reason="cancelled"'.
    A sample /metrics does not show reads as 0, unless `required`: then it fails the test."""
    sample = f"{name}{{{labels}}}" if labels else name
    text = requests.get(base_url + "/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match or not required, f"{sample} missing from /metrics"
    return float(match.group(1)) if match else 0.0


DASHBOARD = REPO / "deploy" / "grafana" / "minicpm-server.json"


def dashboard_metric_names() -> set[str]:
    """The vllm: series the Grafana dashboard's queries read, as exported (with _total, _bucket...)."""
    import json

    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    exprs += [v["definition"] for v in variables if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"vllm:[a-z0-9_:]+", expr)}


def check_vllm_metric_names(base_url: str, model_name: str) -> dict[str, float]:
    """Every series the dashboard reads is on /metrics, labelled with the model; their values."""
    text = requests.get(base_url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for name in sorted(dashboard_metric_names()):
        pattern = rf'^{re.escape(name)}{{[^}}]*model_name="{re.escape(model_name)}"[^}}]*}} ([0-9.e+-]+)$'
        values = [float(v) for v in re.findall(pattern, text, re.MULTILINE)]
        assert values, f"{name} (model_name={model_name}) is not on /metrics"
        found[name] = sum(values)
    return found


def wait_for_metric(base_url: str, name: str, ok, labels: str = "", timeout: float = 120.0) -> float:
    """Poll until ok(value) holds. The timeout only stops a broken server from hanging the suite:
    on a busy machine the wait may be long, and no assertion depends on how long it was."""
    deadline = time.monotonic() + timeout
    while not ok(value := metric(base_url, name, labels)):
        assert time.monotonic() < deadline, f"{name}{{{labels}}} stayed at {value}"
        time.sleep(0.05)
    return value


def wait_for_health(url: str, status: str, timeout: float = 120.0) -> dict:
    """Poll /health until it says `status`; its body then. The timeout is as wait_for_metric's."""
    deadline = time.monotonic() + timeout
    while (body := requests.get(url + "/health", timeout=30).json()).get("status") != status:
        assert time.monotonic() < deadline, f"/health never said {status}"
        time.sleep(0.02)
    return body


# --------------------------------------------------------------------------- the engine on its own

PROMPTS = ["hello there", "你好，山东省最高的山是哪座山？", "what is the river city of code " * 6, "x"]


def ids_for(loaded, prompt: str) -> list[int]:
    """A one-turn chat prompt's token ids, BOS first, as model.chat encodes it."""
    return loaded.tokenizer.encode(chat.render_chat(loaded.tokenizer, chat.conversation(prompt)))


def run(loaded, coro_fn, **engine_kwargs):
    """Start a NativeEngine on a loaded checkpoint, await coro_fn(engine) and stop the engine."""

    async def main():
        engine = NativeEngine(
            loaded.model, loaded.tokenizer, context_window=loaded.context_window, eos_token_id=2, **engine_kwargs
        )
        engine.start()
        try:
            return await coro_fn(engine)
        finally:
            engine.stop()

    return asyncio.run(main())


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)


def submit(engine, loaded, prompt: str, params: SamplingParams):
    return engine.submit(GenerationRequest(ids_for(loaded, prompt), params))


async def result(handle) -> Completion:
    """A request's whole answer, collected from its events."""
    parts = []
    async for event in handle.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return Completion("".join(parts), event.reason, event.prompt_tokens, event.completion_tokens)
    raise AssertionError("the events ended without Finished")


async def until_running(engine, n: int) -> None:
    """Wait for the engine's state, not for time: the timeout only stops a broken engine hanging the suite."""
    for _ in range(12000):
        if engine.stats.running == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {n} running")
