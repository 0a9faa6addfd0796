"""Settings: flags, MINICPM_* variables, --help, and refusals of bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minicpm_server.model.checkpoint import StartupError
from minicpm_server.settings import DEFAULT_MODEL_PATH, parse_settings
from tests.harness import REPO

FLAGS = [
    "--model-path",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--api-key",
    "--log-prompts",
    "--empty-cache",
    "--seed",
    "--demo",
    "--max-batch",
    "--max-queue",
    "--served-model-name",
]


def test_defaults_keep_the_tutorial_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MINICPM_PORT", "MINICPM_HOST", "MINICPM_MODEL_PATH"):
        monkeypatch.delenv(name, raising=False)
    s = parse_settings([])
    assert (s.host, s.port, s.model_path, s.seed, s.empty_cache) == ("0.0.0.0", 6006, DEFAULT_MODEL_PATH, 0, "idle")


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINICPM_PORT", "7000")
    monkeypatch.setenv("MINICPM_LOG_PROMPTS", "true")
    assert parse_settings([]).port == 7000 and parse_settings([]).log_prompts is True
    assert parse_settings(["--port", "7001"]).port == 7001  # the flag wins


@pytest.mark.parametrize(
    "argv", [["--port", "0"], ["--port", "x"], ["--device", "tpu"], ["--empty-cache", "sometimes"]]
)
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(StartupError):
        parse_settings(argv)


# Run api.py with torch made unimportable: settings and --help must not need it.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['api.py', '--help']; "
    "runpy.run_path('api.py', run_name='__main__')"
)


def test_help_documents_every_flag_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in FLAGS:
        assert flag in out.stdout, flag
    assert "MINICPM_PORT" in out.stdout
    assert "{str,null}" not in out.stdout and "(default: )" not in out.stdout


def test_bad_flag_value_exits_2_in_one_line() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "api.py"), "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "port" in out.stderr
