"""Shared fixtures: tiny checkpoints built once per session, and real servers on loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from minicpm_server.model.tiny import build_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


def long_generation(base_url: str, tokens: int, **extra) -> tuple[str, dict]:
    """URL and body of a request that surely generates `tokens` tokens: a raw completion (chat
    requests stop at MiniCPM's turn markers, which a random model emits now and then)."""
    return base_url + "/v1/completions", {"prompt": "long", "max_tokens": tokens, "ignore_eos": True, **extra}


def metric(base_url: str, name: str, labels: str = "") -> float:
    """One sample from /metrics; `labels` as Prometheus prints them, e.g. 'reason="cancelled"'."""
    sample = f"{name}{{{labels}}}" if labels else name
    text = requests.get(base_url + "/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for_metric(base_url: str, name: str, ok, labels: str = "", timeout: float = 120.0) -> float:
    """Poll until ok(value) holds. The timeout only stops a broken server from hanging the suite:
    on a busy machine the wait may be long, and no assertion depends on how long it was."""
    deadline = time.monotonic() + timeout
    while not ok(value := metric(base_url, name, labels)):
        assert time.monotonic() < deadline, f"{name}{{{labels}}} stayed at {value}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "MiniCPM-tiny", "tiny", seed=0)


def real_tokenizer_dir() -> Path | None:
    """MiniCPM-2B's real tokenizer.model, where this machine has it (CI does): the directory named
    by MINICPM_REAL_TOKENIZER, which scripts/test.sh points at the team's shared copy."""
    found = os.environ.get("MINICPM_REAL_TOKENIZER")
    return Path(found) if found and (Path(found) / "tokenizer.model").is_file() else None


@pytest.fixture(scope="session")
def real_tokenizer() -> Path:
    found = real_tokenizer_dir()
    if found is None:
        pytest.skip("MiniCPM-2B's real tokenizer.model is not here (set MINICPM_REAL_TOKENIZER to its directory)")
    return found


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory: pytest.TempPathFactory, real_tokenizer: Path) -> Path:
    """A tiny model on MiniCPM-2B's real tokenizer (122,753 pieces), with a lossy tokenizer.json beside it."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-real-tok", "tiny", seed=3, tokenizer_from=real_tokenizer
    )


@pytest.fixture(scope="session")
def real_nojson_dir(tmp_path_factory: pytest.TempPathFactory, real_tokenizer: Path) -> Path:
    """The same with tokenizer.model alone, as older copies of the download ship."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-real-spm",
        "tiny",
        seed=3,
        tokenizer_from=real_tokenizer,
        tokenizer_json=False,
    )


# Long enough that no generation in a test can run to its end before the test cancels it, on
# however fast a machine: tests of cancellation, timeouts and shutdown use it.
LONG_WINDOW = 65536
HOLD_TOKENS = 60000


@pytest.fixture(scope="session")
def long_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-long", "tiny", seed=0, max_position_embeddings=LONG_WINDOW
    )


@pytest.fixture(scope="session")
def long_server(start_server, long_dir: Path) -> ServerProcess:
    return start_server("--model-path", long_dir, "--device", "cpu", "--max-batch", "16")


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Sharded safetensors as well, so this fixture also covers the index-file loading path.
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-gqa", "tiny-gqa", seed=1, weights_format="safetensors", shards=3
    )


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

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess([str(a) for a in args], log_path, env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tiny_dir: Path) -> ServerProcess:
    """The shared server on the tiny checkpoint, float32 on CPU."""
    return start_server("--model-path", tiny_dir, "--device", "cpu", "--max-batch", "16")
