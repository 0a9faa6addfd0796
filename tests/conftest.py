"""Shared fixtures: tiny checkpoints built once per session, real servers on loopback, loaded
models for engine tests. Helper functions and classes are in tests/harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import build_tiny_checkpoint
from tests.harness import LONG_WINDOW, SMALL_WINDOW, ServerProcess, real_tokenizer_dir, stop_all


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "MiniCPM-tiny", "tiny", seed=0)


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


@pytest.fixture(scope="session")
def long_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-long", "tiny", seed=0, max_position_embeddings=LONG_WINDOW
    )


@pytest.fixture(scope="session")
def long_server(start_server, long_dir: Path) -> ServerProcess:
    return start_server("--model-path", long_dir, "--device", "cpu", "--max-batch", "16")


# Two short windows, for two purposes: their weights differ too (seeds 0 and 2).


@pytest.fixture(scope="session")
def window256_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 256-token window (SMALL_WINDOW): a KV budget of one window is small, and
    a conversation of a few long_question()s outgrows it."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-short", "tiny", max_position_embeddings=SMALL_WINDOW
    )


@pytest.fixture(scope="session")
def window128_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with a 128-token window: every generation is short, so fuzzing stays fast."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("short") / "MiniCPM-short", "tiny", seed=2, max_position_embeddings=128
    )


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Sharded safetensors as well, so this fixture also covers the index-file loading path.
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "MiniCPM-gqa", "tiny-gqa", seed=1, weights_format="safetensors", shards=3
    )


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess([str(a) for a in args], log_path, env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def server(start_server, tiny_dir: Path) -> ServerProcess:
    """The shared server on the tiny checkpoint, float32 on CPU."""
    return start_server("--model-path", tiny_dir, "--device", "cpu", "--max-batch", "16")


@pytest.fixture(scope="session")
def small_server(start_server, window256_dir: Path) -> ServerProcess:
    """A server whose context window a short conversation outgrows; it logs prompts, so tests can
    see which turns the model was sent (test_client.py, test_chat_page.py)."""
    return start_server("--model-path", window256_dir, "--device", "cpu", "--log-prompts")


@pytest.fixture(scope="session")
def fuzz_server(start_server, window128_dir: Path) -> ServerProcess:
    """The server that fuzzing and hostile input try to break (test_fuzz.py, test_hostile_input.py)."""
    return start_server("--model-path", window128_dir, "--device", "cpu", "--request-timeout", "60")


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path):
    """The tiny checkpoint loaded for engine tests, once per module: an engine re-lays its weights out
    (the lean decoder fuses them), so modules do not share one load."""
    return load_checkpoint(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def vllm_and_native(start_server, tiny_dir: Path) -> tuple[ServerProcess, ServerProcess]:
    """The tiny model served by --engine vllm and by --engine native, for tests that compare them
    (started once: a vLLM server takes a minute or two to start on two cores)."""
    flags = ("--model-path", tiny_dir, "--device", "cpu", "--kv-cache-gb", "1")
    vllm = start_server(*flags, "--engine", "vllm", wait=False).wait_ready(timeout=900)
    return vllm, start_server(*flags, "--engine", "native")


@pytest.fixture
def pytorch_products() -> Iterator[None]:
    """Our CPU kernels off for one test (engine/native/kernels): the paths they replace where
    they are available (oneDNN packing, PyTorch's int8 kernel) are tested through this."""
    from minicpm_server.engine.native.kernels import use_cpu_kernels

    use_cpu_kernels(False)
    try:
        yield
    finally:
        use_cpu_kernels(True)
