"""The quick start: `python api.py --demo` needs no GPU and no download."""

from __future__ import annotations

import os
import time

import requests


def test_demo_mode_serves_and_warns(start_server, tmp_path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("MINICPM_REAL_TOKENIZER", None)
    demo = start_server("--demo", env=env)
    answer = requests.post(demo.url, json={"prompt": "你好", "max_length": 40})
    assert answer.status_code == 200 and set(answer.json()) == {"response", "status", "time"}
    time.sleep(0.1)
    assert "random" in demo.log()  # the warning that answers are random text
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
