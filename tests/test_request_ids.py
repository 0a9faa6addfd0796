"""X-Request-Id: the client's id (short, printable) or a new one, on the answer, in the request's
log line and in every error body, so a client's report can be found in the server's log."""

from __future__ import annotations

import re

import pytest
import requests

HEX_ID = re.compile(r"[0-9a-f]{32}")


def test_a_clients_id_round_trips_and_reaches_the_log(server) -> None:
    answer = requests.post(server.url, json={"prompt": "hi", "max_length": 40}, headers={"X-Request-Id": "trace-42"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"
    [line] = server.log_lines("request_id=trace-42")
    assert "POST / status=200" in line


def test_an_id_is_made_when_none_is_sent(server) -> None:
    first, second = (requests.get(server.url + "/health") for _ in range(2))
    assert HEX_ID.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "given", ["x" * 129, "has space", "tab\there", "unicode-\u00e9"], ids=["too-long", "space", "tab", "non-ascii"]
)
def test_an_unacceptable_id_is_replaced(server, given) -> None:
    answer = requests.get(server.url + "/health", headers={"X-Request-Id": given.encode("utf-8")})
    assert HEX_ID.fullmatch(answer.headers["x-request-id"])


def test_error_bodies_carry_the_id(server) -> None:
    openai = requests.post(
        server.url + "/v1/chat/completions", json={"messages": "not a list"}, headers={"X-Request-Id": "bad-chat"}
    )
    assert openai.status_code == 400 and openai.json()["error"]["request_id"] == "bad-chat"
    tutorial = requests.post(server.url, data=b"{not json", headers={"X-Request-Id": "bad-tutorial"})
    assert tutorial.status_code == 400
    assert tutorial.json()["error"]["request_id"] == "bad-tutorial" and tutorial.json()["status"] == 400
    ollama = requests.post(server.url + "/api/generate", json={"model": 3}, headers={"X-Request-Id": "bad-ollama"})
    assert ollama.status_code == 400 and ollama.json()["request_id"] == "bad-ollama"
    missing = requests.get(server.url + "/nowhere", headers={"X-Request-Id": "lost"})
    assert missing.status_code == 404 and missing.json()["error"]["request_id"] == "lost"
    [line] = server.log_lines("request_id=bad-chat")
    assert "status=400" in line
