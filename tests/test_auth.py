"""Access: API keys, CORS, and the warning for a public interface without a key."""

from __future__ import annotations

import subprocess
import sys
import time

import requests

from tests.harness import REPO, free_port


def test_api_key_file_and_cors(start_server, tiny_dir, tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    server = start_server(
        "--model-path",
        tiny_dir,
        "--device",
        "cpu",
        "--api-key-file",
        key_file,
        "--cors-origins",
        "http://allowed.example",
    )
    ok = {"Authorization": "Bearer from-a-file"}
    assert requests.get(server.url + "/metrics").status_code == 401
    assert requests.get(server.url + "/metrics", headers=ok).status_code == 200
    assert requests.get(server.url + "/v1/models", headers={"Authorization": "Bearer from-a-fil"}).status_code == 401
    preflight = {
        "Origin": "http://allowed.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = requests.options(server.url + "/v1/chat/completions", headers=preflight)
    assert allowed.headers.get("access-control-allow-origin") == "http://allowed.example"
    denied = requests.options(
        server.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in denied.headers


def test_no_cors_by_default(server) -> None:
    r = requests.get(server.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_public_interface_without_key_warns(start_server, tiny_dir) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "api.py"),
            "--model-path",
            str(tiny_dir),
            "--device",
            "cpu",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while time.monotonic() < deadline and "without an API key" not in seen:
            seen += proc.stdout.readline()
        assert "without an API key" in seen
    finally:
        proc.terminate()
        proc.wait(15)
