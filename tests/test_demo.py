"""The quick start: `python api.py --demo` needs no GPU and no download."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from tests.harness import REPO, free_port


def test_demo_mode_serves_and_warns(start_server, tmp_path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("MINICPM_REAL_TOKENIZER", None)
    demo = start_server("--demo", env=env)
    answer = requests.post(demo.url, json={"prompt": "你好", "max_length": 40})
    assert answer.status_code == 200 and set(answer.json()) == {"response", "status", "time"}
    time.sleep(0.1)
    warnings = [line for line in demo.log().splitlines() if " WARNING " in line]
    # The one warning is that answers are random text: none about the demo's own files (its
    # tokenizer.json disagrees with its tokenizer.model by design), which a newcomer reads as a fault.
    assert len(warnings) == 1 and "random weights" in warnings[0], warnings
    [built] = (tmp_path / "minicpm-server").glob("minicpm-tiny-seed0*")
    assert (built / ".complete").exists() and "real-tokenizer" not in built.name


def test_demo_on_the_real_tokenizer(start_server, tmp_path, real_tokenizer) -> None:
    """MINICPM_REAL_TOKENIZER makes the demo use MiniCPM-2B's tokenizer.model (122,753 pieces)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), MINICPM_REAL_TOKENIZER=str(real_tokenizer))
    demo = start_server("--demo", env=env)
    answer = requests.post(demo.url + "/v1/completions", json={"prompt": "<用户>", "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == 4  # BOS, "<", "用户", ">"
    [built] = (tmp_path / "minicpm-server").glob("minicpm-tiny-seed0*")
    assert "real-tokenizer" in built.name


def test_demo_honours_dtype(start_server, tmp_path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("MINICPM_REAL_TOKENIZER", None)
    demo = start_server("--demo", "--dtype", "bfloat16", env=env)
    assert requests.post(demo.url, json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    # bfloat16 weights computed in float32 where our CPU kernels run (engine.half_weights), else bfloat16 throughout
    assert "torch.bfloat16 weights, computed in float32" in demo.log() or "as torch.bfloat16" in demo.log()


@pytest.mark.slow
def test_demo_script_on_a_machine_without_torch(tmp_path) -> None:
    """The README's one command, in a fresh virtual environment with no torch: it installs torch's
    CPU build (no CUDA packages) and the pinned requirements, then serves the demo."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    port = free_port()
    env = dict(os.environ, PYTHON=str(python), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("MINICPM_REAL_TOKENIZER", None)
    log = open(tmp_path / "demo.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["bash", "scripts/demo.sh", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        answer = requests.post(f"http://127.0.0.1:{port}", json={"prompt": "你好", "max_length": 40}, timeout=60)
        assert answer.status_code == 200
        installed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True).stdout
        assert "torch" in installed and "nvidia" not in installed.lower()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
