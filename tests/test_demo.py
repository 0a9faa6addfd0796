"""The quick start: `python api.py --demo` needs no GPU and no download."""

from __future__ import annotations

import os
import time

import requests


def test_demo_mode_serves_and_warns(start_server, tmp_path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    demo = start_server("--demo", env=env)
    answer = requests.post(demo.url, json={"prompt": "你好", "max_length": 40})
    assert answer.status_code == 200 and set(answer.json()) == {"response", "status", "time"}
    time.sleep(0.1)
    assert "random" in demo.log()  # the warning that answers are random text
    assert (tmp_path / "minicpm-server" / "minicpm-tiny-seed0" / ".complete").exists()
