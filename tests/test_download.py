"""download.py with the real ModelScope client against a fake hub on loopback; api.py serves the result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from tests.conftest import REPO
from tests.fakehub import FakeModelScopeHub

MODEL_ID = "OpenBMB/MiniCPM-2B-sft-fp32"


def run_download(hub_url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MODELSCOPE_ENDPOINT=hub_url)
    return subprocess.run(
        [sys.executable, str(REPO / "download.py"), *args], env=env, capture_output=True, text=True, timeout=180
    )


def test_download_then_serve(tmp_path: Path, tiny_dir: Path, start_server) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        result = run_download(hub.url, "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "OpenBMB" / "MiniCPM-2B-sft-fp32"  # api.py's default layout under the cache dir
    assert any("FilePath=pytorch_model.bin" in r for r in hub.requests)
    for name in ("config.json", "pytorch_model.bin", "tokenizer.json"):
        assert (path / name).read_bytes() == (tiny_dir / name).read_bytes()
    served = start_server("--model-path", path, "--device", "cpu")
    answer = requests.post(served.url, json={"prompt": "hi", "max_new_tokens": 5})
    assert answer.status_code == 200 and "response" in answer.json()


def test_unknown_model_id(tmp_path: Path, tiny_dir: Path) -> None:
    with FakeModelScopeHub({MODEL_ID: tiny_dir}) as hub:
        result = run_download(hub.url, "--cache-dir", str(tmp_path), "--model-id", "OpenBMB/NoSuchModel")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: model OpenBMB/NoSuchModel")
    assert "Traceback" not in result.stderr


def test_unreachable_hub(tmp_path: Path) -> None:
    result = run_download("http://127.0.0.1:9", "--cache-dir", str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach ModelScope") and "Traceback" not in result.stderr
