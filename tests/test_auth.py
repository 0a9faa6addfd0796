"""Access: API keys, CORS, and the warning for a public interface without a key."""

from __future__ import annotations

import asyncio
import logging
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


def test_an_app_that_does_not_listen_does_not_warn_about_the_interface(tiny_dir, caplog) -> None:
    """A Ray replica builds the app with listening=False: clients reach Ray's proxy, so a
    public --host says nothing about the replica, and its warning would mislead."""
    from minicpm_server.api.app import create_app
    from minicpm_server.settings import Settings

    async def start_and_stop(listening: bool) -> None:
        settings = Settings(model_path=str(tiny_dir), device="cpu", host="0.0.0.0")
        app = create_app(settings, listening=listening)
        async with app.router.lifespan_context(app):
            pass

    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        asyncio.run(start_and_stop(listening=False))
    assert "without an API key" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="minicpm_server"):
        asyncio.run(start_and_stop(listening=True))
    assert "without an API key" in caplog.text  # the control: the same settings, listening, warn
